"""Sweep specs: YAML -> validated pydantic models. Every config model forbids unknown keys.

A bad spec raises SpecError, whose one-line message names the file, the line (where known), the field
path and what is allowed. Nothing is imported from torch here, so validation is quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from trainers.methods import METHODS, Method, unknown_name_message

Scalar = Union[int, float, str, bool]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- model ---------------------------------------------------------------------------------------
class TinyModelSpec(Strict):
    """A small LlamaForCausalLM built from config for the synthetic task's vocabulary."""
    kind: Literal["tiny"] = "tiny"
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    max_positions: int = Field(128, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        return self


def _existing_path(value: Optional[str], folder: bool) -> Optional[str]:
    """A spec path must exist when the spec loads (field-level, so the error names e.g. `reward.path`)."""
    if value is None:
        return value
    path = Path(value).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        raise ValueError(f"no such {'folder' if folder else 'file'}: {value} (resolved to {path.resolve()})")
    return value


class HFModelSpec(Strict):
    """Any Hugging Face causal LM: a local folder (`path`), a hub id (`hub_id`, needs the network or a filled
    HF cache), either optionally with a GGUF file inside (`gguf_file`; rebuilt once into a trainable folder)."""
    kind: Literal["hf"]
    path: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    trust_remote_code: bool = Field(False, description="run the model repository's own code (warned about)")
    require_chat_template: bool = Field(False, description="refuse a tokenizer without a chat template (an "
                                        "instruct model's tokenizer files missing) instead of plain-text prompts")

    _path_exists = field_validator("path")(lambda cls, v: _existing_path(v, folder=True))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of path (a local folder) or hub_id")
        if self.path and self.gguf_file and not (Path(self.path).expanduser() / self.gguf_file).is_file():
            raise ValueError(f"no GGUF file {self.gguf_file!r} in {self.path}")
        return self


ModelSpec = Annotated[Union[TinyModelSpec, HFModelSpec], Field(discriminator="kind")]


# ---- data and reward -----------------------------------------------------------------------------
class SyntheticDataSpec(Strict):
    """The built-in synthetic preference task (trainers/synthetic.py)."""
    kind: Literal["synthetic"] = "synthetic"
    seed: int = 0
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
    eval: Optional["EvalDataSpec"] = Field(None, description="a separate source for the evaluation pairs")

    _path_exists = field_validator("path")(lambda cls, v: _existing_path(v, folder=False))

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

    @model_validator(mode="after")
    def _columns_exist(self):
        first = _first_jsonl_row(self.path) if self.path else None
        if isinstance(first, dict):
            missing = [c for c in (self.columns.prompt, self.columns.chosen, self.columns.rejected) if c not in first]
            if missing:
                raise ValueError(f"columns {', '.join(map(repr, missing))} not in {self.path} "
                                 f"(its columns: {', '.join(map(str, first))}); map them with data.columns")
        return self


def _first_jsonl_row(path: str):
    """The first row of a local .jsonl(.gz) file, to check column names before anything runs."""
    import gzip
    import json

    p = Path(path).expanduser()
    if not p.name.endswith((".jsonl", ".jsonl.gz")):
        return None
    with (gzip.open if p.name.endswith(".gz") else open)(p, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


EvalDataSpec = Annotated[Union[HHRLHFDataSpec, SafeRLHFDataSpec, GenericDataSpec], Field(discriminator="kind")]
for _model in (FileDataSpec, HHRLHFDataSpec, SafeRLHFDataSpec, GenericDataSpec):
    _model.model_rebuild()

DataSpec = Annotated[Union[SyntheticDataSpec, HHRLHFDataSpec, SafeRLHFDataSpec, GenericDataSpec],
                     Field(discriminator="kind")]


class SyntheticRewardSpec(Strict):
    kind: Literal["synthetic"] = "synthetic"


class HFRewardSpec(Strict):
    """A Hugging Face sequence-classification reward model with one output: a local folder (`path`) or a
    hub id (`hub_id`, needs the network or a filled HF cache)."""
    kind: Literal["hf"]
    path: Optional[str] = None
    hub_id: Optional[str] = None
    trust_remote_code: bool = False
    batch_size: int = Field(16, gt=0)

    _path_exists = field_validator("path")(lambda cls, v: _existing_path(v, folder=True))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of path (a local folder) or hub_id")
        return self


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
    seed: int = 0
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
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(24, gt=0)
    num_prompts: int = Field(64, gt=0)
    seed: int = 0
    batch_size: int = Field(64, gt=0)


class TrainHParams(Strict):
    """Grid keys every method accepts, besides its own (trainers/methods.py)."""
    learning_rate: float = Field(gt=0)
    epochs: int = Field(1, ge=1)


# ---- grids and stages ----------------------------------------------------------------------------
class GridSpec(Strict):
    """`grid`: the product of the listed values. `zip`: equal-length lists taken together (coupled
    parameters, e.g. SimPO's beta and gamma), crossed with the grid."""
    grid: dict[str, list[Scalar]] = Field(default_factory=dict)
    zip: dict[str, list[Scalar]] = Field(default_factory=dict)
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

    def rank_launch(self) -> tuple[str, dict[str, float]]:
        """How a multi-process trial's ranks start (trainers.distributed.RANK_LAUNCHERS) and what each gets."""
        return "spawn", {}


class LocalExecutorSpec(ExecutorBase):
    """Trials one after another in the driver process."""
    kind: Literal["local"] = "local"


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

    def rank_launch(self) -> tuple[str, dict[str, float]]:
        if self.ranks == "spawn" or self.processes_per_trial == 1:
            return "spawn", {}
        n, r = self.processes_per_trial, self.resources_per_trial
        return "ray_train", {"CPU": r.cpu / n, **({"GPU": r.gpu / n} if r.gpu else {})}


class SlurmExecutorSpec(ExecutorBase):
    """One submitit job array per batch of trials; every trial a requeueable job (Checkpointable)."""
    kind: Literal["slurm"]
    partition: Optional[str] = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, gt=0)
    mem_gb: Optional[float] = Field(None, gt=0)
    timeout_min: int = Field(60, gt=0)
    array_parallelism: int = Field(64, gt=0, description="most array tasks running at once")
    unschedulable_timeout_min: float = Field(
        10.0, gt=0, description="a job pending because no node can take it (drained/down nodes, partition down) "
                                "this long is cancelled and recorded FAILED instead of waited on")
    max_requeues: int = Field(3, ge=0, description="requeues after preemption or time-out")
    poll_seconds: float = Field(2.0, gt=0)
    folder: Optional[str] = Field(None, description="submitit logs and pickles; default WORKDIR/slurm")
    sbatch_options: dict[str, str] = Field(default_factory=dict, description="extra #SBATCH options "
                                           "(e.g. account, qos, constraint)")
    nodes_per_trial: int = Field(1, ge=1, description="nodes of one multi-process trial: its processes_per_trial "
                                                     "ranks run as srun tasks, processes_per_trial / nodes per node")

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


class GridSearchSpec(Strict):
    kind: Literal["grid"] = "grid"


class OptunaSearchSpec(Strict):
    """Every stage that declares a `space` runs `n_trials` trials proposed by Optuna from it (stages without
    one still expand their grid). Trials run in batches as wide as the executor's parallelism."""
    kind: Literal["optuna"]
    n_trials: int = Field(gt=0, description="trials per searched stage")
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    metric: Literal["mean_score", "win_vs_chosen", "win_vs_sft"] = "mean_score"


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
    model_shape: Optional[ModelShape] = None


class TrackingSpec(Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite:///mlflow.db")
    server_host: str = Field("127.0.0.1", description="where the MLflow server that `sweep run` starts for "
                             "parallel trials on a SQLite store listens; only widen it on a trusted network")
    server_restarts: int = Field(3, ge=0, description="times that server is started again if it dies mid-sweep "
                                 "(trials retry their requests with backoff meanwhile)")


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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
    def _eval_prompts_exist(self):
        if self.evaluation.num_prompts > self.data.n_eval:
            raise ValueError(f"evaluation.num_prompts ({self.evaluation.num_prompts}) exceeds "
                             f"data.n_eval ({self.data.n_eval})")
        return self


# ---- errors --------------------------------------------------------------------------------------
class SpecError(ValueError):
    """A spec problem, printed as one line: `FILE:LINE: FIELD.PATH: what is wrong and what is allowed`."""

    def __init__(self, file: str, path: str, message: str, line: Optional[int] = None):
        self.file, self.path, self.message, self.line = file, path, message, line
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each field path (tuple of keys/indices) to its 1-based line in the YAML text."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
                lines[path + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _line_for(lines: dict[tuple, int], loc: tuple) -> Optional[int]:
    for end in range(len(loc), -1, -1):  # the deepest known ancestor
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _unwrap(annotation):
    """Strip Optional/Annotated to the model classes an annotation may hold."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin is Union:
        return [m for a in get_args(annotation) for m in _unwrap(a)]
    return [annotation]


def _resolve_loc(loc: tuple) -> tuple[tuple, list]:
    """Walk pydantic's error location through the spec's models. Returns the location without
    discriminator tags (pydantic inserts the `kind` value, e.g. model.tiny.hidden_size) and the types
    that may sit at the end of it."""
    candidates: list = [SweepSpec]
    clean: list = []
    for part in loc:
        nxt, is_tag = [], False
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                if part in c.model_fields:
                    nxt += _unwrap(c.model_fields[part].annotation)
                elif "kind" in c.model_fields and part in get_args(c.model_fields["kind"].annotation):
                    nxt.append(c)
                    is_tag = True
            elif get_origin(c) in (dict, list):
                nxt += _unwrap(get_args(c)[-1])
        if not is_tag:
            clean.append(part)
        candidates = nxt
    return tuple(clean), candidates


def _allowed_fields(candidates: list) -> list[str]:
    return sorted({f for c in candidates if isinstance(c, type) and issubclass(c, BaseModel) for f in c.model_fields})


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _error_from_validation(file: str, exc: ValidationError, lines: dict[tuple, int]) -> SpecError:
    errors = exc.errors()
    # A misspelt key also makes its real name "missing" in the same mapping: report the unknown key, which
    # explains both. Not inside a plain union's branches (their locations name no spec model): there pydantic
    # tries every branch, and its first error is the informative one.
    missing_in = {tuple(e["loc"][:-1]) for e in errors if e["type"] == "missing"}
    first = next((e for e in errors if e["type"] == "extra_forbidden" and tuple(e["loc"][:-1]) in missing_in
                  and _resolve_loc(tuple(e["loc"][:-1]))[1]), errors[0])
    loc, _ = _resolve_loc(tuple(first["loc"]))
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_fields(_resolve_loc(tuple(first["loc"])[:-1])[1])
        message = f"unknown field {loc[-1]!r}; allowed: {', '.join(allowed)}"
    elif first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "union_tag_invalid":  # e.g. executor: {kind: rey}
        ctx = first["ctx"]
        message = f"unknown kind {ctx['tag']!r}; allowed: {ctx['expected_tags'].replace(chr(39), '')}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], (dict, list)) and first["type"] != "value_error":
            message += f" (got {first['input']!r})"
    return SpecError(file, _format_loc(loc), message + more, _line_for(lines, loc))


# ---- method grids --------------------------------------------------------------------------------
def grid_fields(method: Method) -> dict[str, Any]:
    """Allowed grid keys of a method -> pydantic FieldInfo (training keys, then method keys)."""
    return {**(TrainHParams.model_fields if method.trains else {}), **method.params.model_fields}


def hparam_adapter(method: Method, key: str) -> TypeAdapter:
    """Validator and coercer of one grid key of `method` (YAML reads `1e-3` as a string: this makes it
    the float the field declares)."""
    field = grid_fields(method)[key]
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)])


def coerce_hparam(method: Method, key: str, value: Scalar) -> Scalar:
    return hparam_adapter(method, key).validate_python(value, strict=isinstance(value, bool))


def range_bounds(search_range: SearchRange) -> list[Scalar]:
    """The values a range can reach at its ends (or all of its choices), for validation."""
    if isinstance(search_range, Choice):
        return list(search_range.choices)
    if isinstance(search_range, IntRange):
        return [search_range.int_low, search_range.int_high]
    return [search_range.low, search_range.high]


def _check_grid(file: str, where: tuple, method: Method, grid: GridSpec, lines) -> None:
    fields = grid_fields(method)
    for section in ("grid", "zip"):
        for key, values in getattr(grid, section).items():
            loc = where + (section, key)
            if key not in fields:
                raise SpecError(file, _format_loc(loc), unknown_name_message(
                    f"hyperparameter for {method.name}", key, list(fields)), _line_for(lines, loc))
            for i, value in enumerate(values):
                try:
                    coerce_hparam(method, key, value)
                except ValidationError as exc:
                    msg = exc.errors()[0]["msg"]
                    raise SpecError(file, _format_loc(loc + (i,)), f"{msg} (got {value!r})",
                                    _line_for(lines, loc + (i,))) from None
    for key, search_range in grid.space.items():
        loc = where + ("space", key)
        if key not in fields:
            raise SpecError(file, _format_loc(loc), unknown_name_message(
                f"hyperparameter for {method.name}", key, list(fields)), _line_for(lines, loc))
        for value in range_bounds(search_range):
            try:
                coerce_hparam(method, key, value)
            except ValidationError as exc:
                raise SpecError(file, _format_loc(loc), f"{exc.errors()[0]['msg']} (got {value!r})",
                                _line_for(lines, loc)) from None
    given = set(grid.grid) | set(grid.zip) | set(grid.space)
    for key, field in fields.items():
        if field.is_required() and key not in given:
            loc = where + ("grid",)
            raise SpecError(file, _format_loc(loc), f"{method.name} needs {key!r} in grid or zip",
                            _line_for(lines, where))


def _check_methods(file: str, spec: SweepSpec, lines) -> None:
    _check_grid(file, ("stages", "sft"), METHODS["sft"], spec.stages.sft, lines)
    preference = [name for name, m in METHODS.items() if m.kind == "preference"]
    for name, grid in spec.stages.methods.items():
        loc = ("stages", "methods", name)
        if name not in preference:
            raise SpecError(file, _format_loc(loc), unknown_name_message("method", name, preference),
                            _line_for(lines, loc))
        _check_grid(file, loc, METHODS[name], grid, lines)


# ---- loading -------------------------------------------------------------------------------------
class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader (no Python tags, nothing executed), refusing a key given twice in one mapping: plain
    YAML keeps the last one silently, so `beta: [0.1]` further down would replace an earlier grid unseen."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_spec(text: str, file: str = "<spec>") -> SweepSpec:
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(file, "", f"invalid YAML: {problem}", mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise SpecError(file, "", f"a sweep spec is a YAML mapping; got {type(raw).__name__}")
    lines = _yaml_lines(text)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise _error_from_validation(file, exc, lines) from None
    _check_methods(file, spec, lines)
    return spec


def field_line(path: str | Path, field: str) -> Optional[int]:
    """The line of a dotted field (e.g. `data.eval.path`) in a spec file, or of its deepest ancestor there."""
    try:
        lines = _yaml_lines(Path(path).read_text())
    except OSError:
        return None
    return _line_for(lines, tuple(field.split(".")))


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), "", f"cannot read spec: {exc.strerror}") from None
    return parse_spec(text, str(path))
