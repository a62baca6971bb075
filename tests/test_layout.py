"""The package's shape: dependencies point one way, no module mixes layers (serial).

Every ``import`` of every module is read (with ast, nothing is run) and
checked against the layers of the architecture::

    cli -> bench  ->  run  ->  config  ->  parallel  ->  comm | model | data | fault  ->  process
    -> runtime

and ``testing`` (test beds) stands apart, on ``runtime`` and ``threads`` at most.
"""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "mpitrain"

# Layer of each top-level part: a module may import only from lower layers, or
# from its own part.  (config sits above parallel: it takes each choice list from
# the module that owns it.)
LAYERS = {
    "runtime": 0, "threads": 0, "balance": 0, "malloc": 0,
    "paths": 0.25,  # the path checks: on runtime's errors
    "timeline": 0.5,  # writes its file through paths
    "process": 0.5,  # init(): on threads and malloc; every trainer calls it
    "model": 1, "data": 1, "comm": 1, "fault": 1,
    "parallel": 2, "config": 3, "run": 4,
    "torch": 4.5,  # the PyTorch front end: on run's loop, comm's exchange, data, fault
    "bench": 5, "cli": 6, "__main__": 7, "__init__": 7,
    "testing": 7,  # test beds for developers and the tests: standalone
}
# Parts of the same layer that must not know each other.
FORBIDDEN = {
    "model": {"comm", "data", "fault", "mpi4py"},  # models run without MPI
    "comm": {"model", "data", "fault"},  # buffers only, no models
    "data": {"model", "comm", "fault"},
    "fault": {"model", "comm", "data"},
    # runtime and threads at most (standard library only): usable without numpy, MPI or the
    # rest of the package; threads for the environment a launched job should get
    "testing": set(LAYERS) - {"runtime", "threads", "testing"} | {"mpi4py"},
}


def part_of(module: str) -> str:
    """'mpitrain.comm.shm' -> 'comm'; 'mpitrain.config' -> 'config'."""
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path):
    """The absolute names ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("")
    here = list(rel.parts)
    if here[-1] == "__init__":
        here = here[:-1]
    package = here if path.name == "__init__.py" else here[:-1]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    for alias in node.names:
                        yield f"{name}.{alias.name}"
                    continue
                yield name
            else:
                yield node.module


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dependencies_point_one_way(path):
    me = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    mine = part_of(me) if not me.endswith("__init__") or me.count(".") > 1 else "__init__"
    for name in imports(path):
        if name == "mpi4py" or name.startswith("mpi4py."):
            assert "mpi4py" not in FORBIDDEN.get(mine, ()), f"{me} imports {name}"
            continue
        if not name.startswith("mpitrain"):
            continue
        if name in ("mpitrain", "mpitrain.__version__"):  # the version
            continue
        other = part_of(name)
        if other == mine:
            continue
        assert other not in FORBIDDEN.get(mine, ()), f"{me} imports {name}: {mine} must not know {other}"
        assert LAYERS[other] < LAYERS[mine], (
            f"{me} (layer {LAYERS[mine]}) imports {name} (layer {LAYERS[other]}): "
            "dependencies point down only")


def test_only_the_torch_front_end_and_the_benchmarks_import_torch():
    """torch is optional: the rest of the package runs without it."""
    found = [str(p.relative_to(ROOT)) for p in MODULES
             if any(n == "torch" or n.startswith("torch.") for n in imports(p))]
    assert found and all(f.startswith(("mpitrain/torch/", "mpitrain/bench/")) for f in found), \
        found


def test_no_module_is_larger_than_a_few_hundred_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, long


def _public(tree):
    """Module-level functions and classes, and the methods of those classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node
            if isinstance(node, ast.ClassDef):
                yield from (m for m in node.body if isinstance(m, ast.FunctionDef)
                            and not m.name.startswith("_"))


def test_every_public_function_has_a_docstring():
    missing = []
    for path in MODULES:
        for node in _public(ast.parse(path.read_text())):
            if ast.get_docstring(node) is None and not _is_override(node):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not missing, missing


def _is_override(node) -> bool:
    """Methods that implement a documented base-class method (forward, backward...)."""
    return node.name in {"forward", "backward", "shapes", "bind", "init", "state", "hyper",
                         "name", "encode", "decode", "samples_per_s", "rank",
                         "is_first_stage", "is_last_stage", "next_rank", "prev_rank",
                         "requested", "attempt", "path", "sums", "summarize", "predict",
                         "describe", "targets", "rows", "out_shape", "flops",
                         "activation_elems", "text", "read", "read_labels", "connect",
                         "for_options", "like"}


def _declared_timeout(fn: ast.FunctionDef) -> float:
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "timeout" and d.args \
                and isinstance(d.args[0], ast.Constant):
            return float(d.args[0].value)
    return 300.0  # pyproject's timeout


def test_every_test_outlasts_the_subprocesses_it_starts():
    """A subprocess limit at or above its test's pytest timeout would end pytest (thread
    method) with no report and jobs left running; conftest.limit checks the rest."""
    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test"):
                continue
            budget = _declared_timeout(fn)
            for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call)):
                for kw in call.keywords:
                    if kw.arg == "timeout" and isinstance(kw.value, ast.Constant) \
                            and isinstance(kw.value.value, (int, float)) \
                            and kw.value.value >= budget:
                        bad.append(f"{path.name}:{call.lineno} {fn.name}: {kw.value.value} s "
                                   f">= {budget:.0f} s")
    assert not bad, bad
