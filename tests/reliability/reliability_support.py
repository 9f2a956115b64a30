"""Helpers of the reliability suite: looks into a SQLite store and its server while a sweep runs.
A uniquely named module, not conftest: every tests/ folder has a conftest of its own."""

import os
import signal
import sqlite3
from pathlib import Path

TRIALS_WITH_STATUS = ("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid where "
                      "t.key = 'posweep.run_kind' and t.value = 'trial' and r.status = '{status}'")


def finished_trials(store, status: str = "FINISHED") -> int:
    """Trial runs of this MLflow status (FINISHED by default) in a store, read directly (while a server owns it; 0
    while it is busy): a SQLite file's path, or a postgresql:// URI."""
    query = TRIALS_WITH_STATUS.format(status=status)
    if str(store).startswith("postgresql://"):
        import psycopg

        try:
            with psycopg.connect(str(store)) as con:
                return con.execute(query).fetchone()[0]
        except psycopg.Error:
            return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def server_pids(db: Path) -> list[int]:
    """The `mlflow server` process(es) serving this SQLite file."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if " server " in cmdline and f"sqlite:///{db}" in cmdline:
            pids.append(int(proc.name))
    return pids


def kill_server(db: Path) -> int:
    """SIGKILL the server's whole process group (the mlflow CLI and its uvicorn worker); returns its pid."""
    pid = server_pids(db)[0]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    return pid
