"""The `sweep` command as a user runs it."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.runtime.sweep_runs import SweepTracker

REPO = Path(__file__).resolve().parents[2]


def sweep_cmd(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_plan_prints_table_and_count_and_runs_nothing(tmp_path):
    proc = sweep_cmd("plan", str(REPO / "sweeps" / "simpo.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stage simpo (96 trials)" in proc.stdout and "99 trials: 1 untrained baseline, 2 SFT, 96 preference" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_plan_defaults_to_the_builtin_quickstart(tmp_path):
    proc = sweep_cmd("plan", "--smoke", cwd=tmp_path)
    assert proc.returncode == 0 and "sweep 'quickstart' (smoke)" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_sweep_on_localhost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    SweepTracker(uri, "browse-me")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--tracking-uri", uri, "--port",
                             str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # stdout: our lines only (the server logs to stderr)
    try:
        assert f"at http://127.0.0.1:{port}" in proc.stdout.readline()
        body = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and body is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                    data=json.dumps({"max_results": 10}).encode(), headers={"Content-Type": "application/json"})
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow UI did not answer within 90 s"
        assert "browse-me" in [e["name"] for e in body["experiments"]]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_ui_keeps_the_servers_output_out_of_the_terminal(tmp_path):
    """The terminal gets the link once the server answers and nothing else: MLflow's and uvicorn's lines go to
    mlflow-ui.log beside the store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    SweepTracker(uri, "quiet")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--tracking-uri", uri, "--port",
                             str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}" in first and str(tmp_path / "mlflow-ui.log") in first
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert err == "", err
    assert (tmp_path / "mlflow-ui.log").stat().st_size > 0


@pytest.mark.slow
def test_quickstart_sweep_learns(tmp_path):
    """The issue's bar: SFT clearly above the untrained model, a preference method above SFT."""
    proc = sweep_cmd("run", str(REPO / "sweeps" / "quickstart.yaml"), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "quickstart").trials()
    assert len(records) == 21 and all(r.status == "FINISHED" for r in records)
    best = {}
    for r in records:
        best[r.stage] = max(best.get(r.stage, float("-inf")), r.metrics["mean_score"])
    assert best["sft"] > best["base"] + 3
    assert max(best["dpo"], best["simpo"], best["ln_dpo"]) > best["sft"]
    assert "best run" in proc.stdout and "ln_dpo" in proc.stdout


def test_executor_flag_overrides_the_spec_with_that_kinds_defaults(tmp_path):
    from types import SimpleNamespace

    from orchestrator.cli import _load
    from orchestrator.core.spec import RayExecutorSpec, SlurmExecutorSpec
    from orchestrator.core.spec_file import SpecError

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: s\nstages: {sft: {grid: {learning_rate: [0.001]}}, methods: {dpo: {grid: "
                         "{beta: [0.1], learning_rate: [0.0001]}}}}\nexecutor: {kind: ray, num_cpus: 1}\n")
    load = lambda kind: _load(SimpleNamespace(spec=str(spec_file), executor=kind))  # noqa: E731
    assert load(None).executor == RayExecutorSpec(kind="ray", num_cpus=1)
    assert load("ray").executor == RayExecutorSpec(kind="ray", num_cpus=1)  # same kind: the spec's section stays
    assert load("slurm").executor == SlurmExecutorSpec(kind="slurm")
    assert load("local").executor.kind == "local"
    with pytest.raises(SpecError, match="unknown executor 'rey'.*did you mean 'ray'"):
        load("rey")


def test_run_checks_the_inputs_once(tmp_path, monkeypatch, capsys):
    """`sweep run` reads and tokenizes what the spec points at once (the command line's check, handed to api.run),
    not once in cli and again in api."""
    from orchestrator import api, cli
    from orchestrator.pipeline import SweepError

    calls = []
    real_check = api.check
    monkeypatch.setattr(api, "check", lambda spec: calls.append(spec) or real_check(spec))

    def stop_before_any_trial(*args, **kwargs):
        raise SweepError("stopped by the test")

    monkeypatch.setattr(api, "run_sweep", stop_before_any_trial)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == cli.EXIT_FAILED
    assert len(calls) == 1 and "stopped by the test" in capsys.readouterr().err


def test_set_and_only_change_the_plan_from_the_command_line(tmp_path):
    """--set FIELD=VALUE is validated like the YAML and changes the trial keys; --only keeps some preference
    methods (with the baseline and SFT they need)."""
    proc = sweep_cmd("plan", "quickstart", "--set", "stages.methods.dpo.grid.beta=[0.1, 0.3]",
                     "--set", "training.batch_size=8", "--only", "dpo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stage dpo (4 trials)" in proc.stdout and "stage simpo" not in proc.stdout
    assert "7 trials: 1 untrained baseline, 2 SFT, 4 preference" in proc.stdout
    refused = sweep_cmd("plan", "quickstart", "--set", "training.batch_size=0", cwd=tmp_path)
    assert refused.returncode == 2
    assert "error: --set training.batch_size=0: training.batch_size: Input should be greater than 0" in refused.stderr
    unknown = sweep_cmd("plan", "quickstart", "--only", "dp0", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "--only: unknown method of this sweep 'dp0' (did you mean 'dpo'?)" in unknown.stderr


def test_plan_fits_one_screen_names_the_data_and_prices_smollm2_as_measured(tmp_path):
    """The summary first (trial keys only with --trials), the hub dataset named, and a preference trial priced
    within 2x of the measured H100 throughput (benchmarks/RESULTS.md: 38,749 tokens/s for our DPO step on
    SmolLM2-135M in bf16, so an epoch of 20,000 pairs of 2 x 256 tokens takes 264 s)."""
    spec = str(REPO / "sweeps" / "paper" / "smollm2_hh.yaml")
    proc = sweep_cmd("plan", spec, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) <= 40, len(lines)
    assert not [line for line in lines if re.match(r"\s+[0-9a-f]{12}\s", line)]  # no trial keys by default
    assert "data: hub Anthropic/hh-rlhf (split train)" in proc.stdout
    assert "stage simpo (96 trials): beta 4 × gamma 6 × learning_rate 2 × epochs 2" in proc.stdout
    dpo = next(line.split() for line in lines if line.split()[:1] == ["dpo"] and "FLOPs" in line)
    per_epoch = float(dpo[3]) / 2  # the grid's trials train 1 or 3 epochs: 2 on average
    assert 264 / 2 <= per_epoch <= 264 * 2, per_epoch
    listed = sweep_cmd("plan", spec, "--trials", cwd=tmp_path)
    assert len([line for line in listed.stdout.splitlines() if re.match(r"\s+[0-9a-f]{12}\s", line)]) == 143
