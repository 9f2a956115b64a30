"""A throwaway single-node Slurm on this machine, for the SLURM executor's tests and benchmark and for trying
`executor: {kind: slurm}` on a laptop. Needs Debian's `slurm-wlm` and `munge` packages and root (slurmd runs
jobs as their users). Everything (config, state, logs, pid files) lives in one folder; SLURM_CONF points the
Slurm commands of this process and its children at it. No accounting daemon: cluster/slurm.py reads job
states without sacct.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from orchestrator.infra.net import free_port

SLURM_CONF_TEMPLATE = """\
ClusterName=posweep-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=sched_interval=1
MinJobAge=30
# a cancelled or requeued job's processes are killed 2 s after SIGTERM (default 30 s)
KillWait=2
{node}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    pass


def available() -> str:
    """'' when a local Slurm can be started here, else why not."""
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch", "squeue") if not shutil.which(c)
               and not Path(f"/usr/sbin/{c}").exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local slurmd must run as root"
    return ""


def _node_line(host: str) -> str:
    """This machine's node line from `slurmd -C` (CPUs, sockets, memory), minus its UpTime line."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("NodeName="))
    fields = dict(f.split("=", 1) for f in line.split())
    fields["NodeName"], fields["NodeAddr"] = host, "127.0.0.1"
    fields["RealMemory"] = str(int(int(fields.get("RealMemory", "4096")) * 0.9))
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _start_munge() -> bool:
    """Start munged unless one runs; True if started here."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return False
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    return True


def _stop_pidfile(pidfile: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)


@contextlib.contextmanager
def local_slurm(root: Path, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start slurmctld + slurmd under `root`; yields the environment (SLURM_CONF) for Slurm commands, which is
    also set in this process for the duration. Stops both (and munged, if started here) on exit."""
    why = available()
    if why:
        raise SlurmUnavailable(why)
    root = Path(root).resolve()
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF_TEMPLATE.format(host=host, root=root, ctld_port=free_port(), d_port=free_port(),
                                               node=_node_line(host)))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = _start_munge()
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
            if state.strip() in ("idle", "mix", "alloc"):
                break
            time.sleep(0.3)
        else:
            raise SlurmUnavailable(f"the local Slurm did not come up in {timeout:.0f} s; see {root}/*.log")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=env)
        _stop_pidfile(root / "slurmd.pid")
        _stop_pidfile(root / "slurmctld.pid")
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
