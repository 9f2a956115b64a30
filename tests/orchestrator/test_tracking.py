"""The MLflow client layer: which store a URI names."""

from orchestrator.runtime.store import absolute_uri, sqlite_path
from orchestrator.runtime.sweep_runs import SweepTracker


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
