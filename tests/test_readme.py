"""The README states the same commands CI runs and the same methods the code registers."""

import re
from pathlib import Path

from trainers.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    install, tests = blocks[0].strip(), blocks[1].strip()
    assert "torch==2.13.0" in install and "sweep run sweeps/quickstart.yaml" in install
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert install in ci_lines and tests in ci_lines


def test_readme_method_table_matches_the_registry():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert listed == {name for name, m in METHODS.items() if m.kind == "preference"}


def test_readme_method_rows_name_every_hyperparameter():
    """Hyperparameters are declared once (trainers/methods.py); the README's table must list each of them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", section, re.M)}
    for name, method in METHODS.items():
        if method.kind == "preference":
            missing = [f for f in method.params.model_fields if f"`{f}`" not in rows[name].split("|")[-2]]
            assert not missing, f"README row of {name} does not name {missing}"


def _section(readme: str, title: str) -> str:
    return readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_readme_executor_and_search_examples_are_valid_specs():
    """The YAML a user copies from the README loads: every executor example, and the search example."""
    import yaml
    from pydantic import TypeAdapter

    from orchestrator.spec import CostSpec, ExecutorSpec, parse_spec

    readme = (ROOT / "README.md").read_text()
    executors = re.findall(r"```yaml\n(.*?)\n```", _section(readme, "Running on Ray and SLURM"), re.S)[0]
    chunks = re.split(r"\n(?=executor:)", executors)
    kinds = [TypeAdapter(ExecutorSpec).validate_python(yaml.safe_load(c)["executor"]).kind for c in chunks]
    assert kinds == ["local", "ray", "slurm"]
    search = re.findall(r"```yaml\n(.*?)\n```", _section(readme, "Search beyond grids"), re.S)[0]
    spec = parse_spec("name: s\n" + search.replace("  methods:\n", "  sft: {grid: {learning_rate: [0.001]}}\n"
                                                   "  methods:\n", 1))
    assert spec.search.kind == "optuna" and set(spec.stages.methods["simpo"].space) == {"learning_rate", "beta", "gamma"}
    cost = re.findall(r"```yaml\n(.*?)\n```", _section(readme, "Cost accounting"), re.S)[0]
    assert CostSpec(**yaml.safe_load(cost)["cost"]).gpus_per_trial == 8
