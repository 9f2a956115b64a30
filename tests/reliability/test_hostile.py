"""Hostile inputs and corrupted state (issue 15): no silently wrong numbers, no tracebacks, no hangs. One test
per case of the adversarial pass; each failed on the code before its fix. The bad-input cases that are a spec
file alone also live in the corpus (tests/reliability/bad_input/)."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from reliability_support import finished_trials

from orchestrator.core.spec_file import SpecError, parse_spec
from orchestrator.core.tags import TAG_CHECKPOINT, TAG_REF_CACHE
from orchestrator.grid import plan_sweep
from orchestrator.infra.files import write_file_atomically, write_folder_atomically
from orchestrator.pipeline import SweepError, run_sweep
from orchestrator.progress import QUIET
from orchestrator.runtime.sweep_runs import SweepTracker

# The quickstart shrunk: what the adversarial pass used as its base spec.
BASE = """\
name: {name}
workdir: {workdir}
model: {{kind: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2}}
data: {{kind: synthetic, n_train: 200, n_eval: 16}}
training: {{batch_size: 16, max_length: 48, log_every: 5}}
evaluation: {{num_prompts: 16, max_new_tokens: 16}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [{betas}], learning_rate: [1.0e-4], epochs: [1]}}}}
"""
SWEEP = [sys.executable, "-m", "orchestrator.cli"]


def base_spec(tmp_path: Path, name: str = "hostile", betas: str = "0.1, 0.3", workdir: str = "work") -> str:
    return BASE.format(name=name, workdir=tmp_path / workdir, betas=betas)


def sweep(tmp_path: Path, text: str, db: str = "mlflow.db"):
    uri = f"sqlite:///{tmp_path / db}"
    return uri, run_sweep(parse_spec(text), uri, output=QUIET)


def cli_run(args: list[str], cwd: Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(SWEEP + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)


def one_line_error(done: subprocess.CompletedProcess, code: int) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len([line for line in lines if line.startswith("error:")]) == 1, done.stderr
    return next(line for line in lines if line.startswith("error:"))


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


# ---- 1-2, 5, 6: files later trials trust ----------------------------------------------------------------
def test_01_a_reference_cache_with_flipped_numbers_is_recomputed_never_trusted(tmp_path):
    uri, first = sweep(tmp_path, base_spec(tmp_path))
    want = {r.run_name: r.metrics["mean_score"] for r in SweepTracker(uri, "hostile").trials("dpo")}
    (cache,) = (tmp_path / "work" / "cache" / "ref_logps").glob("*.pt")
    stored = torch.load(cache)
    torch.save({"chosen": stored["chosen"] + 5.0, "rejected": stored["rejected"]}, cache)  # reads fine, wrong
    uri2, _ = sweep(tmp_path, base_spec(tmp_path), db="second.db")  # same workdir and keys, a new store
    runs = SweepTracker(uri2, "hostile").trials("dpo")
    assert sorted(r.tags[TAG_REF_CACHE] for r in runs) == ["hit", "miss"]  # the first recomputes, the next reads
    assert {r.run_name: r.metrics["mean_score"] for r in runs} == want


def test_02_a_damaged_sft_checkpoint_stops_the_sweep_naming_the_file(tmp_path):
    uri, _ = sweep(tmp_path, base_spec(tmp_path))
    sft = SweepTracker(uri, "hostile").trials("sft")[0]
    weights = Path(sft.tags[TAG_CHECKPOINT]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # the last tensor's bytes, flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(SweepError, match=r"model\.safetensors changed since it was written"):
        sweep(tmp_path, base_spec(tmp_path, betas="0.1, 0.3, 0.5"))  # a new DPO trial would start from it


def test_05_a_rerun_sft_trial_writes_its_weights_again(tmp_path):
    uri, _ = sweep(tmp_path, base_spec(tmp_path))
    tracker = SweepTracker(uri, "hostile")
    sft = tracker.trials("sft")[0]
    checkpoint = Path(sft.tags[TAG_CHECKPOINT])
    (checkpoint / "model.safetensors").unlink()
    tracker.client.delete_run(sft.run_id)  # as the error a preference stage then gives advises
    sweep(tmp_path, base_spec(tmp_path))
    assert (checkpoint / "model.safetensors").is_file()


def test_06_a_truncated_samples_artifact_is_one_line_naming_the_run(tmp_path):
    spec = write_spec(tmp_path, base_spec(tmp_path))
    uri, _ = sweep(tmp_path, spec.read_text())
    run = SweepTracker(uri, "hostile").trials("dpo")[0]
    artifact = Path(mlflow.tracking.MlflowClient(uri).get_run(run.run_id).info.artifact_uri.removeprefix("file://"))
    samples = artifact / "samples.json"
    samples.write_text(samples.read_text()[:100])
    line = one_line_error(cli_run(["report", str(spec), "--tracking-uri", uri, "--no-progress"], tmp_path), 1)
    assert run.run_id in line and "samples.json is damaged" in line


# ---- 3, 12, 13, 15, 16: specs ---------------------------------------------------------------------------
def test_03_a_value_given_as_number_and_as_text_is_one_trial_refused(tmp_path):
    with pytest.raises(SpecError) as info:
        parse_spec(base_spec(tmp_path, betas='0.1, "0.1"'), "s.yaml")
    assert info.value.path == "stages.methods.dpo.grid.beta[1]" and "the same value" in info.value.message


def test_12_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "x:\n" + "\n".join("  " + line for line in levels) + "\n" + base_spec(tmp_path).replace(
        "beta: [0.1, 0.3]", "beta: *a8")
    spec = write_spec(tmp_path, text)
    line = one_line_error(cli_run(["plan", str(spec)], tmp_path, timeout=60), 2)
    assert "expands to" in line and "anchors and aliases" in line


def test_13_a_grid_of_a_million_points_is_refused_unless_raised(tmp_path):
    betas = ", ".join(f"{0.001 * (i + 1):.3f}" for i in range(1000))
    text = base_spec(tmp_path, betas=betas).replace("learning_rate: [1.0e-4]", "learning_rate: [" + ", ".join(
        f"{1e-5 * (i + 1):.2e}" for i in range(1000)) + "]")
    spec = write_spec(tmp_path, text)
    line = one_line_error(cli_run(["plan", str(spec)], tmp_path, timeout=60), 2)
    assert "1,000,002 trials, more than max_trials (10,000)" in line and "--max-trials" in line
    small = write_spec(tmp_path, base_spec(tmp_path, betas=", ".join(f"{0.01 * (i + 1):.2f}" for i in range(30))))
    assert "32 trials, more than max_trials (20)" in one_line_error(
        cli_run(["plan", str(small), "--max-trials", "20"], tmp_path), 2)
    assert cli_run(["plan", str(small), "--max-trials", "40"], tmp_path).returncode == 0


@pytest.mark.parametrize("field,value", [("learning_rate", ".inf"), ("beta", ".nan"), ("beta", ".inf")])
def test_15_non_finite_numbers_are_refused_at_load(tmp_path, field, value):
    text = base_spec(tmp_path).replace(f"{field}: [{'0.1, 0.3' if field == 'beta' else '1.0e-4'}]",
                                       f"{field}: [{value}]")
    with pytest.raises(SpecError, match="finite number"):
        parse_spec(text, "s.yaml")


def test_16_smoke_shrinks_the_data_too(tmp_path):
    text = base_spec(tmp_path).replace("n_train: 200", "n_train: 10000000")
    stages = plan_sweep(parse_spec(text), smoke=True)
    assert {t.data.n_train for s in stages for t in s.trials} == {30 * 16}
    assert {t.data.n_eval for s in stages for t in s.trials} == {16}


# ---- 4, 8, 9: the tracking store ------------------------------------------------------------------------
def test_04_two_drivers_and_a_status_poll_on_a_new_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    specs = []
    for name in ("left", "right"):
        (tmp_path / name).mkdir()
        specs.append(write_spec(tmp_path / name, base_spec(tmp_path, name=name, betas="0.1", workdir=f"work-{name}")))
    drivers = [subprocess.Popen(SWEEP + ["run", str(s), "--smoke", "--no-progress", "--tracking-uri", uri], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in specs]
    polls = []
    while any(d.poll() is None for d in drivers):
        polls.append(cli_run(["status", str(specs[0]), "--smoke", "--tracking-uri", uri], tmp_path))
    outputs = [d.communicate() for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outputs
    for poll in polls:  # "no store yet" or the table; never MLflow's table setup
        assert poll.returncode in (0, 1) and "Traceback" not in poll.stderr, poll.stderr[-2000:]


def _as_nobody(command: list[str]) -> list[str]:
    """Run as an unprivileged user when root (whose permission override would make any store writable)."""
    return command if os.geteuid() else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + command


@pytest.mark.parametrize("what", ["file", "folder"])
def test_08_a_read_only_store_is_one_line_and_nothing_written(tmp_path, what):
    spec = write_spec(tmp_path, base_spec(tmp_path))
    uri, _ = sweep(tmp_path, spec.read_text())
    tmp_path.chmod(0o755)
    for path in tmp_path.rglob("*"):
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    for parent in tmp_path.parents:  # pytest's temp folders are 0700
        if parent.stat().st_mode & stat.S_IXOTH == 0 and str(parent).startswith("/tmp"):
            parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    (tmp_path / "mlflow.db").chmod(0o444)
    if what == "folder":
        tmp_path.chmod(0o555)
    env = {**os.environ, "HOME": "/tmp"}
    try:
        for args in (["run", str(spec), "--no-progress"], ["report", str(spec), "--no-progress", "--out", "/tmp/x.html"]):
            done = subprocess.run(_as_nobody(SWEEP + args + ["--tracking-uri", uri]), cwd=tmp_path, capture_output=True,
                                  text=True, timeout=120, env=env)
            assert "read-only" in one_line_error(done, 1)
        assert not Path("/tmp/x.html").exists()
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.parametrize("command", ["status", "report", "run"])
def test_09_an_unreachable_server_is_one_line_within_seconds(tmp_path, command):
    spec = write_spec(tmp_path, base_spec(tmp_path))
    args = [command, str(spec), "--tracking-uri", "http://127.0.0.1:1"] + (["--no-progress"] if command != "status" else [])
    assert "does not answer" in one_line_error(cli_run(args, tmp_path, timeout=60), 1)


# ---- 7, 11, 17, 18, 19: inputs preflight reads ----------------------------------------------------------
def test_07_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "work").write_text("not a folder")
    spec = write_spec(tmp_path, base_spec(tmp_path))
    for command in ("plan", "run"):
        assert "workdir: " in one_line_error(cli_run([command, str(spec)], tmp_path), 2)


def _hh_rows(n: int, start: int = 0) -> list[dict]:
    return [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a good answer {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a bad answer {i}"} for i in range(start, start + n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hf_spec(tmp_path: Path, data: str) -> str:
    """A real-text spec: a local model folder whose tokenizer preflight reads (the task tokenizer saved as one)."""
    from transformers import LlamaConfig

    from trainers.models import build_task_tokenizer

    folder = tmp_path / "model"
    build_task_tokenizer().save_pretrained(folder)
    LlamaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(folder)
    return base_spec(tmp_path).replace("model: {kind: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, "
                                       "num_heads: 2}", f"model: {{kind: hf, path: {folder}}}").replace(
        "data: {kind: synthetic, n_train: 200, n_eval: 16}", f"data: {data}")


def test_11_an_eval_source_smaller_than_num_prompts_is_refused(tmp_path):
    train, held_out = _jsonl(tmp_path / "train.jsonl", _hh_rows(40)), _jsonl(tmp_path / "eval.jsonl", _hh_rows(5, 100))
    spec = write_spec(tmp_path, _hf_spec(tmp_path, f"{{kind: hh_rlhf, path: {train}, eval: {{kind: hh_rlhf, "
                                                   f"path: {held_out}}}}}"))
    line = one_line_error(cli_run(["plan", str(spec)], tmp_path), 2)
    assert "data.eval.path: 5 usable evaluation pairs, fewer than evaluation.num_prompts (16)" in line


def test_17_an_over_long_row_is_refused_or_skipped_and_counted(tmp_path):
    rows = _hh_rows(40)
    rows[7]["chosen"] = rows[7]["chosen"] + " very" * 60_000  # 300,000 characters in one response
    data = _jsonl(tmp_path / "hh.jsonl", rows)
    spec = write_spec(tmp_path, _hf_spec(tmp_path, f"{{kind: hh_rlhf, path: {data}, n_eval: 16}}"))
    line = one_line_error(cli_run(["plan", str(spec)], tmp_path), 2)
    assert "hh.jsonl:8: a text of 300," in line and "over data.max_row_chars (200,000)" in line
    spec.write_text(spec.read_text().replace(f"path: {data},", f"path: {data}, on_malformed: skip,"))
    done = cli_run(["plan", str(spec)], tmp_path)
    assert done.returncode == 0 and "1 malformed rows skipped" in done.stdout, done.stderr


def test_18_responses_cut_away_and_identical_responses_are_refused(tmp_path):
    spec = write_spec(tmp_path, base_spec(tmp_path).replace("max_length: 48", "max_length: 6"))
    line = one_line_error(cli_run(["plan", str(spec)], tmp_path), 2)
    assert "training.max_length" in line and "keep at most one token of a response" in line
    rows = _hh_rows(40)
    rows[3]["rejected"] = rows[3]["chosen"]
    data = _jsonl(tmp_path / "same.jsonl", rows)
    spec.write_text(_hf_spec(tmp_path, f"{{kind: hh_rlhf, path: {data}, n_eval: 16}}"))
    assert "same.jsonl:4: 'chosen' and 'rejected' are the same response" in one_line_error(
        cli_run(["plan", str(spec)], tmp_path), 2)


def test_19_the_tiny_model_with_real_text_is_refused(tmp_path):
    data = _jsonl(tmp_path / "hh.jsonl", _hh_rows(40))
    spec = write_spec(tmp_path, base_spec(tmp_path).replace("data: {kind: synthetic, n_train: 200, n_eval: 16}",
                                                            f"data: {{kind: hh_rlhf, path: {data}, n_eval: 16}}"))
    assert "reads only the synthetic task's vocabulary" in one_line_error(cli_run(["plan", str(spec)], tmp_path), 2)


# ---- 10, 14, 20: signals and the UI --------------------------------------------------------------------
def test_10_a_port_in_use_is_refused_before_any_url(tmp_path):
    write_spec(tmp_path, base_spec(tmp_path))
    (tmp_path / "mlflow.db").touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli_run(["ui", "--port", str(port)], tmp_path)
    assert f"port {port} on 127.0.0.1 is in use" in one_line_error(done, 1) and "http://" not in done.stdout


def test_20_a_ui_on_every_interface_asks_for_the_stores_login_and_sigterm_stops_its_server(tmp_path):
    uri, _ = sweep(tmp_path, base_spec(tmp_path))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen(SWEEP + ["ui", "--host", "0.0.0.0", "--port", str(port), "--tracking-uri", uri],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ui.stdout.readline()  # printed only once the UI answers
    assert f"at http://0.0.0.0:{port}" in line
    login = ui.stdout.readline()
    config = tmp_path / "mlflow-auth" / "credentials.ini"
    assert "it asks for a login: log in as 'posweep-admin'" in login and str(config) in login
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5")
    assert refused.value.code == 401
    ui.send_signal(signal.SIGTERM)
    ui.wait(60)
    password = next(x.split("=", 1)[1].strip() for x in config.read_text().splitlines() if x.startswith("admin_pass"))
    assert password not in line + login + ui.stdout.read() + ui.stderr.read()
    with socket.socket() as again:  # the MLflow server went with it: the port is free (bar TIME_WAIT of the request)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_14_sigterm_closes_the_running_trial_killed(tmp_path):
    spec = write_spec(tmp_path, base_spec(tmp_path).replace("n_train: 200", "n_train: 4000"))
    db = tmp_path / "mlflow.db"
    driver = subprocess.Popen(SWEEP + ["run", str(spec), "--no-progress", "--tracking-uri", f"sqlite:///{db}"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while finished_trials(db) < 1 and time.monotonic() < deadline:  # the untrained baseline; SFT then runs
        time.sleep(0.5)
    time.sleep(3)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(120) == 130, driver.stdout.read()
    runs = mlflow.tracking.MlflowClient(f"sqlite:///{db}").search_runs(
        [e.experiment_id for e in mlflow.tracking.MlflowClient(f"sqlite:///{db}").search_experiments()])
    assert "RUNNING" not in {r.info.status for r in runs}
    assert "KILLED" in {r.info.status for r in runs}


# ---- 21, 22: what the files and the report hold ---------------------------------------------------------
def test_21_files_and_folders_are_created_with_the_process_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_file_atomically(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("{}"))
        folder = write_folder_atomically(tmp_path / "model", lambda tmp: (tmp / "w").write_text("w"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_22_the_markdown_report_escapes_data_text():
    from analysis.report import ReportInputs, render

    frame = pd.DataFrame([
        {"stage": "dpo", "method": "dpo", "run_name": "dpo <b>bold</b>", "status": "FAILED", "trial_key": "k1",
         "failure": "ValueError: bad prompt <script>alert(1)</script>", "mean_score": float("nan")},
        {"stage": "dpo", "method": "dpo", "run_name": "dpo ok", "status": "FINISHED", "trial_key": "k2",
         "failure": "", "mean_score": 1.0, "win_vs_chosen": 0.5, "win_vs_sft": 0.5, "kl": 0.1, "length": 5.0,
         "wall_seconds": 1.0, "gpu_hours": 0.0, "device_hours": 0.0, "beta": 0.1}])
    samples = pd.DataFrame([{"trial_key": "k2", "prompt_id": "p", "score": 1.0, "length": 5, "kl": 0.1,
                             "sft_score": 0.5, "chosen_score": 0.7, "method": "dpo"}])
    text = render(ReportInputs(sweep="s", frame=frame, samples=samples, methods=["dpo"], sft=None,
                               hyperparameters={"dpo": ["beta"]}), "md", n_boot=10)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
