"""Helpers of the reliability suite: a no-op sweep spec for the real pipeline with probe trials (trainers.probe:
the real lock, MLflow run and result path, no training), and looks into a SQLite store and its server.
A uniquely named module, not conftest: every tests/ folder has a conftest of its own."""

import os
import signal
import sqlite3
from pathlib import Path

NOOP_SPEC = """\
name: {name}
workdir: {workdir}
data: {{kind: synthetic, n_train: 64, n_eval: 16}}
evaluation: {{num_prompts: 16}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [{betas}], learning_rate: [{lrs}]}}}}
    simpo: {{grid: {{beta: [{betas}], gamma: [0.5], learning_rate: [{lrs}]}}}}
    ln_dpo: {{grid: {{beta: [{betas}], learning_rate: [{lrs}]}}}}
executor: {executor}
tracking: {{server_restarts: {restarts}}}
"""


def noop_spec_text(name: str, workdir: Path, n_beta: int, n_lr: int, executor: str, restarts: int = 3) -> str:
    """base + 1 SFT + 3 methods x n_beta x n_lr preference trials."""
    betas = ", ".join(f"{0.05 * (i + 1):.2f}" for i in range(n_beta))
    lrs = ", ".join(f"{1e-5 * (i + 1):.0e}" for i in range(n_lr))
    return NOOP_SPEC.format(name=name, workdir=workdir, betas=betas, lrs=lrs, executor=executor, restarts=restarts)


def finished_trials(db: Path) -> int:
    """FINISHED trial runs in a SQLite store, read directly (while a server owns it; 0 while it is busy)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid where "
                               "t.key = 'posweep.run_kind' and t.value = 'trial' and r.status = 'FINISHED'"
                               ).fetchone()[0]
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
