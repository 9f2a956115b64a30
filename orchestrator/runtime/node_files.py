"""A trial on a node that does not share the driver's workdir (executor.shared_workdir: false): its files on the
node's own disk, what later trials need from it published to the tracking store, and what it needs from earlier
trials fetched from the store into the node's cache.

    NODE_DIR/<sweep>-<store>/             NODE_DIR: executor.node_dir, default TMPDIR/posweep-nodes
        trials/<key>/      the trial's folder (its lock, checkpoint, samples.json), as WORKDIR/trials/ is otherwise
        models/, cache/    the base model and the caches (reference log-probs), built once per node
        store/<run id>/    what this node fetched from a run: checkpoint/ and samples.json of the selected SFT trial,
                           checked against their sha256 on every use and fetched again when damaged

With a shared workdir nothing here moves a file: a trial reads the selected SFT trial's folder by path, and one that
finds no such folder on its node says so (the nodes do not share the workdir).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Optional

from orchestrator.core.tags import (CHECKPOINT_ARTIFACT, SAMPLES_FILE_ARTIFACT, SHARED_ARTIFACTS,
                                    TAG_CHECKPOINT_ARTIFACT, TAG_SAMPLES_SHA, TAG_SHARED)
from orchestrator.core.task import TrialTask
from orchestrator.infra.files import exclusive_lock, file_sha256, folder_problem, sidecar, verified_mismatch
from orchestrator.runtime.trial_log import TrialLogger

DEFAULT_NODE_DIR = "posweep-nodes"  # under the node's temporary folder


def node_name() -> str:
    """The machine a trial runs on, as its run's posweep.node tag says: POSWEEP_NODE_NAME (set where several nodes
    share a host name, e.g. pods or the tests' simulated nodes), else the host name."""
    return os.environ.get("POSWEEP_NODE_NAME") or socket.gethostname()


def node_root(task: TrialTask) -> Path:
    """NODE_DIR/<sweep>-<store>: one folder per sweep and store (two stores may each hold a sweep of that name and
    experiment id), named by what stays the same across reruns (the server's port does not)."""
    runtime = task.runtime
    base = Path(runtime.node_dir).expanduser() if runtime.node_dir else Path(tempfile.gettempdir()) / DEFAULT_NODE_DIR
    store = hashlib.sha256(f"{runtime.served_root or runtime.tracking_uri}#{runtime.experiment_id}".encode())
    return base / f"{runtime.sweep}-{store.hexdigest()[:12]}"


def on_this_node(task: TrialTask) -> TrialTask:
    """The task as this node runs it: without a shared workdir, every file of the trial (runtime.workdir) under
    node_root; unchanged otherwise."""
    if task.runtime.shared_workdir:
        return task
    return task.model_copy(update={"runtime": task.runtime.model_copy(update={"workdir": str(node_root(task))})})


class MissingOnNode(FileNotFoundError):
    """A shared-workdir trial did not find, on its node, a file the driver's workdir holds."""


def fetch_inputs(task: TrialTask, logger: TrialLogger) -> tuple[TrialTask, Optional[str]]:
    """The task with its start checkpoint and SFT samples on this node, and where they came from (None: it starts
    from none). Without a shared workdir they are fetched from the selected SFT run's artifacts into
    node_root/store/<run id>/ (once per node, under a lock; a cached copy whose sha256 no longer matches is fetched
    again). With one, they must be on this node's disk already."""
    runtime = task.runtime
    if runtime.shared_workdir:
        if runtime.init_checkpoint and not Path(runtime.init_checkpoint).is_dir():
            raise MissingOnNode(f"the selected SFT checkpoint {runtime.init_checkpoint} is not on node {node_name()}: "
                                "the nodes do not share the sweep's workdir; set executor.shared_workdir: false")
        return task, None
    if not runtime.init_run_id:
        return task, None
    run = logger.client.get_run(runtime.init_run_id)
    if TAG_CHECKPOINT_ARTIFACT not in run.data.tags or TAG_SAMPLES_SHA not in run.data.tags:
        raise MissingOnNode(f"run {runtime.init_run_id} (the selected SFT trial) has no checkpoint in the store: it "
                            "ran with a shared workdir; delete it in MLflow so it runs again, or share the workdir")
    folder = Path(runtime.workdir) / "store" / runtime.init_run_id
    checkpoint, came = _fetched(logger, runtime.init_run_id, CHECKPOINT_ARTIFACT, folder / "checkpoint",
                                folder_problem)
    expected = run.data.tags[TAG_SAMPLES_SHA]
    samples, _ = _fetched(logger, runtime.init_run_id, SAMPLES_FILE_ARTIFACT, folder / "samples.json",
                          lambda path: _samples_problem(path, expected))
    update = {"init_checkpoint": str(checkpoint), "sft_samples": str(samples)}
    return task.model_copy(update={"runtime": runtime.model_copy(update=update)}), f"{came} on {node_name()}"


def _samples_problem(path: Path, expected: str) -> Optional[str]:
    """verified_mismatch against the sha256 the SFT run recorded (its sidecar written from the tag, not the file)."""
    if path.is_file() and not sidecar(path).is_file():
        sidecar(path).write_text(expected)
    return verified_mismatch(path)


def _fetched(logger: TrialLogger, run_id: str, artifact: str, target: Path,
             problem: Callable[[Path], Optional[str]]) -> tuple[Path, str]:
    """`target`: the node's verified copy of a run's artifact, downloaded when missing or damaged; and a word on how
    (for the run's posweep.init_from tag)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        note = ""
        if target.exists():
            why = problem(target)
            if why is None:
                return target, "the node's cache"
            note = f" (the node's copy was damaged: {why})"
            _remove(target)
            _remove(sidecar(target))
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            got = logger.download(run_id, artifact, tmp)
            size = sum(p.stat().st_size for p in ([got] if got.is_file() else got.rglob("*")) if p.is_file())
            os.replace(got, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        why = problem(target)
        if why is not None:
            _remove(target)
            raise ValueError(f"run {run_id}'s {artifact} in the store cannot be trusted: {why}")
        return target, f"the store ({size:,} bytes){note}"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def publish_outputs(task: TrialTask, logger: TrialLogger, checkpoint: Optional[Path], samples: Optional[Path]) -> None:
    """Without a shared workdir, what later trials start from goes to the store: a checkpointed trial's folder
    (CHECKPOINT_ARTIFACT) and its samples.json as written (SAMPLES_FILE_ARTIFACT; the run's posweep.samples_sha256
    says what it holds), then the tag that says the checkpoint is whole."""
    if task.runtime.shared_workdir or checkpoint is None:
        return
    if samples is not None:
        logger.log_file(samples, SAMPLES_FILE_ARTIFACT.rpartition("/")[0])
    logger.log_folder(checkpoint, CHECKPOINT_ARTIFACT)
    logger.set_tags({TAG_CHECKPOINT_ARTIFACT: CHECKPOINT_ARTIFACT})


class StoreFiles:
    """SharedFiles (orchestrator.core.outcome) through the tracking store: an entry is an artifact of the run that
    published it (SHARED_ARTIFACTS/<name>), found by its tag (posweep.shared/<name> = its sha256, set once the upload
    is whole). Several runs may publish one entry (trials on two nodes that missed at once): any whole one serves."""

    def __init__(self, logger: TrialLogger):
        self.logger = logger

    def publish(self, name: str, path: Path) -> None:
        digest = sidecar(path).read_text().strip() if sidecar(path).is_file() else file_sha256(path)
        self.logger.log_file(path, f"{SHARED_ARTIFACTS}/{name}".rpartition("/")[0])
        self.logger.set_tags({f"{TAG_SHARED}{name}": digest})

    def fetch(self, name: str, target: Path) -> bool:
        tag = f"{TAG_SHARED}{name}"
        client = self.logger.client
        for run in client.search_runs([self.logger.experiment_id], f"tags.`{tag}` LIKE '%'", max_results=3):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                got = self.logger.download(run.info.run_id, f"{SHARED_ARTIFACTS}/{name}", tmp)
                if file_sha256(got) != run.data.tags[tag]:
                    continue  # damaged in the store: another run's copy, or compute it
                sidecar(target).write_text(run.data.tags[tag])
                os.replace(got, target)
                return True
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return False


def shared_files(task: TrialTask, logger: TrialLogger) -> Optional[StoreFiles]:
    """What a body is handed to share cache entries: through the store without a shared workdir, else None."""
    return None if task.runtime.shared_workdir else StoreFiles(logger)
