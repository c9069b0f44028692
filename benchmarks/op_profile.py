"""Per-op profiles of both frameworks in one vocabulary: categories, passes, and the tables of profile_ops.py.

Standard library only: the PyTorch peer's process (peer_bench.py --profile) imports it as well as ddpm_jax's.
An op row is a dict: name, category, pass, label (where in the network), shape, ms (per step or per sampler call).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable

CATEGORIES = ("convolution", "conv weight grad", "matmul", "reduction", "elementwise", "data movement", "other")
PASSES = ("forward", "backward", "update", "sample")
# XLA opcodes that only move or reinterpret data.
_MOVES = {"copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "pad", "broadcast", "parameter",
          "constant", "dynamic-slice", "dynamic-update-slice", "tuple", "get-tuple-element", "iota", "reverse",
          "copy-start", "copy-done", "gather", "scatter", "select"}
_CONTROL = {"while", "conditional", "call"}  # Their bodies' thunks are profiled themselves: not counted twice.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")


def _split_shape(rest: str) -> tuple[str, str]:
    """(shape, the text after it) of an HLO instruction's right-hand side; tuple shapes are parenthesised."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 2:]
    return rest, ""


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Instructions of an optimized HLO module by name (opcode, shape, op_name, calls, window, operands, comp)."""
    instructions: dict[str, dict] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    current = ""
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("(", 1)[0]:
            current = head.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        shape, tail = _split_shape(line[match.end():])
        opcode, _, args = tail.partition("(")
        op_name = re.search(r'op_name="([^"]*)"', tail)
        window = re.search(r"window=\{size=([\dx]+)", tail)
        instructions[match.group(1)] = {
            "opcode": opcode.strip(), "shape": re.sub(r"\{[^}]*\}", "", shape), "comp": current,
            "op_name": op_name.group(1) if op_name else "",
            "calls": re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", tail),
            "window": tuple(int(w) for w in window.group(1).split("x")) if window else (),
            "operands": re.findall(r"%([\w.\-]+)", args.split(")", 1)[0]),
        }
        computations[current].append(match.group(1))
    return instructions, dict(computations)


def _inner_opcodes(name: str, instructions: dict, computations: dict, seen: set | None = None) -> set[str]:
    """Opcodes of an instruction and of every computation it calls, recursively."""
    seen = set() if seen is None else seen
    inst = instructions[name]
    ops = {inst["opcode"]}
    for comp in inst["calls"]:
        if comp in seen:
            continue
        seen.add(comp)
        for inner in computations.get(comp, ()):
            ops |= _inner_opcodes(inner, instructions, computations, seen)
    return ops


def _xla_category(name: str, instructions: dict, computations: dict) -> str:
    inst = instructions[name]
    ops = _inner_opcodes(name, instructions, computations)
    if "convolution" in ops:
        # A weight gradient is a convolution whose window is the activation (wider than any 3x3 kernel).
        conv = inst if inst["opcode"] == "convolution" else None
        windows = [conv["window"]] if conv else [instructions[i]["window"] for c in inst["calls"]
                                                 for i in computations.get(c, ()) if
                                                 instructions[i]["opcode"] == "convolution"]
        return "conv weight grad" if any(w and max(w) > 3 for w in windows) else "convolution"
    if ops & {"dot", "custom-call"}:
        return "matmul"
    if ops & {"reduce", "reduce-window", "all-reduce", "reduce-scatter"}:
        return "reduction"
    if ops <= _MOVES | {"fusion"}:
        return "data movement"
    if ops & {"rng-bit-generator", "rng", "sort", "after-all", "infeed", "outfeed"}:
        return "other"
    return "elementwise"


def xla_pass(op_name: str) -> str:
    """forward, backward or update, from the JAX name stack of an op (jvp: forward, transpose(jvp): backward)."""
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update" if op_name else ""


def _label(op_name: str) -> str:
    """Where in the network: the name stack after the model's outermost scope (up_0_block_0/norm1/reduce_sum)."""
    for marker in ("jvp(UNet))/", "jvp(UNet)/", "UNet/"):
        if marker in op_name:
            return op_name.split(marker, 1)[1]
    return op_name.split("/", 1)[-1] if op_name else ""


def _first_pass(name: str, instructions: dict, users: dict) -> str:
    """The pass of an op without a name stack (compiler-made copies): that of its nearest user, else its operand."""
    for other in list(users.get(name, ())) + instructions[name]["operands"]:
        known = xla_pass(instructions.get(other, {}).get("op_name", ""))
        if known:
            return known
    return "update"


def xla_rows(instructions: dict, computations: dict, times_ns: dict[str, float], per: int,
             sample: bool = False) -> list[dict]:
    """Op rows of an XLA profile: each executed instruction's time (ns summed over `per` calls) per call, in ms."""
    users: dict[str, list[str]] = collections.defaultdict(list)
    for name, inst in instructions.items():
        for operand in inst["operands"]:
            users[operand].append(name)
    rows = []
    for name, ns in times_ns.items():
        inst = instructions.get(name)
        if inst is None or inst["opcode"] in _CONTROL:
            continue
        pass_ = "sample" if sample else (xla_pass(inst["op_name"]) or _first_pass(name, instructions, users))
        rows.append({"name": name, "category": _xla_category(name, instructions, computations), "pass": pass_,
                     "label": _label(inst["op_name"]), "shape": inst["shape"], "ms": ns / per / 1e6})
    return rows


# The PyTorch side: aten op names to the same categories. Only self times are summed, so each op counts once.
# convolution_backward computes both gradients in one op, so the peer has no "conv weight grad" row.
_TORCH_RULES = (
    ("convolution", ("conv",)),
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear", "scaled_dot_product", "flash_attention", "baddbmm")),
    ("reduction", ("group_norm", "sum", "mean", "norm", "softmax", "_foreach_norm", "var", "std", "max", "min")),
    ("data movement", ("copy", "contiguous", "cat", "transpose", "permute", "clone", "upsample", "pad", "view",
                       "reshape", "as_strided", "empty", "fill_", "zero_", "index", "select", "slice", "stack",
                       "expand", "split", "chunk", "to", "_to_copy", "t", "unsqueeze", "squeeze",
                       "resize_", "detach", "flatten", "narrow", "set_")),
)


def torch_category(op: str) -> str:
    """Category of a PyTorch op name (aten::mkldnn_convolution -> convolution, aten::native_group_norm -> ...)."""
    base = op.lower().split("::")[-1]
    for category, needles in _TORCH_RULES:
        # Short names (t, to, mm) only match whole; longer ones anywhere (mkldnn_convolution, native_group_norm).
        if any(needle == base or (len(needle) > 2 and needle in base) for needle in needles):
            return category
    return "elementwise" if op.lower().startswith("aten::") else "other"


def totals(rows: Iterable[dict]) -> dict[str, dict[str, float]]:
    """ms by pass, then by category (with 'all' for each pass)."""
    out: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for row in rows:
        out[row["pass"]][row["category"]] += row["ms"]
        out[row["pass"]]["all"] += row["ms"]
    return {p: dict(c) for p, c in out.items()}


def format_top(title: str, rows: list[dict], top: int) -> str:
    """The `top` slowest ops as a Markdown table: ms, share of all op time, pass, category, layer, shape."""
    total = sum(r["ms"] for r in rows) or 1.0
    lines = [f"{title}: op time {total:.1f} ms", "", "| ms | share | pass | category | op (layer) | shape |",
             "|---:|---:|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["ms"])[:top]:
        where = f"{r['name']} ({r['label']})" if r["label"] else r["name"]
        lines.append(f"| {r['ms']:.2f} | {100 * r['ms'] / total:.1f}% | {r['pass']} | {r['category']} | "
                     f"{where[:70]} | {r['shape'][:40]} |")
    return "\n".join(lines)


def format_comparison(ours: list[dict], peer: list[dict] | None, walls: tuple[float, float | None] = (0.0, None)
                      ) -> str:
    """ms per pass and category, ddpm_jax against the peer, as a Markdown table (the peer's conv grads together).

    With the wall times (ours, peer's) per step, two last rows: the wall time, and the part of it in no op's event
    (wall - op time). On XLA:CPU that part is mostly convolutions: their thunks run asynchronously on the thread pool
    and their events time only the launch. On the peer it is Python and the autograd engine.
    """
    a, b = totals(ours), totals(peer or [])
    lines = ["| pass | category | ddpm_jax ms | peer ms | ratio |", "|---|---|---:|---:|---:|"]
    for pass_ in PASSES:
        if pass_ not in a and pass_ not in b:
            continue
        for category in (*CATEGORIES, "all"):
            x, y = a.get(pass_, {}).get(category, 0.0), b.get(pass_, {}).get(category, 0.0)
            if category == "convolution" and pass_ == "backward":
                x += a.get(pass_, {}).get("conv weight grad", 0.0)
            if category == "conv weight grad" or (x < 0.05 and y < 0.05):
                continue
            ratio = f"{x / y:.2f}" if y > 0 and peer is not None else ""
            peer_ms = f"{y:.1f}" if peer is not None else ""
            lines.append(f"| {pass_} | {category} | {x:.1f} | {peer_ms} | {ratio} |")
    ours_wall, peer_wall = walls
    if ours_wall:
        rows = [("wall", ours_wall, peer_wall),
                ("not in any op (wall - op time)", ours_wall - sum(r["ms"] for r in ours),
                 None if peer_wall is None else peer_wall - sum(r["ms"] for r in peer or []))]
        for name, x, y in rows:
            peer_ms, ratio = ("", "") if y is None else (f"{y:.1f}", f"{x / y:.2f}" if y > 0 else "")
            lines.append(f"| all | {name} | {x:.1f} | {peer_ms} | {ratio} |")
    return "\n".join(lines)
