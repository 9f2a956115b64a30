"""Security defaults: servers we start listen on 127.0.0.1; specs are read with a safe loader and no spec
string is evaluated or unpickled; trust_remote_code only when the spec says so, with a warning; spec paths are
resolved and reported; environment variables and tokens never reach MLflow params, tags or the store."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from orchestrator import cli
from orchestrator.runtime.server import mlflow_server
from orchestrator.runtime.sweep_runs import SweepTracker

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "trainers", "cluster", "analysis")
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"

SMOKE = """\
name: secrets
workdir: work
data: {kind: synthetic, n_train: 64, n_eval: 16}
training: {batch_size: 16, max_length: 40}
evaluation: {num_prompts: 16, max_new_tokens: 8}
stages:
  sft: {grid: {learning_rate: [3.0e-3]}}
  methods:
    dpo: {grid: {beta: [0.1], learning_rate: [3.0e-4]}}
"""


def _listening(port: int) -> list[str]:
    """Local addresses (hex ip:port, as /proc/net/tcp writes them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                found.append(local)
    return found


def test_the_mlflow_server_listens_on_loopback_only(tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}") as url:
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}"
        assert _listening(port) == [f"0100007F:{port:04X}"]  # 127.0.0.1, and no 0.0.0.0 or :: listener


def test_sweep_ui_defaults_to_loopback():
    args = cli.build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"


def _calls(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.append(func.id if isinstance(func, ast.Name) else
                         f"{getattr(func.value, 'id', '?')}.{func.attr}" if isinstance(func, ast.Attribute) else "?")
    return names


def test_no_eval_exec_pickle_or_unsafe_yaml_in_the_packages():
    """Static: none of these is called anywhere in the library (the training-state checkpoint is read with
    torch.load(weights_only=True), which refuses arbitrary objects)."""
    forbidden = {"eval", "exec", "compile", "pickle.load", "pickle.loads", "yaml.unsafe_load", "yaml.full_load",
                 "os.system", "marshal.loads"}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            assert not forbidden & set(_calls(tree)), path
            text = path.read_text()
            assert "weights_only=False" not in text and "shell=True" not in text, path
            for match in re.finditer(r"yaml\.load\((.*)\)", text):
                assert "Loader=_SpecLoader" in match.group(1), path


def test_trust_remote_code_only_when_set_and_then_with_a_warning(tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig

    from trainers.models import build_task_tokenizer

    model = tmp_path / "model"
    build_task_tokenizer().save_pretrained(model)
    LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    for trust in (False, True):
        spec.write_text(SMOKE + f"model: {{kind: hf, path: model, trust_remote_code: {str(trust).lower()}}}\n")
        assert cli.main(["plan", str(spec)]) == 0
        out, err = capsys.readouterr()
        warned = "warning: model.trust_remote_code is true: the model repository's own Python code runs" in err
        assert warned == trust
        # paths from the spec, resolved and reported
        assert f"model: {model.resolve()} (plain-text prompts)" in out and f"workdir: {(tmp_path / 'work')}" in out
    assert not (tmp_path / "mlflow.db").exists()


def test_a_token_in_the_environment_is_never_logged(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SMOKE)
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "WANDB_API_KEY": FAKE_TOKEN,
           "MY_SECRET": FAKE_TOKEN, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "secrets", create=False)
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert len(runs) >= 5  # 3 trials, their stages
    for run in runs:
        logged = " ".join(f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
        assert FAKE_TOKEN not in logged and "HF_TOKEN" not in logged and "MY_SECRET" not in logged, run.info.run_name
    for path in tmp_path.rglob("*"):  # the store itself, artifacts, samples, checkpoints, logs
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert FAKE_TOKEN not in proc.stdout + proc.stderr


def _request(url: str, method: str = "GET", body: dict | None = None) -> int:
    """The HTTP status of one request without credentials."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_server_beyond_loopback_asks_for_the_stores_login_and_keeps_it_secret(tmp_path):
    from orchestrator.runtime.server import AUTH_FOLDER, CREDENTIAL_VARIABLES
    from orchestrator.runtime.store import store_client

    assert not any(os.environ.get(k) for k in CREDENTIAL_VARIABLES)
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", host="0.0.0.0") as url:
        client = store_client(url)  # this process's clients hold the login for the block
        experiment = client.create_experiment("guarded")
        run = client.create_run(experiment).info.run_id
        api = f"http://127.0.0.1:{url.rsplit(':', 1)[1]}/api/2.0/mlflow"
        assert _request(f"{api}/runs/get?run_id={run}") == 401
        assert _request(f"{api}/runs/create", "POST", {"experiment_id": experiment}) == 401
        assert _request(f"{api}/experiments/delete", "POST", {"experiment_id": experiment}) == 401
        assert _request(f"{api}/artifacts/list?run_id={run}") == 401
        assert client.get_experiment(experiment).lifecycle_stage == "active"
    assert not any(os.environ.get(k) for k in CREDENTIAL_VARIABLES)  # the environment is as it was
    config = tmp_path / AUTH_FOLDER / "credentials.ini"
    assert oct(config.stat().st_mode & 0o777) == "0o600" and oct(config.parent.stat().st_mode & 0o777) == "0o700"
    password = next(x.split("=", 1)[1].strip() for x in config.read_text().splitlines() if x.startswith("admin_pass"))
    assert len(password) >= 24
    for log in tmp_path.glob("*.log"):
        assert password not in log.read_text(errors="replace")
