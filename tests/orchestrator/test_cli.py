"""The `sweep` command as a user runs it."""

import json
import os
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
