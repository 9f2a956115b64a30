"""A small sweep at several processes per trial, shared by the DDP tests of every executor (tests/trainers,
tests/cluster). A uniquely named module in tests/ (on sys.path through tests/conftest.py)."""

from orchestrator.pipeline import run_sweep
from orchestrator.spec import parse_spec
from orchestrator.tracking import SweepTracker, _client

SPEC = """\
name: ddp-{processes}
workdir: {workdir}
data: {{kind: synthetic, n_train: 64, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 1}}
evaluation: {{num_prompts: 16, max_new_tokens: 8}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [2]}}}}
  methods:
    dpo: {{grid: {{beta: [0.3], learning_rate: [1.0e-3], epochs: [2]}}}}
    simpo: {{grid: {{beta: [2.0], gamma: [0.5], learning_rate: [1.0e-3], epochs: [2]}}}}
executor: {{kind: local, processes_per_trial: {processes}}}
"""


def two_process_sweep(tmp_path, executor: str):
    """The base, SFT and DPO stages of SPEC at 2 processes per trial on `executor`: every trial FINISHED in
    one run, each training step logged once (rank 0), 2 devices counted. (That 2 processes train like one is
    tests/trainers/test_distributed.py's test; here: that the executor runs such a trial as one unit.)"""
    text = SPEC.format(processes=2, workdir=tmp_path / "work").replace(
        "executor: {kind: local, processes_per_trial: 2}", executor).replace(
        "    simpo: {grid: {beta: [2.0], gamma: [0.5], learning_rate: [1.0e-3], epochs: [2]}}\n", "")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(parse_spec(text), uri, show_progress=False, echo=lambda _: None)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    records = SweepTracker(uri, "ddp-2").trials()
    assert sorted(r.stage for r in records) == ["base", "dpo", "sft"] and all(r.status == "FINISHED" for r in records)
    for r in records:
        assert r.metrics["device_count"] == 2
        if r.stage != "base":
            assert [m.step for m in _client(uri).get_metric_history(r.run_id, "train/loss")] == list(range(1, 9))
