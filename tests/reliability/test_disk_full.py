"""Disk full while a trial writes (a size-limited file: RLIMIT_FSIZE makes any write past the limit fail with
EFBIG, as ENOSPC would on a full disk, with no root needed). The trial fails cleanly, saying what it was
writing and at which step; no half-written checkpoint or cache file is left where a reader would take it;
a rerun with room to write completes."""

import multiprocessing
import resource
import signal
import subprocess
import sys
from pathlib import Path

import torch

from orchestrator.core.tags import TAG_FAILURE
from orchestrator.infra.files import write_folder_atomically
from orchestrator.runtime.server import mlflow_server
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.cache import cached_reference_logps

LIMIT = 1 << 20  # 1 MiB: the tiny base model (0.56 MB) and SFT checkpoint fit, the training state (~1.7 MB) not

SPEC = """\
name: disk-full
workdir: {workdir}
data: {{kind: synthetic, n_train: 96, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 2}}
evaluation: {{num_prompts: 16, max_new_tokens: 12}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1], learning_rate: [3.0e-4]}}}}
executor: {{kind: local, checkpoint_every: 2}}
"""


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.is_file() and not p.name.endswith(".lock"))


def test_checkpoint_write_fails_cleanly_and_a_rerun_completes(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(workdir=tmp_path / "work"))
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_server(sqlite) as url:  # the store's own process has no limit: only the sweep's disk is full
        command = [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--no-progress", "--tracking-uri", url]
        full = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              preexec_fn=_limit_file_size(LIMIT))
        assert full.returncode == 1, full.stdout + full.stderr
        assert "Traceback" not in full.stderr and "no trial of stage 'sft' finished" in full.stderr
        sft = SweepTracker(url, "disk-full").trials("sft")
        assert [r.status for r in sft] == ["FAILED"]
        reason = sft[0].tags[TAG_FAILURE]
        assert reason.startswith("CheckpointWriteError: could not save the training state at step 2 to ")
        assert "File too large" in reason
        resume = next((tmp_path / "work" / "trials").glob("*/resume"))
        assert not (resume / "state.pt").exists() and not (resume / "step").exists()
        assert _leftovers(tmp_path / "work") == []  # no temporary file left behind either

        rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "2 trials run, 1 skipped" in rerun.stdout  # base was done; SFT (again) and DPO
        records = SweepTracker(url, "disk-full").trials()
    assert sorted(r.status for r in records) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]


def _write_cache_with_limit(cache_dir: str, key: str, limit: int, queue) -> None:
    _limit_file_size(limit)()
    try:
        cached_reference_logps(Path(cache_dir), key, 200, lambda: (torch.zeros(200), torch.ones(200)))
        queue.put("written")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def test_a_cache_write_that_hits_a_full_disk_leaves_no_file_to_read_back(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_write_cache_with_limit, args=(str(tmp_path), "k", 512, queue))
    child.start()
    child.join(60)
    outcome = queue.get(timeout=5)
    assert outcome != "written" and "File too large" in outcome
    assert [p.name for p in (tmp_path / "ref_logps").iterdir() if not p.name.endswith(".lock")] == []  # no k.pt, no temporary

    computed = []
    compute = lambda: computed.append(1) or (torch.zeros(200), torch.ones(200))  # noqa: E731
    (chosen, rejected), hit = cached_reference_logps(tmp_path, "k", 200, compute)
    assert not hit and computed == [1] and torch.equal(rejected, torch.ones(200))
    _, hit = cached_reference_logps(tmp_path, "k", 200, compute)
    assert hit and computed == [1]


def _write_folder_with_limit(target: str, limit: int, queue) -> None:
    _limit_file_size(limit)()
    try:
        write_folder_atomically(Path(target), lambda folder: (folder / "weights.bin").write_bytes(b"x" * 4096))
        queue.put("written")
    except Exception as exc:  # noqa: BLE001
        queue.put(f"{type(exc).__name__}: {exc}")


def test_a_model_folder_write_that_hits_a_full_disk_is_not_taken_for_a_finished_folder(tmp_path):
    target = tmp_path / "models" / "base"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_write_folder_with_limit, args=(str(target), 1024, queue))
    child.start()
    child.join(60)
    assert "File too large" in queue.get(timeout=5)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []
    write_folder_atomically(target, lambda folder: (folder / "weights.bin").write_bytes(b"x" * 4096))
    assert (target / "weights.bin").stat().st_size == 4096
