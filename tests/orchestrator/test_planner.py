"""The planner's arithmetic against numbers worked out by hand (orchestrator/planner.py has the formulas)."""

import pytest

from orchestrator import cli
from orchestrator.core.spec import CostSpec, ModelShape
from orchestrator.core.spec_file import parse_spec
from orchestrator.grid import plan_sweep
from orchestrator.planner import lora_parameter_count, parameter_count, plan_stages, plan_trial

# h=8, I=16, 2 layers, 2 heads (head_dim 4, kv = 8), vocab 10, tied embeddings:
#   attention 2*8*8 + 2*8*8 = 256; mlp 3*8*16 = 384; norms 2*8 = 16 -> 656 per layer
#   N = 2*656 + 8 (final norm) + 10*8 (one embedding matrix) = 1400
SMALL = ModelShape(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, vocab_size=10,
                   tie_embeddings=True)
# microsoft/Phi-3-medium-4k-instruct: attention 2*5120^2 + 2*5120*1280 = 65,536,000; mlp 3*5120*17920 =
# 275,251,200; + 10,240 norms = 340,797,440 per layer; x 40 = 13,631,897,600; + 5,120 + 2*32064*5120
PHI3_MEDIUM = ModelShape(hidden_size=5120, intermediate_size=17920, num_layers=40, num_heads=40, num_kv_heads=10,
                         vocab_size=32064)

SPEC = """\
name: plan
model: {{kind: hf, hub_id: nobody/not-in-any-cache}}
data: {{kind: synthetic, n_train: 100, n_eval: 16}}
training: {{batch_size: 4, max_length: 10{training}}}
evaluation: {{num_prompts: 16, max_new_tokens: 8}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1], learning_rate: [1.0e-4]}}}}
    epsilon_dpo: {{grid: {{beta: [0.1], epsilon: [0.01], learning_rate: [1.0e-4]}}}}
cost: {{gpus_per_trial: {gpus}, sharding: {sharding}, gpu_memory_gb: 80,
       model_shape: {{hidden_size: 8, intermediate_size: 16, num_layers: 2, num_heads: 2, vocab_size: 10,
                     tie_embeddings: true}}}}
"""


def _trial(method: str, training: str = "", gpus: int = 1, sharding: str = "ddp"):
    spec = parse_spec(SPEC.format(training=training, gpus=gpus, sharding=sharding))
    stage = next(s for s in plan_sweep(spec) if s.stage == method)
    return plan_trial(stage.trials[0], SMALL, spec.cost, 100)


def test_logits_are_capped_at_what_the_chunked_output_layer_holds():
    from orchestrator.core.methods import METHODS
    from orchestrator.core.spec import TrainingSpec
    from orchestrator.planner import CHUNKED_LOGIT_BYTES, CHUNK_BYTES, training_memory
    from trainers.logprobs import CHUNK_BYTES as TRAINERS_CHUNK_BYTES

    assert CHUNK_BYTES == TRAINERS_CHUNK_BYTES
    memory = training_memory(PHI3_MEDIUM, METHODS["dpo"], TrainingSpec(batch_size=8, max_length=512), 1, "ddp", 512)
    # 16 sequences x 512 tokens: 40 layers x 87*512*16*5120, and 4 chunks of 64 MiB instead of 16*512*16*32064
    assert memory.activations == 40 * 87 * 512 * 16 * 5120 + CHUNKED_LOGIT_BYTES
    assert CHUNKED_LOGIT_BYTES == 268_435_456 < 16 * 512 * 16 * 32064


def test_parameter_counts():
    assert parameter_count(SMALL) == 1400
    assert parameter_count(PHI3_MEDIUM) == 13_631_897_600 + 5_120 + 328_335_360 == 13_960_238_080
    # LoRA r=2 on q and v: r*(8+8) each, per layer, 2 layers
    assert lora_parameter_count(SMALL, 2, ["q_proj", "v_proj"]) == 128


def test_full_fine_tuning_memory_and_flops_by_hand():
    dpo = _trial("dpo")
    assert (dpo.weights, dpo.gradients, dpo.optimizer, dpo.reference) == (5600, 5600, 11200, 0)  # 4N, 4N, 8N
    # 8 sequences (4 pairs x chosen and rejected) of 10 tokens: 2 layers x 87*10*8*8 (fp32) + logits 16*10*8*10
    assert dpo.activations == 2 * 87 * 10 * 8 * 8 + 16 * 10 * 8 * 10 == 124_160
    # 100 pairs x 2 sequences x 10 tokens x 1 epoch x 6N; evaluation 16 prompts x (5 prompt + 8 new tokens) x (2N
    # prefill and sampling + 2N SFT KL pass)
    assert dpo.train_flops == 2000 * 6 * 1400 and dpo.eval_flops == 16 * 13 * 4 * 1400  # policy + SFT KL pass
    sft = _trial("sft")  # chosen only: 4 sequences, half the tokens
    assert sft.activations == 2 * 87 * 10 * 4 * 8 + 16 * 10 * 4 * 10 == 62_080
    assert sft.train_flops == 1000 * 6 * 1400 and sft.eval_flops == 16 * 13 * 2 * 1400


def test_precision_checkpointing_reference_lora_and_fsdp_by_hand():
    assert _trial("dpo", ", precision: bf16").activations == 2 * 57 * 10 * 8 * 8 + 12_800 == 85_760
    # checkpointing: each layer's fp32 input (4*s*b*h) + one layer's activations (fp32: 87*s*b*h)
    assert _trial("dpo", ", gradient_checkpointing: true").activations == 2 * 4 * 10 * 8 * 8 + 55_680 + 12_800
    # micro-batches of 1 pair: 2 sequences per pass instead of 8, a quarter of the activations (a spec without
    # epsilon_dpo, which refuses micro-batches)
    text = SPEC.format(training=", micro_batch_size: 1", gpus=1, sharding="ddp")
    spec = parse_spec("\n".join(line for line in text.splitlines() if "epsilon_dpo" not in line))
    stage = next(s for s in plan_sweep(spec) if s.stage == "dpo")
    assert plan_trial(stage.trials[0], SMALL, spec.cost, 100).activations == 124_160 / 4
    eps = _trial("epsilon_dpo")  # keeps the reference model for its token logits: +4N, and 2N per token
    assert eps.reference == 5600 and eps.train_flops == 2000 * 8 * 1400
    lora = _trial("epsilon_dpo", ", lora: {r: 2, target_modules: [q_proj, v_proj]}")
    assert (lora.trainable, lora.weights, lora.gradients, lora.optimizer, lora.reference) == (128, 5600, 512, 1024, 0)
    assert lora.train_flops == 2000 * (4 + 2) * 1400  # no weight gradients: 4N, + the reference forward 2N
    fsdp = _trial("dpo", gpus=4, sharding="fsdp")  # everything sharded over 4 GPUs, 2 sequences per GPU
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (1400, 1400, 2800)
    assert fsdp.activations == 124_160 / 4
    ddp = _trial("dpo", gpus=4)
    assert (ddp.weights, ddp.optimizer) == (5600, 11200)


def test_fit_and_gpu_hours():
    dpo = _trial("dpo")
    assert dpo.fits(80) and not dpo.fits(1e-4)  # 146,560 bytes vs 0.9 * 1e-4 GiB = 96,637 bytes
    cost = CostSpec(peak_tflops=1e-6, utilization=0.5)  # 5e5 FLOP/s
    # eval: 16 prompts x (5 prompt tokens, half the 10-token sequence, + 8 new) x 4N (the policy and the SFT model's
    # KL pass); the synthetic reward has no model
    assert dpo.gpu_hours(cost) == pytest.approx((16_800_000 + 16 * 13 * 4 * 1400) / 5e5 / 3600)


def test_the_evaluation_term_counts_prompts_new_tokens_and_the_reward_model(tmp_path):
    import json

    from orchestrator.planner import eval_flops, reward_parameters

    folder = tmp_path / "reward"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "vocab_size": 10,
                                                    "tie_word_embeddings": True}))
    text = SPEC.format(training="", gpus=1, sharding="ddp").replace(
        "stages:", f"reward: {{kind: hf, path: {folder}}}\nstages:")
    spec = parse_spec(text)
    assert reward_parameters(spec) == (1400, "its config.json")  # SMALL's shape: N = 1400
    dpo = next(s for s in plan_sweep(spec) if s.stage == "dpo").trials[0]
    sft = next(s for s in plan_sweep(spec) if s.stage == "sft").trials[0]
    assert eval_flops(dpo, 1400, 1400, spec.cost) == 16 * (5 + 8) * (2 + 2 + 2) * 1400  # policy, KL, reward
    assert eval_flops(sft, 1400, 1400, spec.cost) == 16 * (5 + 8) * (2 + 2) * 1400      # no KL pass for SFT
    hub = parse_spec(text.replace(f"path: {folder}", "hub_id: nobody/not-in-any-cache"))
    assert reward_parameters(hub)[0] is None and "set cost.reward_parameters" in reward_parameters(hub)[1]
    given = parse_spec(text.replace("gpu_memory_gb: 80,", "gpu_memory_gb: 80, reward_parameters: 7,"))
    assert reward_parameters(given) == (7, "cost.reward_parameters")


def test_unknown_shape_is_said_not_guessed():
    spec = parse_spec(SPEC.format(training="", gpus=1, sharding="ddp").split("cost:")[0])
    estimates, why = plan_stages(spec, plan_sweep(spec))
    assert estimates is None and "set cost.model_shape" in why


def test_plan_flags_trials_that_do_not_fit(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(training="", gpus=1, sharding="ddp").replace("gpu_memory_gb: 80",
                                                                              "gpu_memory_gb: 0.0001"))
    assert cli.main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "will not fit 0.0001 GB per GPU (with 10% kept free): " in out
    flagged = out.split("(with 10% kept free): ")[1].split(";")[0]
    # 0.9 * 1e-4 GiB = 96,637 bytes: sft needs 22,400 + 62,080 = 84,480 (fits), dpo 146,560, epsilon_dpo more
    assert flagged == "dpo, epsilon_dpo"
    assert "FLOPs estimate" in out  # the cost table's source before any trial ran


def test_the_paper_sweep_has_a_whole_study_estimate(capsys):
    assert cli.main(["plan", "sweeps/paper/phi3_saferlhf.yaml"]) == 0
    out = capsys.readouterr().out
    assert ("14B parameters (shape from cost.model_shape); 8 GPU(s) per trial, fsdp, bf16, gradient checkpointing, "
            "micro-batches of 8 pairs, full fine-tuning") in out
    assert "all (GPU-hours from FLOPs)" in out and "NO" not in out.split("memory per GPU")[1]


def test_the_smollm2_paper_sweep_plans_for_one_gpu_without_the_hub(capsys, monkeypatch):
    """sweeps/paper/smollm2_hh.yaml: the paper's three grids on a real model; `plan` reads no hub file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["plan", "sweeps/paper/smollm2_hh.yaml"]) == 0
    out = capsys.readouterr().out
    assert "143 trials: 1 untrained baseline, 2 SFT, 140 preference" in out
    assert "135M parameters (shape from cost.model_shape); 1 GPU(s) per trial" in out
    assert "NO" not in out.split("memory per GPU")[1]
