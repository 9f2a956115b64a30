"""The shape of the code: import layers (import-linter, configured in pyproject.toml), no module cycle, a
torch-free driver and executors, and small functions."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["orchestrator", "trainers", "cluster", "analysis"]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in done.stdout


@pytest.mark.parametrize("module,violation,contracts", [
    ("cluster/local.py", "import orchestrator.grid", ["layers"]),                       # an executor reaching up
    ("cluster/local.py", "import torch", ["torch and its stack"]),                      # torch outside trainers
    ("analysis/summary.py", "from mlflow.tracking import MlflowClient", ["only the runtime"]),  # MLflow outside it
    ("trainers/trial.py", "import orchestrator.runtime.store", ["never the runtime"]),  # the body writing a run
    # I/O helpers in the core: a sibling layer, and the core's own rule
    ("orchestrator/core/spec.py", "import orchestrator.infra.files", ["layers", "the core is data"]),
])
def test_a_crossed_layer_fails_the_lint(tmp_path, module, violation, contracts):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{violation}  # a deliberate violation\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if "BROKEN" in line]
    assert len(broken) == len(contracts) and all(c in line for c, line in zip(contracts, broken)), done.stdout[-3000:]


def test_no_module_imports_itself_through_others():
    """Every import counts, function-level ones too: no lazy import hides a cycle."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = sorted(graph.modules)
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(module):  # Tarjan's strongly connected components
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in graph.modules or other.split(".")[0] not in PACKAGES:
                continue
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in modules:
        if module not in index and module.split(".")[0] in PACKAGES:
            visit(module)
    assert cycles == []


def test_the_driver_and_executors_import_without_torch():
    code = ("import sys, cluster, orchestrator.pipeline, orchestrator.cli; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'submitit', 'ray') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


# The losses keep the one signature docs/methods.md gives every loss: six per-sequence tensors and the method's
# hyperparameters as keywords (TRL's implementations, the test oracle, take the same tensors).
LOSS_SIGNATURE = {"trainers/losses.py"}


def _functions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield str(path.relative_to(ROOT)), node


def _parameters(node) -> int:
    a = node.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    count = len(names) + bool(a.vararg) + bool(a.kwarg)
    return count - (names[0].arg in ("self", "cls") if names else 0)


def test_functions_fit_a_screen_and_take_few_parameters():
    long = [f"{file}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for file, n in _functions()
            if n.end_lineno - n.lineno + 1 > 60]
    wide = [f"{file}:{n.lineno} {n.name} ({_parameters(n)} parameters)" for file, n in _functions()
            if _parameters(n) > 7 and file not in LOSS_SIGNATURE]
    assert long == [] and wide == []
