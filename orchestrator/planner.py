"""Memory and compute of a trial before anything runs (`sweep plan`): pure arithmetic over the spec.

Model shape: the tiny model from its spec; a Hugging Face model from its config.json (a local folder, or the
local HF cache for a hub id: never the network); else the spec's `cost.model_shape`.

Memory per GPU, for the training loop as built (trainers/train.py loads weights in fp32 and autocasts the
forward/backward to `training.precision`; AdamW keeps two fp32 moments):
  - full fine-tuning: weights 4N + gradients 4N + optimizer 8N bytes; `cost.sharding: fsdp` (ZeRO-3) divides
    all three by the trial's GPU count G;
  - LoRA: weights 4N (frozen, no gradient, no optimizer state) + 16 bytes per adapter parameter;
  - a reference model held during training (methods that need its token logits, e.g. epsilon_dpo): +4N
    (/G with fsdp); none with LoRA (the adapters are switched off instead) and none for methods whose
    reference log-probs are precomputed and cached;
  - activations, per layer and token of the sequences in one forward/backward pass on a GPU (b sequences of
    s tokens: the GPU's share of the batch, or training.micro_batch_size pairs with gradient accumulation):
    87·h bytes in fp32, 57·h under bf16/fp16 autocast. Measured (benchmarks/bench_gpu_step.py, H100,
    SmolLM2-135M, s = 512, 16 and 64 sequences; the two batch sizes give one slope), not Korthikanti et al.'s
    34·h for pure 16-bit training: with fp32 master weights, autocast keeps the residual stream, the norms and
    their saved inputs in fp32. With gradient checkpointing: each layer's fp32 input (4·s·b·h) plus one
    layer's activations. s·b is the padded batch: packed rows (training.padding_free) hold fewer positions, so
    this is an upper bound there. Plus the logits: the chunked output layer (trainers/logprobs.py) holds one
    chunk of CHUNK_BYTES fp32 logits at a time, with its exponent, the subtraction before it and its gradient
    (4 chunks), or less for a small batch: 16·s·b·V, the fp32 logits and their log-softmax and gather gradients;
  - 10% of the GPU kept free for the CUDA context and fragmentation.
Compute: 6N FLOPs per trained token (LoRA: 4N, no weight gradients), +2N per token for a reference forward
each step (methods needing reference logits), the cached reference log-probs once per SFT checkpoint (2N per
token of every pair; shared by all preference trials), and evaluation, per prompt and token of prompt
(cost.prompt_tokens) and new tokens: 2N for the policy (prefill and sampling; its log-probs for KL come with its
samples), 2N for the SFT model's KL forward in preference trials, and 2R for the reward model (R parameters,
from its config.json or cost.reward_parameters). GPU-seconds = FLOPs / (peak × utilisation). Evaluation is
counted in FLOPs only: sampling is bound by each decode step's latency, so on a GPU it costs more than this
says (docs/cost.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.core.methods import METHODS, StageKind
from orchestrator.core.spec import CostSpec, ModelShape, SweepSpec, range_bounds
from orchestrator.core.trials import TrialSpec
from orchestrator.grid import StagePlan
from trainers.synthetic import vocabulary

GB = 1024 ** 3
HEADROOM = 0.9
BYTES_FP32 = 4
# x s·b·h per layer, by training.precision; measured on an H100 (see the module docstring)
ACTIVATION_BYTES_PER_LAYER = {"fp32": 87, "bf16": 57, "fp16": 57}
CHECKPOINTED_INPUT_BYTES = 4      # x s·b·h per layer: the fp32 residual stream a checkpointed layer keeps
LOGIT_BYTES = 16                  # x s·b·V: fp32 logits and their gradients in the backward pass
CHUNK_BYTES = 64 * 2 ** 20        # trainers.logprobs.CHUNK_BYTES (a test keeps the two equal; this module is torch-free)
CHUNKED_LOGIT_BYTES = 4 * CHUNK_BYTES  # the most logits the chunked output layer holds at once
# module name -> (input size, output size) given (h, kv, intermediate); Llama / Phi-3 / Mistral naming
LORA_SHAPES = {"q_proj": ("h", "h"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("h", "h"),
               "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}


# ---- model shape ---------------------------------------------------------------------------------------
def shape_from_config(config: dict) -> ModelShape:
    """A ModelShape from a config.json's fields (Llama-style names)."""
    return ModelShape(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                      num_kv_heads=config.get("num_key_value_heads"), vocab_size=config["vocab_size"],
                      tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _hub_config(hub_id: str, revision: Optional[str]) -> Optional[dict]:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def _config_here(path: Optional[str], hub_id: Optional[str], revision: Optional[str] = None) -> Optional[dict]:
    """A model's config.json from a local folder or the local HF cache (never the network), or None."""
    if path:
        file = Path(path).expanduser() / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    return _hub_config(hub_id, revision) if hub_id else None


def model_shape(spec: SweepSpec) -> tuple[Optional[ModelShape], str]:
    """(shape, where it came from); (None, why) when nothing on this machine says."""
    model = spec.model
    if model.kind == "tiny":
        return ModelShape(hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
                          num_layers=model.num_layers, num_heads=model.num_heads,
                          vocab_size=4 + len(vocabulary()), tie_embeddings=True), "the tiny model's spec"
    config = None if model.gguf_file else _config_here(model.path, model.hub_id, model.revision)
    if config is not None:
        return shape_from_config(config), "config.json"
    if spec.cost.model_shape is not None:
        return spec.cost.model_shape, "cost.model_shape"
    return None, "no config.json on this machine; set cost.model_shape"


def parameter_count(shape: ModelShape) -> int:
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_layers
    kv = (shape.num_kv_heads or shape.num_heads) * (h // shape.num_heads)
    attention = 2 * h * h + 2 * h * kv        # q, o: h x h; k, v: h x kv
    mlp = 3 * h * i                           # gate, up, down
    per_layer = attention + mlp + 2 * h       # + two norms
    embeddings = shape.vocab_size * h * (1 if shape.tie_embeddings else 2)
    return layers * per_layer + h + embeddings


def lora_parameter_count(shape: ModelShape, r: int, target_modules: list[str]) -> int:
    h = shape.hidden_size
    sizes = {"h": h, "kv": (shape.num_kv_heads or shape.num_heads) * (h // shape.num_heads),
             "i": shape.intermediate_size}
    per_layer = sum(r * (sizes[LORA_SHAPES[m][0]] + sizes[LORA_SHAPES[m][1]]) for m in target_modules
                    if m in LORA_SHAPES)
    return shape.num_layers * per_layer


# ---- one trial -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per GPU of a training (or, for a non-training trial, evaluation) process."""
    trainable: int         # parameters that get gradients and optimizer state
    weights: float
    gradients: float
    optimizer: float
    reference: float
    activations: float

    @property
    def total_bytes(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference + self.activations


@dataclass(frozen=True)
class TrialPlan(TrainingMemory):
    """Bytes per GPU (TrainingMemory's terms) and FLOPs of one trial."""
    parameters: int
    gpus: int
    train_flops: float
    eval_flops: float

    def fits(self, gpu_memory_gb: Optional[float]) -> Optional[bool]:
        return None if gpu_memory_gb is None else self.total_bytes <= gpu_memory_gb * GB * HEADROOM

    def gpu_hours(self, cost: CostSpec) -> float:
        return gpu_hours(self.train_flops + self.eval_flops, cost)


def gpu_hours(flops: float, cost: CostSpec) -> float:
    """GPU-hours of `flops` at the spec's per-GPU peak and utilisation."""
    return flops / (cost.peak_tflops * 1e12 * cost.utilization) / 3600


def train_pairs(spec: SweepSpec) -> Optional[int]:
    return spec.cost.train_pairs or getattr(spec.data, "n_train", None)


def sequence_tokens(cost: CostSpec, training) -> int:
    """Tokens of one sequence: cost.mean_tokens, else the training.max_length cap."""
    return cost.mean_tokens or training.max_length


def sequences_per_pair(method) -> int:
    """Sequences a trial's forward pass holds per pair: chosen and rejected for a preference method, the
    chosen response alone for SFT."""
    return 2 if method.kind is StageKind.PREFERENCE else 1


def training_memory(shape: ModelShape, method, training, gpus: int, sharding: str, tokens: int
                    ) -> TrainingMemory:
    """The memory terms of the module docstring for `method` with `training`'s precision, micro-batch,
    checkpointing and LoRA, on `gpus` GPUs (`sharding` ddp | fsdp), for sequences of `tokens` tokens."""
    n = parameter_count(shape)
    shard = gpus if sharding == "fsdp" else 1
    lora = training.lora if method.trains else None
    trainable = lora_parameter_count(shape, lora.r, lora.target_modules) if lora else (n if method.trains else 0)
    weights = BYTES_FP32 * n / shard
    gradients = BYTES_FP32 * trainable / (1 if lora else shard)
    optimizer = 2 * BYTES_FP32 * trainable / (1 if lora else shard)
    keeps_reference = method.needs_reference_logits and not lora
    reference = BYTES_FP32 * n / shard if keeps_reference else 0.0

    s, h, v = tokens, shape.hidden_size, shape.vocab_size
    sequences = sequences_per_pair(method)
    per_gpu = training.batch_size / gpus                            # pairs of each batch on one GPU
    micro = min(per_gpu, training.micro_batch_size or per_gpu)      # ... in one forward/backward pass
    b = micro * sequences if method.trains else 0                   # sequences in one pass on one GPU
    per_layer = ACTIVATION_BYTES_PER_LAYER[training.precision] * s * b * h
    if training.gradient_checkpointing:
        layers = shape.num_layers * CHECKPOINTED_INPUT_BYTES * s * b * h + per_layer
    else:
        layers = shape.num_layers * per_layer
    logits = min(LOGIT_BYTES * s * b * v, CHUNKED_LOGIT_BYTES)
    return TrainingMemory(trainable, weights, gradients, optimizer, reference, layers + logits)


def prompt_tokens(cost: CostSpec, training) -> int:
    """Tokens of one evaluation prompt: cost.prompt_tokens, else half a sequence (sequence_tokens)."""
    return cost.prompt_tokens or max(sequence_tokens(cost, training) // 2, 1)


def reward_parameters(spec: SweepSpec) -> tuple[Optional[int], str]:
    """(the reward model's parameters, where that came from): none for the synthetic reward; a local folder's or
    the HF cache's config.json (never the network), else cost.reward_parameters; (None, why) when unknown."""
    reward = spec.reward
    if reward.kind == "synthetic":
        return 0, "the synthetic reward has no model"
    if spec.cost.reward_parameters:
        return spec.cost.reward_parameters, "cost.reward_parameters"
    config = _config_here(reward.path, reward.hub_id)
    if config is not None and {"hidden_size", "intermediate_size", "num_hidden_layers"} <= set(config):
        return parameter_count(shape_from_config(config)), "its config.json"
    return None, "unknown (no config.json on this machine): not counted; set cost.reward_parameters"


def eval_flops(trial: TrialSpec, parameters: int, reward: int, cost: CostSpec) -> float:
    """A trial's evaluation: every prompt prefilled and its new tokens sampled by the policy (2N per token), the
    SFT model's KL forward over the same tokens for a preference trial (2N), and the reward model scoring each
    generation (2R per token)."""
    tokens = trial.evaluation.num_prompts * (prompt_tokens(cost, trial.training) + trial.evaluation.max_new_tokens)
    kl = 2 * parameters if METHODS[trial.method].kind is StageKind.PREFERENCE else 0
    return tokens * (2 * parameters + kl + 2 * reward)


def plan_trial(trial: TrialSpec, shape: ModelShape, cost: CostSpec, pairs: Optional[int], reward: int = 0
               ) -> TrialPlan:
    method = METHODS[trial.method]
    t = trial.training
    n = parameter_count(shape)
    gpus = max(int(cost.gpus_per_trial), 1)
    s = sequence_tokens(cost, t)
    sequences = sequences_per_pair(method)
    memory = training_memory(shape, method, t, gpus, cost.sharding, s)
    lora = t.lora if method.trains else None

    epochs = int(trial.hparams.get("epochs", 1))
    trained_tokens = (pairs or 0) * sequences * s * epochs if method.trains else 0
    per_token = (4 if lora else 6) * n + (2 * n if method.needs_reference_logits else 0)
    return TrialPlan(**dataclasses.asdict(memory), parameters=n, gpus=gpus, train_flops=trained_tokens * per_token,
                     eval_flops=eval_flops(trial, n, reward, cost))


def reference_flops(parameters: int, spec: SweepSpec, pairs: Optional[int]) -> float:
    """The shared reference log-probs: one forward over every training pair's two sequences, once per sweep."""
    return 2 * parameters * (pairs or 0) * 2 * sequence_tokens(spec.cost, spec.training)


def _representative_trials(stage: StagePlan) -> list[TrialSpec]:
    """A grid stage's trials; for a searched stage, one trial at the top of every range (e.g. the most epochs)."""
    if stage.search is None:
        return stage.trials

    def top(bounds: list) -> object:
        numeric = all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
        return max(bounds) if numeric else bounds[0]

    return [stage.search.trial({k: top(range_bounds(v)) for k, v in stage.search.space.items()})]


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    trials: int
    plan: TrialPlan        # of the stage's first trial (memory is the same for every trial of a stage)
    seconds_per_trial: float
    gpu_hours: float       # the whole stage


@dataclass(frozen=True)
class SweepPlan:
    """Everything `sweep plan` prints about memory and compute, computed once."""
    parameters: int
    pairs: Optional[int]                 # training pairs the FLOPs assume (None: unknown)
    stages: list[StageEstimate]
    reference_gpu_hours: float           # the shared reference log-probs, once per sweep

    @property
    def gpu_hours(self) -> float:
        return sum(e.gpu_hours for e in self.stages) + self.reference_gpu_hours


def plan_stages(spec: SweepSpec, stages: list[StagePlan]) -> tuple[Optional[SweepPlan], str]:
    """Per-stage memory and FLOPs estimates and where the model's shape came from; (None, why) when the
    shape is unknown."""
    shape, source = model_shape(spec)
    if shape is None:
        return None, source
    pairs = train_pairs(spec)
    reward, _ = reward_parameters(spec)
    out = []
    for stage in stages:
        plans = [plan_trial(t, shape, spec.cost, pairs, reward or 0) for t in _representative_trials(stage)]
        mean_hours = sum(p.gpu_hours(spec.cost) for p in plans) / len(plans)
        out.append(StageEstimate(stage.stage, stage.size, plans[0], mean_hours * 3600 / plans[0].gpus,
                                 mean_hours * stage.size))
    parameters = parameter_count(shape)
    return SweepPlan(parameters, pairs, out, gpu_hours(reference_flops(parameters, spec, pairs), spec.cost)), source
