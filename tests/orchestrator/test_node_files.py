"""A trial on a node without the driver's workdir: the selected SFT trial's checkpoint and samples published to the
store, fetched into the node's cache once, checked by sha256 on every use and fetched again when damaged."""

import json
from pathlib import Path

import pytest

from orchestrator.core.spec_file import parse_spec
from orchestrator.core.task import TrialRuntime, TrialTask
from orchestrator.grid import plan_sweep
from orchestrator.infra.files import write_folder_atomically, write_verified
from orchestrator.runtime.node_files import MissingOnNode, fetch_inputs, node_root, on_this_node, publish_outputs
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.runtime.trial_log import TrialLogger
from trainers.probe import noop_sweep_yaml

WEIGHTS = bytes(range(256)) * 64


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def published(tmp_path):
    """An SFT run whose checkpoint and samples are in a SQLite store, and a DPO task on another node that starts
    from it (shared_workdir false, its node folder under tmp_path/node)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec(noop_sweep_yaml("nodes", tmp_path / "work", n_beta=1, n_lr=1))
    dpo = next(s for s in plan_sweep(spec) if s.stage == "dpo")
    tracker = SweepTracker(uri, "nodes")
    sft = TrialLogger(uri, tracker.experiment_id, tracker.stage_run("sft"))
    sft.start("sft", {}, {})
    checkpoint = write_folder_atomically(tmp_path / "sft" / "checkpoint",
                                         lambda folder: (folder / "model.safetensors").write_bytes(WEIGHTS))
    samples = tmp_path / "sft" / "samples.json"
    digest = write_verified(samples, lambda tmp: Path(tmp).write_text(json.dumps([{"prompt_id": 0, "score": 0.5}])))
    sft.set_tags({"posweep.samples_sha256": digest})
    runtime = TrialRuntime(sweep="nodes", tracking_uri=uri, experiment_id=tracker.experiment_id,
                           parent_run_id=tracker.stage_run("dpo"), workdir=str(tmp_path / "work"),
                           shared_workdir=False, node_dir=str(tmp_path / "node"), init_run_id=sft.run_id)
    task = on_this_node(TrialTask(trial=dpo.trials[0], runtime=runtime))
    publish_outputs(task, sft, checkpoint, samples)
    return task, TrialLogger(uri, tracker.experiment_id, runtime.parent_run_id), sft, tmp_path


def test_a_task_without_a_shared_workdir_keeps_its_files_on_its_node(published):
    task, _, _, tmp_path = published
    assert Path(task.runtime.workdir) == node_root(task) and node_root(task).parent == tmp_path / "node"
    assert task.trial_dir.is_relative_to(tmp_path / "node")
    other_store = task.runtime.model_copy(update={"tracking_uri": "sqlite:////elsewhere/mlflow.db"})
    assert node_root(task.model_copy(update={"runtime": other_store})) != node_root(task)


def test_the_checkpoint_is_fetched_once_per_node_and_again_when_its_copy_is_damaged(published):
    task, logger, _, tmp_path = published
    fetched, came = fetch_inputs(task, logger)
    checkpoint = Path(fetched.runtime.init_checkpoint)
    assert checkpoint.is_relative_to(node_root(task)) and came.startswith("the store (")
    assert (checkpoint / "model.safetensors").read_bytes() == WEIGHTS
    assert json.loads(Path(fetched.runtime.sft_samples).read_text()) == [{"prompt_id": 0, "score": 0.5}]

    again, came = fetch_inputs(task, logger)  # the node's later trials reuse its copy
    assert again.runtime.init_checkpoint == str(checkpoint) and came.startswith("the node's cache")

    _flip(checkpoint / "model.safetensors")
    _, came = fetch_inputs(task, logger)
    assert "the node's copy was damaged" in came and came.startswith("the store (")
    assert (checkpoint / "model.safetensors").read_bytes() == WEIGHTS

    _flip(Path(fetched.runtime.sft_samples))
    _, came = fetch_inputs(task, logger)
    assert json.loads(Path(fetched.runtime.sft_samples).read_text()) == [{"prompt_id": 0, "score": 0.5}]


def test_a_damaged_copy_in_the_store_is_refused(published):
    task, logger, sft, tmp_path = published
    [stored] = (tmp_path / "mlartifacts").rglob("checkpoint/model.safetensors")
    _flip(stored)
    with pytest.raises(ValueError, match="in the store cannot be trusted: .*model.safetensors changed"):
        fetch_inputs(task, logger)
    assert not (node_root(task) / "store" / sft.run_id / "checkpoint").exists()  # nothing damaged left to reuse


def test_a_run_that_kept_its_checkpoint_on_a_disk_is_named(published):
    task, logger, _, _ = published
    unpublished = TrialLogger(task.runtime.tracking_uri, task.runtime.experiment_id, task.runtime.parent_run_id)
    unpublished.start("sft elsewhere", {}, {})
    runtime = task.runtime.model_copy(update={"init_run_id": unpublished.run_id})
    with pytest.raises(MissingOnNode, match="has no checkpoint in the store: it ran with a shared workdir"):
        fetch_inputs(task.model_copy(update={"runtime": runtime}), logger)


def test_with_a_shared_workdir_a_checkpoint_missing_on_the_node_is_named(published):
    task, logger, _, tmp_path = published
    runtime = task.runtime.model_copy(update={"shared_workdir": True, "init_checkpoint": str(tmp_path / "gone")})
    with pytest.raises(MissingOnNode, match=f"{tmp_path / 'gone'} is not on node .*shared_workdir: false"):
        fetch_inputs(task.model_copy(update={"runtime": runtime}), logger)


def test_a_cache_entry_published_on_one_node_is_fetched_on_another_checked_by_its_hash(published):
    task, logger, sft, tmp_path = published
    from orchestrator.infra.files import sidecar
    from orchestrator.runtime.node_files import StoreFiles

    entry = tmp_path / "node-a" / "ref_logps" / "k.pt"
    write_verified(entry, lambda tmp: Path(tmp).write_bytes(WEIGHTS))
    assert not StoreFiles(logger).fetch("ref_logps/k.pt", tmp_path / "node-b" / "k.pt")  # nothing published yet
    StoreFiles(sft).publish("ref_logps/k.pt", entry)
    target = tmp_path / "node-b" / "ref_logps" / "k.pt"
    assert StoreFiles(logger).fetch("ref_logps/k.pt", target)
    assert target.read_bytes() == WEIGHTS and sidecar(target).read_text() == sidecar(entry).read_text()

    [stored] = (tmp_path / "mlartifacts").rglob("shared/ref_logps/k.pt")
    _flip(stored)  # a damaged copy in the store is not taken: the trial computes the entry itself
    assert not StoreFiles(logger).fetch("ref_logps/k.pt", tmp_path / "node-c" / "k.pt")
    assert not (tmp_path / "node-c" / "k.pt").exists()
