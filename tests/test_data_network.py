"""The reachability probe that lets offline runs fail in seconds instead of minutes."""

import socket
import time

from ddpm_jax.data import network


def test_can_connect() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert network.can_connect("127.0.0.1", server.getsockname()[1], timeout_s=2.0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound but not listening: refused
    assert not network.can_connect("127.0.0.1", closed_port, timeout_s=2.0)
    start = time.perf_counter()
    assert not network.can_connect("host.invalid", timeout_s=2.0)  # RFC 6761: never resolves
    assert time.perf_counter() - start < 10
