"""A throwaway PostgreSQL cluster for tests: Debian's postgresql binaries (initdb, pg_ctl), a data folder in a temp
dir, listening on 127.0.0.1 and a free port, trust authentication for its one user; run as the `postgres` user
when the tests run as root (initdb refuses root). Stopped and deleted after."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from orchestrator.infra.net import free_port

USER = "posweep"


def _binary(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin (not on PATH)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if not found:
        raise RuntimeError(f"no {name}: install Debian's postgresql package (apt-get install postgresql)")
    return found


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster; yields the URI prefix postgresql://posweep@127.0.0.1:PORT (add /DATABASE)."""
    root = Path(tempfile.mkdtemp(prefix="posweep-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port("127.0.0.1")
    subprocess.run(_as_owner([_binary("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
    subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                              "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://{USER}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def new_database(server: str) -> str:
    """A fresh, empty database on the cluster; its URI."""
    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


def tracking_store(kind: str, tmp_path: Path, request) -> str:
    """The tracking URI of a test parametrized over stores: a SQLite file in tmp_path, or a fresh PostgreSQL
    database (the postgres_uri fixture)."""
    return request.getfixturevalue("postgres_uri") if kind == "postgresql" else f"sqlite:///{tmp_path / 'mlflow.db'}"
