"""The README states the same commands CI runs and the same methods the code registers; the YAML and the
commands that README and docs/ show are valid."""

import re
import shlex
from pathlib import Path

import pytest

from orchestrator.core.methods import METHODS

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
    """Hyperparameters are declared once (orchestrator/core/methods.py); the README's table lists each of them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", section, re.M)}
    for name, method in METHODS.items():
        if method.kind == "preference":
            missing = [f for f in method.params.model_fields if f"`{f}`" not in rows[name].split("|")[-2]]
            assert not missing, f"README row of {name} does not name {missing}"


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0] if f"## {title}" in text else text


def _doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def test_readme_stays_the_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert (ROOT / page).is_file(), page


def test_documented_executor_search_and_cost_examples_are_valid_specs():
    """The YAML a user copies from docs/ loads: every executor example, the search example, the cost example."""
    import yaml
    from pydantic import TypeAdapter

    from orchestrator.core.spec import CostSpec, ExecutorSpec
    from orchestrator.core.spec_file import parse_spec

    executors = re.findall(r"```yaml\n(.*?)\n```", _doc("executors.md"), re.S)[0]
    chunks = re.split(r"\n(?=executor:)", executors)
    kinds = [TypeAdapter(ExecutorSpec).validate_python(yaml.safe_load(c)["executor"]).kind for c in chunks]
    assert kinds == ["local", "local", "ray", "slurm"]  # in the driver; 4 worker processes
    search = re.findall(r"```yaml\n(.*?)\n```", _section(_doc("spec.md"), "Search beyond grids"), re.S)[0]
    spec = parse_spec("name: s\n" + search.replace("  methods:\n", "  sft: {grid: {learning_rate: [0.001]}}\n"
                                                   "  methods:\n", 1))
    assert spec.search.kind == "optuna" and set(spec.stages.methods["simpo"].space) == {"learning_rate", "beta", "gamma"}
    cost = re.findall(r"```yaml\n(.*?)\n```", _doc("cost.md"), re.S)[0]
    assert CostSpec(**yaml.safe_load(cost)["cost"]).gpus_per_trial == 8


def _shown_commands() -> list[tuple[str, str]]:
    """(file, command) for every `sweep ...` command that README.md and docs/ show in backticks or bash blocks."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for command in re.findall(r"`(sweep (?:run|plan|status|report|ui)\b[^`]*)`", text):
            if "[" not in command and "|" not in command:  # usage lines with [options] are tested below
                out.append((path.name, command))
    return out


@pytest.mark.parametrize("where,command", _shown_commands())
def test_every_sweep_command_shown_parses(where, command):
    """Each command a page shows is one the CLI takes (its subcommand and flags exist)."""
    from orchestrator.cli import build_parser

    args = shlex.split(command)[1:]
    build_parser().parse_args([a for a in args if a not in ("…", "...")])


def test_the_readme_command_table_lists_every_subcommand_and_flag():
    from orchestrator.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    table = _section(readme, "Commands")
    intro = table.split("| command |", 1)[0]  # flags every command takes are named once, above the table
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    for name, sub in subcommands.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `sweep {name}"))
        flags = {o for action in sub._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
        missing = sorted(f for f in flags if f not in row and f not in intro)
        assert not missing, f"sweep {name}: {missing} not in the README's command table"


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written, in an empty folder: a sweep, its frames and its report."""
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)\n```", readme, re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert scope["outcome"].failed == 0 and scope["outcome"].ran == 4
    # settings that learn: both DPO runs above SFT (an earlier example collapsed to -6.68 against SFT's 0.309)
    summary = scope["outcome"].summary.set_index("stage")
    assert (scope["trials"]["mean_score"] > summary.loc["sft", "mean_score"]).all(), scope["trials"]["mean_score"]
    import pandas as pd
    with pd.option_context("display.width", 40):  # printed whole, not cut to `mean_score ... length`
        assert "..." not in str(scope["outcome"].summary) and "length" in str(scope["outcome"].summary)
    assert len(scope["trials"]) == 2 and set(scope["trials"]["method"]) == {"dpo"}
    assert len(scope["samples"]) == 2 * 64
    assert scope["path"].is_file() and scope["run_id"]


def test_what_the_commands_write_is_ignored_by_git():
    """Run from a clone, the commands leave nothing for `git status` to list: stores, workdirs, reports, logs."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["mlflow.db", "mlartifacts/1/x", "posweep_runs/trials/x", "quickstart-report.html", "report.md",
               "mlflow-server.log", "mlflow-ui.log", "mlflow.db.lock"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(written), done.stdout
