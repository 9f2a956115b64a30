import os

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks_between_tests():
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which every later `sweep` subprocess would then
    use as its default store: a test that sets it must not move the next test's sweep."""
    yield
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster for the session (tests/local_postgres.py); its URI prefix."""
    import local_postgres

    with local_postgres.postgres_cluster() as server:
        yield server


@pytest.fixture
def postgres_uri(postgres_server):
    """A fresh PostgreSQL database of the session's cluster, as a tracking URI."""
    import local_postgres

    return local_postgres.new_database(postgres_server)
