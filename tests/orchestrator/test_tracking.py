"""The MLflow client layer: which store a URI names, and a PostgreSQL store."""

import functools

from cluster.probe import probe_trial
from orchestrator.cli import main
from orchestrator.core.spec_file import parse_spec
from orchestrator.pipeline import run_sweep
from orchestrator.progress import Output
from orchestrator.runtime.store import absolute_uri, redacted, sqlite_path
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.probe import noop_sweep_yaml


def test_a_relative_sqlite_uri_names_the_store_of_the_current_folder(tmp_path, monkeypatch):
    """sqlite:///mlflow.db after a chdir is another store: a client cached by the URI's text wrote the second
    folder's sweep into the first folder's store (the README's Python example failed so when it ran after
    another test in the same process)."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    SweepTracker("sqlite:///mlflow.db", "sweep-a")
    monkeypatch.chdir(second)
    SweepTracker("sqlite:///mlflow.db", "sweep-b")
    reader = SweepTracker("sqlite:///mlflow.db", "sweep-b", create=False)  # readers require an existing store

    assert (second / "mlflow.db").is_file()
    assert reader.client.get_experiment_by_name("sweep-a") is None
    monkeypatch.chdir(first)
    assert SweepTracker("sqlite:///mlflow.db", "sweep-a", create=False).client.get_experiment_by_name(
        "sweep-b") is None


def test_absolute_uri_resolves_local_stores_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sqlite_path(absolute_uri("sqlite:///mlflow.db")) == tmp_path / "mlflow.db"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_password_in_a_database_uri_is_never_printed():
    assert redacted("postgresql://posweep:s3cret@db.lab:5432/sweeps") == "postgresql://posweep:***@db.lab:5432/sweeps"
    assert redacted("postgresql+psycopg://u:p@h/d") == "postgresql+psycopg://u:***@h/d"
    assert redacted("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_a_sequential_sweep_on_postgresql_keeps_its_artifacts_in_the_workdir_and_prints_no_password(
        tmp_path, postgres_uri, capsys):
    """tracking.uri postgresql://: the driver writes the database itself; artifacts (a database has no folder)
    under WORKDIR/mlflow-store/mlartifacts; the login's password appears in no line; `sweep ui` beyond loopback
    is refused (its login would need a folder beside the store)."""
    uri = postgres_uri.replace("posweep@", "posweep:s3cret@")  # trust authentication: the password is not checked
    messages: list[str] = []
    spec = parse_spec(noop_sweep_yaml("pg", tmp_path / "work", n_beta=1, n_lr=1))
    outcome = run_sweep(spec, uri, output=Output(messages.append, bar=False),
                        trial_fn=functools.partial(probe_trial, steps=1, prompts=4))
    assert outcome.ran == 5 and outcome.failed == 0
    assert not any("s3cret" in m for m in messages) and any("posweep:***@" in m for m in messages)
    records = SweepTracker(uri, "pg").trials()
    assert sorted(r.status for r in records) == ["FINISHED"] * 5
    assert all(r.artifact_uri.startswith((tmp_path / "work" / "mlflow-store" / "mlartifacts").as_uri())
               for r in records)
    assert main(["ui", "--tracking-uri", uri, "--host", "0.0.0.0", "--port", "5999"]) == 1
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err and "serve it on 127.0.0.1" in captured.err
