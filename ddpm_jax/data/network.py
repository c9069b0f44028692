"""Whether a host is reachable, decided in seconds: hub clients would otherwise retry for minutes when offline."""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request


def can_connect(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """True if a TCP connection to host:port opens within timeout_s; DNS failures count as unreachable."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:  # socket.gaierror, timeouts and refusals are all OSError
        return False


def reachable(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """Like `can_connect`, but through the configured HTTPS proxy when there is one (direct sockets may be blocked)."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return can_connect(parsed.hostname, parsed.port or 8080, timeout_s)
    return can_connect(host, port, timeout_s)
