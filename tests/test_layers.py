"""The package's import structure, read from its source (ast): layers that only import downwards, no cycles, no
function-local imports of ddpm_jax modules, diffusion/ pure, and no module over 500 lines. README's "Code map"
describes the same layers."""

import ast
import pathlib

import pytest
from helpers import REPO

PACKAGE = REPO / "ddpm_jax"
# Lowest first. A module may import its own layer or lower ones; within a layer the imports must not form a cycle.
LAYERS = [
    ("base", {"errors", "fileio", "host_memory", "parallel", "preemption", "xla_flags", "rng", "config", "pixels"}),
    ("library", {"config_checks", "diffusion", "models", "data", "builders"}),
    ("services", {"train_state", "checkpointing", "sampler", "evaluation", "outputs", "metric_writers"}),
    ("loop", {"train"}),
    ("programs", {"modes", "main", "tools"}),
]
# Third-party packages that only one data route or tool needs, imported where they are used so that the rest of the
# package does not pay for them (test_data.py checks that importing ddpm_jax.data stays light).
LAZY_THIRD_PARTY = {"tensorflow_datasets", "huggingface_hub", "pyarrow", "torch", "array_record"}
# main defers its imports so that --help answers at once and XLA_FLAGS is set before JAX starts.
DEFERRED = {("ddpm_jax.main", "main")}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The ddpm_jax module an imported name refers to (the longest module it starts with), or None if external."""
    matches = [m for m in MODULES if name == m or name.startswith(m + ".")]
    return max(matches, key=len) if matches else None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported name, enclosing function or None, line) for every import statement of a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Import):
                found.extend((a.name, function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                found.extend((f"{base}.{a.name}", function, child.lineno) for a in child.names)
            visit(child, inner)

    visit(tree, None)
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{module} is in no layer of {[name for name, _ in LAYERS]}; add it to LAYERS and README")


def _edges() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for name, function, _ in _imports(m):
            target = _target(name)
            if target and target != m and function is None:
                edges[m].add(target)
    return edges


def test_every_module_has_a_layer():
    for m in MODULES:
        if m != "ddpm_jax":
            _layer(m)


def test_imports_point_to_the_same_or_a_lower_layer():
    upward = [f"{m} -> {t}" for m, targets in _edges().items() if m != "ddpm_jax" for t in targets
              if _layer(t) > _layer(m)]
    assert not upward, upward


def test_no_import_cycles():
    edges, state, cycles = _edges(), {}, []

    def walk(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                walk(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            walk(m, [m])
    assert not cycles, cycles


def test_no_function_local_imports_of_the_package_and_only_named_lazy_ones():
    local = [f"{m}:{line} imports {name} inside {function}()" for m in MODULES for name, function, line in _imports(m)
             if function is not None and (m, function) not in DEFERRED
             and (_target(name) is not None or name.split(".")[0] not in LAZY_THIRD_PARTY)]
    assert not local, local


@pytest.mark.parametrize("forbidden", ["ml_collections", "ddpm_jax.fileio", "ddpm_jax.parallel", "jax.sharding",
                                       "ddpm_jax.config", "absl"])
def test_the_diffusion_math_is_pure(forbidden):
    """diffusion/ takes arrays and returns arrays: no config, no files, no devices, no logging."""
    for m in MODULES:
        if m.startswith("ddpm_jax.diffusion"):
            for name, _, line in _imports(m):
                assert not (name == forbidden or name.startswith(forbidden + ".")), f"{m}:{line} imports {name}"
            for name, _, _ in _imports(m):
                target = _target(name)
                assert target is None or target.startswith("ddpm_jax.diffusion"), f"{m} imports {target}"


def test_no_module_is_over_500_lines():
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items() if len(p.read_text().splitlines()) > 500}
    assert not long, long
