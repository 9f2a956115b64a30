"""The sweep spec's schema: pydantic models, every one forbidding unknown keys.

Pure: validating a spec reads no file and imports no torch, so `sweep report` and `sweep status` load a spec
whose data is on another machine. Whether the paths it names exist and hold what they should is preflight's
job (trainers/preflight.py, run by `sweep run` and `sweep plan`). YAML text becomes a SweepSpec, or a
SpecError naming the file, line and field, in orchestrator.core.spec_file.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from orchestrator.core.methods import METHODS, Method

Scalar = Union[int, float, str, bool]


def _finite(value):
    # checked before the union: else each of its branches reports .inf/.nan its own way (four errors, one cause)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return value


GridValue = Annotated[Scalar, BeforeValidator(_finite)]
# A seed every consumer takes (torch.manual_seed, torch.Generator, random.Random, Optuna's samplers): 63 bits
Seed = Annotated[int, Field(ge=0, lt=2 ** 63, description="a seed: 0 <= seed < 2**63")]
# `--smoke` runs are tracked as NAME-smoke; a spec name cannot end so, or it would share that experiment
SMOKE_SUFFIX = "-smoke"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# early_stopping.min_peers' default: how many other trials must have reached a rung before one is stopped there
# (chosen from `benchmarks/bench_budget.py` runs: benchmarks/RESULTS.md, "Early stopping: min_peers").
DEFAULT_MIN_PEERS = 3


class Strict(BaseModel):
    # no unknown key, and no .inf/.nan where a number belongs (YAML reads them as floats that pass gt=0)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---- model ---------------------------------------------------------------------------------------
class TinyModelSpec(Strict):
    """A small LlamaForCausalLM built from config for the synthetic task's vocabulary."""
    kind: Literal["tiny"] = "tiny"
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    max_positions: int = Field(128, gt=0)
    seed: Seed = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        return self


class LocalOrHub(Strict):
    """A model read from a local folder (`path`) or a hub id (`hub_id`, needs the network or a filled HF cache)."""
    path: Optional[str] = None
    hub_id: Optional[str] = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of path (a local folder) or hub_id")
        return self


class HFModelSpec(LocalOrHub):
    """Any Hugging Face causal LM: a local folder (`path`), a hub id (`hub_id`, needs the network or a filled
    HF cache), either optionally with a GGUF file inside (`gguf_file`; rebuilt once into a trainable folder)."""
    kind: Literal["hf"]
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    trust_remote_code: bool = Field(False, description="run the model repository's own code (warned about)")
    require_chat_template: bool = Field(False, description="refuse a tokenizer without a chat template (an "
                                        "instruct model's tokenizer files missing) instead of plain-text prompts")


ModelSpec = Annotated[Union[TinyModelSpec, HFModelSpec], Field(discriminator="kind")]


# ---- data and reward -----------------------------------------------------------------------------
class SyntheticDataSpec(Strict):
    """The built-in synthetic preference task (trainers/synthetic.py)."""
    kind: Literal["synthetic"] = "synthetic"
    seed: Seed = 0
    n_train: int = Field(2000, ge=8)
    n_eval: int = Field(64, ge=1)
    label_noise: float = Field(0.1, ge=0, lt=0.5)


class FileDataSpec(Strict):
    """Shared by file/hub sources (trainers/sources.py): where the rows are and how to split them."""
    path: Optional[str] = Field(None, description=".jsonl, .jsonl.gz, .json or .parquet file")
    hub_id: Optional[str] = Field(None, description="a hub dataset name for datasets.load_dataset")
    split: str = Field("train", description="the hub dataset's split")
    n_train: Optional[int] = Field(None, ge=1, description="use at most this many training pairs")
    n_eval: int = Field(64, ge=1, description="held-out evaluation pairs")
    on_malformed: Literal["error", "skip"] = "error"
    max_row_chars: int = Field(200_000, gt=0, description="a row with a longer prompt or response is malformed "
                                                          "(tokenizing it would cost minutes before max_length "
                                                          "cuts it)")
    eval: Optional["EvalDataSpec"] = Field(None, description="a separate source for the evaluation pairs")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of path (a local file) or hub_id")
        if self.eval is not None and self.eval.eval is not None:
            raise ValueError("an eval source cannot have an eval source of its own")
        return self


class HHRLHFDataSpec(FileDataSpec):
    """Anthropic HH-RLHF rows ({chosen, rejected} whole dialogues)."""
    kind: Literal["hh_rlhf"]


class SafeRLHFDataSpec(FileDataSpec):
    """PKU-SafeRLHF rows; `rule` picks the chosen response (see trainers.sources.saferlhf_pair)."""
    kind: Literal["saferlhf"]
    rule: Literal["safe_vs_unsafe", "safer", "better"] = "safe_vs_unsafe"


class ColumnMap(Strict):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class GenericDataSpec(FileDataSpec):
    """Any rows with a prompt, a chosen and a rejected text column (names mapped by `columns`)."""
    kind: Literal["generic"]
    columns: ColumnMap = Field(default_factory=ColumnMap)


EvalDataSpec = Annotated[Union[HHRLHFDataSpec, SafeRLHFDataSpec, GenericDataSpec], Field(discriminator="kind")]
for _model in (FileDataSpec, HHRLHFDataSpec, SafeRLHFDataSpec, GenericDataSpec):
    _model.model_rebuild()

DataSpec = Annotated[Union[SyntheticDataSpec, HHRLHFDataSpec, SafeRLHFDataSpec, GenericDataSpec],
                     Field(discriminator="kind")]


class SyntheticRewardSpec(Strict):
    kind: Literal["synthetic"] = "synthetic"


class HFRewardSpec(LocalOrHub):
    """A Hugging Face sequence-classification reward model with one output: a local folder (`path`) or a
    hub id (`hub_id`, needs the network or a filled HF cache)."""
    kind: Literal["hf"]
    trust_remote_code: bool = False
    batch_size: int = Field(16, gt=0)


RewardSpec = Annotated[Union[SyntheticRewardSpec, HFRewardSpec], Field(discriminator="kind")]


# ---- training and evaluation ---------------------------------------------------------------------
class LoraSpec(Strict):
    """Train low-rank adapters (peft LoRA) instead of every weight. Reference-based methods then use the same
    model with its adapters disabled as the reference: no second copy in memory."""
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1, description="module names to adapt (Llama/Phi-3 naming)")


class TrainingSpec(Strict):
    batch_size: int = Field(32, gt=0, description="pairs per optimizer step (the global batch, whatever the "
                                                   "process count and micro_batch_size)")
    micro_batch_size: Optional[int] = Field(
        None, gt=0, description="pairs per forward/backward pass on one process: its share of every batch runs "
                                "in micro-batches whose gradients accumulate into one optimizer step, so memory "
                                "follows this size while the batch stays batch_size (None: the whole share)")
    max_length: int = Field(48, gt=1)
    seed: Seed = 0
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    max_steps: Optional[int] = Field(None, gt=0, description="cap on optimizer steps per trial")
    log_every: int = Field(10, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision of forward/backward (weights and optimizer stay fp32); fp16 "
                            "needs a CUDA GPU and uses loss scaling")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                                            "memory, ~30% more compute")
    padding_free: bool = Field(True, description="pack each micro-batch's sequences into rows without padding, a "
                                                 "pair's prompt computed once for both responses, where the model's "
                                                 "attention can (sdpa, eager); false: one padded row per sequence. "
                                                 "Same numbers either way, to float rounding")
    lora: Optional[LoraSpec] = Field(None, description="train LoRA adapters only (see LoraSpec)")


class EvaluationSpec(Strict):
    temperature: float = Field(0.7, ge=0.01, le=100, description="sampling temperature; below 0.01 the tempered "
                               "logits leave float range")
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(24, gt=0, le=32768)
    num_prompts: int = Field(64, gt=0)
    seed: Seed = Field(0, description="with each prompt's id, the seed of that prompt's own random stream: a sample "
                                     "depends on its prompt, this seed and the weights only")
    batch_size: int = Field(128, gt=0, description="prompts per generation batch at most (and sequences per KL "
                                                   "batch); sampling does not depend on it")
    batch_tokens: int = Field(32768, gt=0, description="token budget of a generation batch: prompts are sorted by "
                              "length and a batch holds as many as keep rows x (its longest prompt + max_new_tokens) "
                              "within it; sampling does not depend on it. Raise it on GPUs")
    max_prompt_length: Optional[int] = Field(None, gt=0, description="evaluation prompts longer than this many "
                                             "tokens keep their end, as training does (default: training.max_length)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="autocast precision of the policy's and SFT "
                                               "model's passes (sampling and KL); bf16 is fast on GPUs and on CPUs "
                                               "with AVX512-BF16 or AMX. The gold reward always scores in fp32")
    engine: Literal["transformers"] = Field("transformers", description="what samples (trainers.generation.ENGINES)")
    sampler_version: Literal[2] = Field(2, description="the sampling scheme, part of every trial key: 2 = a random "
                                        "stream per prompt (version 1, one stream per batch, is gone)")
    rungs: list[float] = Field(default_factory=list, description="intermediate evaluations during training, as "
                               "fractions of the trial's optimizer steps (e.g. [0.2, 0.5]): the same metrics on "
                               "rung_prompts of the evaluation prompts plus the held-out pairs' implicit-reward "
                               "accuracy and margin, logged as rung/* at the training step; what "
                               "search.early_stopping decides on. The final evaluation is unchanged")
    rung_every: Optional[int] = Field(None, gt=0, description="instead of `rungs`: a rung every N optimizer steps "
                                      "(rung k at step k*N): trials then compare at equal training compute, "
                                      "whatever their epochs")
    rung_steps: list[int] = Field(default_factory=list, description="instead of `rungs`: rungs at these optimizer "
                                  "steps, e.g. ASHA's geometric milestones [12, 36, 108] (equal compute, few "
                                  "evaluations for long trials)")
    rung_prompts: int = Field(16, gt=0, description="evaluation prompts a rung evaluates: a fixed subset of the "
                              "num_prompts, drawn once with `seed`, the same for every trial")

    @property
    def has_rungs(self) -> bool:
        return bool(self.rungs) or self.rung_every is not None or bool(self.rung_steps)

    @model_validator(mode="after")
    def _one_way_to_place_rungs(self):
        given = [name for name, value in (("rungs", self.rungs), ("rung_every", self.rung_every),
                                          ("rung_steps", self.rung_steps)) if value]
        if len(given) > 1:
            raise ValueError(f"give one of evaluation.rungs (fractions of the steps), rung_every (every N steps) "
                             f"or rung_steps (at these steps); got {' and '.join(given)}")
        if any(s <= 0 for s in self.rung_steps) or any(b <= a for a, b in zip(self.rung_steps, self.rung_steps[1:])):
            raise ValueError(f"rung_steps must be positive and increase; got {self.rung_steps}")
        return self

    @field_validator("rungs")
    @classmethod
    def _rungs_inside_training(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value):
            raise ValueError(f"rungs are fractions of a trial's steps strictly between 0 and 1; got {value}")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"rungs must increase; got {value}")
        return value


class TrainHParams(Strict):
    """Grid keys every method accepts, besides its own (orchestrator/core/methods.py)."""
    learning_rate: float = Field(gt=0)
    epochs: int = Field(1, ge=1)


# ---- grids and stages ----------------------------------------------------------------------------
class GridSpec(Strict):
    """`grid`: the product of the listed values. `zip`: equal-length lists taken together (coupled
    parameters, e.g. SimPO's beta and gamma), crossed with the grid."""
    grid: dict[str, list[GridValue]] = Field(default_factory=dict)
    zip: dict[str, list[GridValue]] = Field(default_factory=dict)
    space: dict[str, SearchRange] = Field(default_factory=dict, description="ranges for search.kind optuna")

    @field_validator("grid", "zip")
    @classmethod
    def _non_empty_distinct(cls, value: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"{key}: empty list; give at least one value")
        return value

    @model_validator(mode="after")
    def _zip_lengths(self):
        lengths = {k: len(v) for k, v in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zip lists must have equal lengths; got {lengths}")
        for a, b in (("grid", "zip"), ("grid", "space"), ("zip", "space")):
            both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            if both:
                raise ValueError(f"{', '.join(both)} given in both {a} and {b}; keep each key in one")
        if self.space:
            listed = sorted([k for k, v in self.grid.items() if len(v) > 1] + list(self.zip))
            if listed:
                raise ValueError(f"a searched stage (with `space`) takes one fixed value per grid key; "
                                 f"{', '.join(listed)} list several: move them into space as choices")
        for key, values in self.grid.items():
            duplicates = sorted({str(v) for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(f"grid.{key}: duplicate values {', '.join(duplicates)}")
        rows = list(zip(*self.zip.values()))
        repeated = sorted({str(r) for r in rows if rows.count(r) > 1})
        if repeated:
            raise ValueError(f"zip: duplicate rows {', '.join(repeated)} ({', '.join(self.zip)}); each would be "
                             "the same trial")
        return self


class StagesSpec(Strict):
    sft: GridSpec
    methods: dict[str, GridSpec] = Field(min_length=1)


class ExecutorBase(Strict):
    checkpoint_every: Optional[int] = Field(
        None, gt=0, description="save the training state every N optimizer steps; a killed, preempted or "
                                "requeued trial resumes from its last save")
    processes_per_trial: int = Field(
        1, ge=1, description="data-parallel processes of one trial (DDP under accelerate: one per GPU, gloo on "
                             "CPU); each takes batch_size / N pairs of every batch")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with processes_per_trial > 1: ddp (a full copy of the weights, gradients and AdamW "
                           "state in every process) or fsdp (torch FSDP2: each decoder layer's parameters, "
                           "gradients and optimizer state split over the processes)")
    shared_workdir: Optional[bool] = Field(
        None, description="whether every node sees the sweep's workdir at the driver's path (one machine, a shared "
                          "filesystem); false: trials keep their files on their node (node_dir) and read what "
                          "other trials left from the tracking store. Default: true; false for ray (unless ranks: "
                          "ray_train)")
    node_dir: Optional[str] = Field(
        None, description="with shared_workdir false: where a trial keeps its files on its node (~ expanded there); "
                          "default TMPDIR/posweep-nodes")

    def needs_shared_workdir(self) -> Optional[str]:
        """Why this executor's trials need the driver's workdir (shared_workdir: false is then refused), or None."""
        return None

    @property
    def shares_workdir(self) -> bool:
        return True if self.shared_workdir is None else self.shared_workdir

    @model_validator(mode="after")
    def _workdir_can_be_unshared(self):
        reason = self.needs_shared_workdir()
        if self.shared_workdir is False and reason:
            raise ValueError(f"shared_workdir: false is not possible here: {reason}")
        return self

    def rank_launch(self) -> tuple[str, dict[str, float]]:
        """How a multi-process trial's ranks start (trainers.distributed.RANK_LAUNCHERS) and what each gets."""
        return "spawn", {}


class LocalExecutorSpec(ExecutorBase):
    """Trials one after another in the driver process, or `workers` at once in worker processes of this machine."""
    kind: Literal["local"] = "local"
    workers: int = Field(1, ge=1, description="trials at once: 1 runs them in the driver; N > 1 in N worker "
                                              "processes (the tracking store is then served to them, as for ray)")

    def needs_shared_workdir(self) -> Optional[str]:
        return ("the local executor runs every trial on the driver's machine, on its disk (shared_workdir: false is "
                "for trials on other nodes: executor kind ray)")


class RayResources(Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0, description="fractions allowed (0.5: two trials share a GPU)")


class RayExecutorSpec(ExecutorBase):
    """Ray Tune over the pending trials, on a local Ray (address omitted) or an existing cluster."""
    kind: Literal["ray"]
    address: Optional[str] = Field(None, description="e.g. 'auto' or 'ray://head:10001'; omitted: start a "
                                                     "local Ray for this sweep")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs of the local Ray (default: all)")
    ranks: Literal["spawn", "ray_train"] = Field(
        "spawn", description="how a trial's processes_per_trial ranks start: spawn (on the Tune trial's node, "
                             "inside its resources_per_trial) or ray_train (a Ray Train run of that many workers "
                             "inside the Tune trial, placed anywhere in the cluster: trials larger than a node; "
                             "each worker gets resources_per_trial / processes_per_trial)")
    resources_per_trial: RayResources = Field(default_factory=RayResources)
    max_concurrent_trials: Optional[int] = Field(None, gt=0)
    max_failures: int = Field(2, ge=0, description="retries of a trial whose worker process or node died")

    def needs_shared_workdir(self) -> Optional[str]:
        if self.rank_launch()[0] != "ray_train":
            return None
        return ("ranks: ray_train places a trial's ranks on any node, and rank 0 leaves its outcome in the trial's "
                "folder: it needs shared_workdir: true (a shared filesystem); or use ranks: spawn")

    @property
    def shares_workdir(self) -> bool:
        """Ray clusters are mostly nodes with their own disks (cloud VMs, Kubernetes pods): not shared unless said,
        or unless the trials need it (ranks: ray_train)."""
        if self.shared_workdir is None:
            return self.needs_shared_workdir() is not None
        return self.shared_workdir

    def rank_launch(self) -> tuple[str, dict[str, float]]:
        if self.ranks == "spawn" or self.processes_per_trial == 1:
            return "spawn", {}
        n, r = self.processes_per_trial, self.resources_per_trial
        return "ray_train", {"CPU": r.cpu / n, **({"GPU": r.gpu / n} if r.gpu else {})}


class SlurmExecutorSpec(ExecutorBase):
    """One submitit job per trial, submitted as a slot frees; every trial a requeueable job (Checkpointable)."""
    kind: Literal["slurm"]
    partition: Optional[str] = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, gt=0)
    mem_gb: Optional[float] = Field(None, gt=0)
    timeout_min: int = Field(60, gt=0)
    array_parallelism: int = Field(64, gt=0, description="most trial jobs submitted at once (the "
                                   "name is from when a batch was one job array)")
    unschedulable_timeout_min: float = Field(
        10.0, gt=0, description="a job pending because no node can take it (drained/down nodes, partition down) "
                                "this long is cancelled and recorded FAILED instead of waited on")
    max_requeues: int = Field(3, ge=0, description="requeues after preemption or time-out")
    poll_seconds: float = Field(2.0, gt=0, le=600)
    folder: Optional[str] = Field(None, description="submitit logs and pickles; default WORKDIR/slurm")
    sbatch_options: dict[str, str] = Field(default_factory=dict, description="extra #SBATCH options "
                                           "(e.g. account, qos, constraint)")
    nodes_per_trial: int = Field(1, ge=1, description="nodes of one multi-process trial: its processes_per_trial "
                                                     "ranks run as srun tasks, processes_per_trial / nodes per node")

    def needs_shared_workdir(self) -> Optional[str]:
        return ("submitit hands every job its task and takes its result through files in executor.folder, which the "
                "nodes must share")

    @model_validator(mode="after")
    def _ranks_fill_nodes(self):
        if self.processes_per_trial % self.nodes_per_trial:
            raise ValueError(f"processes_per_trial {self.processes_per_trial} must be a multiple of nodes_per_trial "
                             f"{self.nodes_per_trial} (the same number of tasks on every node)")
        return self


ExecutorSpec = Annotated[Union[LocalExecutorSpec, RayExecutorSpec, SlurmExecutorSpec], Field(discriminator="kind")]


# ---- search beyond grids -------------------------------------------------------------------------
class FloatRange(Strict):
    """`{low: 1e-5, high: 1e-3, log: true}`: uniform, or log-uniform with `log: true`."""
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


class IntRange(Strict):
    """`{int_low: 1, int_high: 3}`: integers from low to high inclusive."""
    int_low: int
    int_high: int

    @model_validator(mode="after")
    def _ordered(self):
        if not self.int_low < self.int_high:
            raise ValueError(f"int_low ({self.int_low}) must be below int_high ({self.int_high})")
        return self


class Choice(Strict):
    """`{choices: [1, 3]}`: one of the listed values."""
    choices: list[Scalar] = Field(min_length=1)


SearchRange = Union[FloatRange, IntRange, Choice]


class AshaSpec(Strict):
    """Asynchronous successive halving (ASHA, Li et al. 2020, as Ray Tune's ASHAScheduler): at each rung of
    evaluation.rungs a trial is stopped when its `metric` is below the (1 - 1/reduction_factor) quantile of the
    values the stage's other trials logged at that rung (it is not in their top 1/reduction_factor); the first
    trial to reach a rung always goes on. The decision is the trial's own, read from the tracking store, so it is
    the same on every executor (orchestrator.core.rungs)."""
    kind: Literal["asha"]
    metric: Literal["rung/mean_score", "rung/win_vs_chosen", "rung/win_vs_sft", "rung/pair_accuracy",
                    "rung/pair_margin", "rung/kl", "rung/length"] = "rung/mean_score"
    mode: Literal["max", "min"] = Field("max", description="max: higher is better (min for rung/kl, rung/length)")
    reduction_factor: float = Field(3.0, gt=1, description="η: a trial goes on past a rung when it is in the top "
                                                           "1/η of the trials that reached the rung")
    min_rung: int = Field(1, ge=1, description="the first rung (1-based) at which trials may be stopped; earlier "
                                               "rungs are evaluated and logged only")
    min_peers: int = Field(DEFAULT_MIN_PEERS, ge=0, le=1000,
                           description="a trial is stopped at a rung only once at least this many other trials "
                                       "reached it (Ray's ASHA stops against a single one); before, it goes on")
    order_seed: Seed = Field(0, description="grid trials start in an order shuffled with this seed, not the grid's "
                                           "written order, whose first trials (one learning rate, one beta) would "
                                           "set every rung's bar")


EarlyStoppingSpec = AshaSpec  # the one kind so far; a union on `kind` once there are others


class GridSearchSpec(Strict):
    kind: Literal["grid"] = "grid"
    early_stopping: Optional[EarlyStoppingSpec] = Field(None, description="stop trials at rungs (ASHA)")


class OptunaSearchSpec(Strict):
    """Every stage that declares a `space` runs `n_trials` trials proposed by Optuna from it (stages without
    one still expand their grid). Trials run in batches as wide as the executor's parallelism."""
    kind: Literal["optuna"]
    n_trials: int = Field(gt=0, description="trials per searched stage")
    sampler: Literal["tpe", "random"] = "tpe"
    seed: Seed = 0
    metric: Literal["mean_score", "win_vs_chosen", "win_vs_sft"] = "mean_score"
    early_stopping: Optional[EarlyStoppingSpec] = Field(None, description="stop trials at rungs (ASHA); a stopped "
                                                        "trial is told to Optuna as PRUNED with its rung values")


SearchSpec = Annotated[Union[GridSearchSpec, OptunaSearchSpec], Field(discriminator="kind")]


class ModelShape(Strict):
    """A decoder's shape, for the planner when the model's config.json is not on this machine (a hub id not
    in the local HF cache). Numbers as in the model's config.json."""
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: Optional[int] = Field(None, gt=0, description="default: num_heads (no grouped-query attention)")
    vocab_size: int = Field(gt=0)
    tie_embeddings: bool = False


class CostSpec(Strict):
    """What `sweep plan` assumes before any trial of the sweep has run (measured trials replace it), and the
    hardware it plans memory and GPU-hours for."""
    trial_seconds: Optional[float] = Field(None, gt=0, description="wall seconds of one trial")
    gpus_per_trial: float = Field(0.0, ge=0)
    gpu_memory_gb: Optional[float] = Field(None, gt=0, description="memory of one GPU; `plan` flags trials that "
                                                                  "will not fit")
    sharding: Literal["ddp", "fsdp"] = Field("ddp", description="planning assumption: ddp keeps a full copy of "
                                             "weights, gradients and optimizer state per GPU; fsdp (ZeRO-3) "
                                             "shards them over gpus_per_trial")
    peak_tflops: float = Field(989.0, gt=0, description="per-GPU dense bf16 peak (H100 SXM: 989)")
    utilization: float = Field(0.35, gt=0, le=1, description="model FLOPs utilisation assumed")
    mean_tokens: Optional[int] = Field(None, gt=0, description="mean tokens per sequence (default: "
                                                               "training.max_length, an upper bound)")
    train_pairs: Optional[int] = Field(None, gt=0, description="training pairs of a hub dataset (default: "
                                                               "data.n_train)")
    prompt_tokens: Optional[int] = Field(None, gt=0, description="mean tokens of an evaluation prompt (default: "
                                                                 "half of mean_tokens)")
    reward_parameters: Optional[int] = Field(None, gt=0, description="the reward model's parameters, when no "
                                                                     "config.json of it is on this machine")
    model_shape: Optional[ModelShape] = None


class TrackingSpec(Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI: sqlite:///PATH.db (default "
                                                 "sqlite:///mlflow.db), postgresql://USER:PASSWORD@HOST/DB, or an "
                                                 "MLflow server")
    system_metrics: bool = Field(True, description="log CPU, memory, disk, network (and GPU, where pynvml is "
                                 "installed) utilisation into every trial run, as MLflow's system metrics")
    system_metrics_interval: float = Field(10.0, ge=0.5, le=3600, description="seconds between system-metric samples; "
                                           "every trial logs at least one, when it ends")
    server_host: str = Field("127.0.0.1", description="where the MLflow server that `sweep run` starts for "
                             "parallel trials on a SQLite or PostgreSQL store listens; only widen it on a trusted "
                             "network")
    server_restarts: int = Field(3, ge=0, description="times that server is started again if it dies mid-sweep "
                                 "(trials retry their requests with backoff meanwhile)")


class CheckpointsSpec(Strict):
    """Which trained preference models outlive their trial (SFT checkpoints that preference stages start from
    are always kept). Kept weights are run artifacts (`model/`, a Hugging Face folder); the best trial of each
    method is registered in the MLflow Model Registry as SWEEP-METHOD, alias `best`."""
    keep: Literal["best_per_method", "all", "none"] = Field(
        "best_per_method", description="best_per_method: each method's best trial by mean_score (a superseded "
        "best is deleted as the sweep goes); all: every finished trial's; none: no preference weights")
    registry: bool = Field(True, description="register each method's best kept model (needs keep other than none)")


class SweepSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100, description="the MLflow experiment, and part of file, "
                      "study and registered-model names; letters, digits, _ . -, not ending in -smoke")
    workdir: str = Field("posweep_runs", description="checkpoints, samples and caches go here")
    model: ModelSpec = Field(default_factory=TinyModelSpec)
    data: DataSpec = Field(default_factory=SyntheticDataSpec)
    reward: RewardSpec = Field(default_factory=SyntheticRewardSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    stages: StagesSpec
    executor: ExecutorSpec = Field(default_factory=LocalExecutorSpec)
    search: SearchSpec = Field(default_factory=GridSearchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    checkpoints: CheckpointsSpec = Field(default_factory=CheckpointsSpec)
    max_trials: int = Field(10_000, gt=0, description="the most trials the grids may plan: a guard against a grid "
                                                      "of a million points by mistake; raise it for a bigger sweep")

    @field_validator("name")
    @classmethod
    def _name_not_a_smoke_name(cls, value: str) -> str:
        if value.endswith(SMOKE_SUFFIX):
            raise ValueError(f"a sweep name cannot end in {SMOKE_SUFFIX!r}: `--smoke` runs of sweep "
                             f"{value.removesuffix(SMOKE_SUFFIX)!r} are tracked under that name")
        return value

    @model_validator(mode="after")
    def _search_has_a_space(self):
        grids = [self.stages.sft, *self.stages.methods.values()]
        if self.search.kind == "optuna" and not any(g.space for g in grids):
            raise ValueError("search.kind optuna needs a `space` in at least one stage (ranges to search)")
        if self.search.kind == "grid" and any(g.space for g in grids):
            raise ValueError("a stage declares `space` but search.kind is grid; set search: {kind: optuna, "
                             "n_trials: N} or remove the space")
        return self

    @model_validator(mode="after")
    def _processes_fit(self):
        n = self.executor.processes_per_trial
        if n == 1:
            return self
        if self.training.batch_size % n:
            raise ValueError(f"executor.processes_per_trial {n} must divide training.batch_size "
                             f"{self.training.batch_size} (every process takes an equal share of each batch)")
        return self

    @model_validator(mode="after")
    def _fsdp_supported(self):
        """FSDP trains the model sharded; what needs the whole model during training is refused, with why."""
        if self.executor.sharding != "fsdp":
            return self
        refusals = [
            (self.executor.processes_per_trial < 2, "needs executor.processes_per_trial of 2 or more"),
            (self.executor.checkpoint_every is not None,
             "cannot be combined with executor.checkpoint_every yet (the saved state would be one shard)"),
            (self.training.lora is not None, "cannot be combined with training.lora yet"),
            (self.training.precision == "fp16", "cannot be combined with precision fp16 (its loss scaler is "
                                                "not sharded); use bf16"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(f"executor.sharding fsdp {why}")
        return self

    @model_validator(mode="after")
    def _whole_batch_methods_unsplit(self):
        """β-DPO, ε-DPO and KTO compute statistics over the batch each loss call sees: splitting a batch over
        processes or micro-batches would change their result, not only their memory."""
        n, micro = self.executor.processes_per_trial, self.training.micro_batch_size
        splits = []
        if n > 1:
            splits.append(f"over {n} processes (executor.processes_per_trial)")
        if micro is not None and micro < self.training.batch_size // n:
            splits.append(f"into micro-batches of {micro} (training.micro_batch_size)")
        batchwise = sorted(m for m in self.stages.methods if m in METHODS and METHODS[m].batch_statistics)
        if splits and batchwise:
            raise ValueError(f"{', '.join(batchwise)} use statistics of the whole batch, which a batch split "
                             f"{' and '.join(splits)} would change; run them unsplit")
        return self

    @model_validator(mode="after")
    def _early_stopping_has_rungs(self):
        stopping, rungs, evaluation = self.search.early_stopping, self.evaluation.rungs, self.evaluation
        if stopping is not None and not evaluation.has_rungs:
            raise ValueError("search.early_stopping needs evaluation.rungs (e.g. [0.2, 0.5]) or "
                             "evaluation.rung_every: the intermediate evaluations it decides at")
        listed = rungs or evaluation.rung_steps
        if stopping is not None and listed and stopping.min_rung > len(listed):
            raise ValueError(f"search.early_stopping.min_rung {stopping.min_rung} is past the last of the "
                             f"{len(listed)} evaluation rungs")
        if evaluation.has_rungs and self.executor.processes_per_trial > 1:
            raise ValueError("evaluation rungs cannot be combined with executor.processes_per_trial > 1 yet "
                             "(a rung evaluates on the main process while the others would wait)")
        if evaluation.has_rungs and self.evaluation.rung_prompts > self.evaluation.num_prompts:
            raise ValueError(f"evaluation.rung_prompts ({self.evaluation.rung_prompts}) exceeds "
                             f"evaluation.num_prompts ({self.evaluation.num_prompts})")
        return self

    @model_validator(mode="after")
    def _eval_prompts_exist(self):
        if self.evaluation.num_prompts > self.data.n_eval:
            raise ValueError(f"evaluation.num_prompts ({self.evaluation.num_prompts}) exceeds "
                             f"data.n_eval ({self.data.n_eval})")
        return self


# ---- method grids --------------------------------------------------------------------------------
def grid_fields(method: Method) -> dict[str, Any]:
    """Allowed grid keys of a method -> pydantic FieldInfo (training keys, then method keys)."""
    return {**(TrainHParams.model_fields if method.trains else {}), **method.params.model_fields}


@functools.lru_cache(maxsize=None)
def hparam_adapter(method: Method, key: str) -> TypeAdapter:
    """Validator and coercer of one grid key of `method` (YAML reads `1e-3` as a string: this makes it the
    float the field declares; .inf and .nan are refused). Built once per key: a plan of 100,000 trials coerces
    every value of every trial."""
    field = grid_fields(method)[key]
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)], config=ConfigDict(allow_inf_nan=False))


def coerce_hparam(method: Method, key: str, value: Scalar) -> Scalar:
    # a grid's values repeat across its points; the type is part of the cache key (1 == 1.0 == True)
    return _coerced(method, key, value, type(value))


@functools.lru_cache(maxsize=65536)
def _coerced(method: Method, key: str, value: Scalar, kind: type) -> Scalar:
    return hparam_adapter(method, key).validate_python(value, strict=kind is bool)


def range_bounds(search_range: SearchRange) -> list[Scalar]:
    """The values a range can reach at its ends (or all of its choices), for validation."""
    if isinstance(search_range, Choice):
        return list(search_range.choices)
    if isinstance(search_range, IntRange):
        return [search_range.int_low, search_range.int_high]
    return [search_range.low, search_range.high]


