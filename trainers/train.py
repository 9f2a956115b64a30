"""One training loop for SFT and every preference loss (accelerate, so the same code runs on a GPU).

The loop knows nothing about methods: an objective (trainers.objectives) turns a batch into (loss, stats).
Also here: the reference pass (reference log-probs of the training pairs) and the optimizer.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from orchestrator.core.outcome import Checkpointing
from orchestrator.infra.files import write_file_atomically
from trainers.cache import save_tensors
from trainers.data import EncodedPair
from trainers.logprobs import choose_layout, sequence_logps
from trainers.objectives import Objective
from trainers.packing import unit_length

OnLog = Callable[[int, int, dict[str, float]], None]  # (step, total_steps, stats)
# (step, total_steps, the model being trained) after every optimizer step; may raise to end training there
AfterStep = Callable[[int, int, torch.nn.Module], None]


@dataclass(frozen=True)
class LoopHooks:
    """What the loop calls back: `on_log` at each logged step with its stats, `after_step` after every step
    (evaluation rungs: trainers.rungs)."""
    on_log: Optional[OnLog] = None
    after_step: Optional[AfterStep] = None


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}; the trial diverged "
                         "(try a lower learning rate)")
        self.step = step


class CheckpointWriteError(RuntimeError):
    """The training state could not be written (disk full, quota); the previous save is intact (atomic writes)."""


@dataclass(frozen=True)
class LoopSettings:
    learning_rate: float
    epochs: int
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    max_steps: Optional[int]
    seed: int
    log_every: int
    precision: str = "fp32"   # fp32 | bf16 | fp16: autocast of the objective's forward; fp16 adds loss scaling
    micro_batch_size: Optional[int] = None  # pairs per forward/backward pass on one process (None: its whole share)
    sharding: str = "ddp"     # ddp | fsdp: how several processes hold the model (executor.sharding)
    padding_free: bool = True  # packed rows, a pair's prompt once, where the model can (trainers.packing)
    # The id padding positions hold: any id of the vocabulary gives the same numbers (padding is never attended
    # to or scored); trials use their tokenizer's pad id.
    pad_id: int = 0


# Autocast dtypes of training.precision; weights and optimizer state stay fp32 (mixed precision).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The forward passes' autocast context for a precision (training.precision, evaluation.precision)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("training.precision fp16 needs a CUDA GPU (fp16 autocast with loss scaling); this trial "
                         f"runs on {device.type}: use bf16 or fp32")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def load_training_state(checkpointing: Optional[Checkpointing]) -> Optional[dict]:
    """The last saved loop state, or None (no checkpointing, nothing saved yet, or an unreadable file)."""
    if checkpointing is None or not checkpointing.path.is_file():
        return None
    try:
        return torch.load(checkpointing.path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged (or non-tensor: weights_only) save: start over
        return None


def _save_training_state(checkpointing: Checkpointing, step: int, model, optimizer, scheduler, objective,
                         history: list[dict[str, float]]) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "history": history, "rng": torch.get_rng_state(),
             "objective": objective.state_dict()}
    try:
        write_file_atomically(checkpointing.path, lambda tmp: save_tensors(state, tmp))
        write_file_atomically(checkpointing.folder / "step", lambda tmp: Path(tmp).write_text(str(step)))
    except OSError as exc:
        raise CheckpointWriteError(f"could not save the training state at step {step} to {checkpointing.folder}: "
                                   f"{type(exc).__name__}: {exc}") from exc


def _restore_training_state(state: dict, model, optimizer, scheduler, objective) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["objective"] is not None:
        objective.load_state_dict(state["objective"])


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (torch.distributed.fsdp.fully_shard) in place: every decoder layer (the model's
    `_no_split_modules` classes) and then the root, so each process keeps 1/N of every parameter, gradient
    and AdamW moment and gathers one layer's weights at a time. Needs the process group (make_accelerator)."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of the main process (an empty dict elsewhere), gathered from the
    shards of a sharded model; every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def make_accelerator() -> Accelerator:
    """The accelerator of a trial: device placement and DDP only; precision is the loop's own autocast
    (training.precision). accelerate's state is process-wide, so a leftover state that disagrees with this
    process is reset first: one left in bf16 by another library's trainer built earlier in the same process
    (TRL's configs default to bf16: every later Accelerator would autocast unasked), or one built for another
    world size (a SLURM task 0 builds a single-process accelerator, then joins its job's other tasks)."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        AcceleratorState._reset_state(reset_partial_state=True)
    elif AcceleratorState._shared_state and AcceleratorState().mixed_precision != "no":
        AcceleratorState._reset_state(reset_partial_state=False)
    if torch.cuda.is_available():
        use_fast_attention_for_varying_lengths()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def use_fast_attention_for_varying_lengths() -> None:
    """Keep scaled-dot-product attention off cuDNN's backend. torch prefers it for bf16/fp16 on Hopper, and it
    pays a host-side plan build for each new sequence shape: batches here are padded to their longest pair, so
    the shape changes nearly every step, and on an H100 a bf16 step ended slower than an fp32 one
    (benchmarks/RESULTS.md, "A real DPO step on a GPU"). Flash and memory-efficient attention have no per-shape
    cost."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def count_steps(n_examples: int, settings: LoopSettings) -> int:
    steps = math.ceil(n_examples / settings.batch_size) * settings.epochs
    return min(steps, settings.max_steps) if settings.max_steps else steps


def longest_sequence(pairs: list[EncodedPair]) -> int:
    return max(max(len(p.chosen.ids), len(p.rejected.ids)) for p in pairs)


@torch.no_grad()
def reference_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, device: torch.device,
                    padding_free: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected summed log-probs, each (N,), in pair-index order."""
    model.eval()
    layout = choose_layout(model, padding_free, longest_sequence(pairs))
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    chosen = torch.empty(len(pairs), dtype=dtype)
    rejected = torch.empty(len(pairs), dtype=dtype)
    for start in range(0, len(pairs), batch_size):
        batch = layout.pairs(pairs[start:start + batch_size], pad_id)
        half = batch["index"].shape[0]
        logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        chosen[batch["index"]] = logps[:half].cpu()
        rejected[batch["index"]] = logps[half:].cpu()
    return chosen, rejected


def make_optimizer(params: list[torch.nn.Parameter], settings: LoopSettings) -> torch.optim.AdamW:
    """AdamW as one fused kernel where torch has one for the parameters' device (CPU and CUDA here): on a CPU an
    order of magnitude faster than the per-parameter loop, with the same updates to float rounding
    (tests/trainers/test_train.py). Sharded (DTensor) parameters take the foreach
    path, which DTensor implements."""
    from torch.distributed.tensor import DTensor
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = {p.device.type for p in params}
    fused = (bool(params) and devices <= set(_get_fused_kernels_supported_devices())
             and not any(isinstance(p, DTensor) for p in params) and all(p.is_floating_point() for p in params))
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def _share(global_batch: list, world: int, rank: int) -> Optional[list]:
    """This process's contiguous share of a global batch (sizes differ by at most one), or None when some
    process would get no pair (every process must take part in each step)."""
    if len(global_batch) < world:
        return None
    base, extra = divmod(len(global_batch), world)
    start = rank * base + min(rank, extra)
    return global_batch[start:start + base + (rank < extra)]


def micro_batches(share: list[EncodedPair], micro_batch_size: Optional[int]) -> list[list[EncodedPair]]:
    """A process's share of a global batch in micro-batches of at most `micro_batch_size` pairs (None, or a size
    >= the share: the share in one pass). Split after sorting the share by length, longest first, so each
    micro-batch holds pairs of like length (less padding, narrower rows); the pairs of the step do not change,
    and its gradient is their weighted sum whatever the grouping."""
    if not micro_batch_size or micro_batch_size >= len(share):
        return [share]
    by_length = sorted(share, key=unit_length, reverse=True)
    return [by_length[i:i + micro_batch_size] for i in range(0, len(by_length), micro_batch_size)]


def _sum_over_processes(values: list[float], accelerator) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    summed = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum")
    return summed.tolist()


def _accumulate_step(model, objective: Objective, batches: list[dict], autocast, scaler, accelerator
                     ) -> dict[str, float]:
    """Forward and backward every micro-batch of this process; the gradients and the returned stats are those
    of the whole global batch, as one process in one pass would have computed them.

    Each objective's loss and stats are means over its micro-batch's count (objective.count: pairs, or tokens
    for SFT). Micro-batch i of this process is weighted by count_i / (the global batch's count, summed over
    micro-batches and processes); DDP averages gradients over processes, hence x world. One process with one
    micro-batch: weight 1, the objective's own loss and stats."""
    counts = [objective.count(b) for b in batches]
    total = _sum_over_processes([sum(counts)], accelerator)[0]
    world = accelerator.num_processes
    summed: dict[str, float] = {}
    for i, (batch, n) in enumerate(zip(batches, counts)):
        weight = n / total
        # DDP all-reduces gradients in the last micro-batch's backward only
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            with autocast:
                loss, stats = objective(model, {k: v.to(accelerator.device) for k, v in batch.items()})
            loss = loss * (weight * world)
            if scaler is None:
                accelerator.backward(loss)
            else:
                scaler.scale(loss).backward()
        for name, value in stats.items():
            summed[name] = summed.get(name, 0.0) + value * weight
    return dict(zip(summed, _sum_over_processes(list(summed.values()), accelerator)))


@dataclass
class _Loop:
    """What one run of the loop holds: the (prepared) model, its optimizer, schedule and precision."""
    model: torch.nn.Module
    objective: Objective
    settings: LoopSettings
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: list
    collate: Callable
    autocast: object
    scaler: Optional[torch.amp.GradScaler]

    def step(self, share: list[EncodedPair], step: int) -> dict[str, float]:
        """One optimizer step over this process's share of a global batch; the batch's stats."""
        s = self.settings
        batches = [self.collate(m, s.pad_id) for m in micro_batches(share, s.micro_batch_size)]
        stats = _accumulate_step(self.model, self.objective, batches, self.autocast, self.scaler, self.accelerator)
        if not math.isfinite(stats["loss"]):  # every process sees the same summed stats: all stop
            raise NonFiniteLoss(step, stats["loss"])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if s.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.trainable, s.max_grad_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return {**stats, "learning_rate": self.scheduler.get_last_lr()[0]}

    def save(self, checkpointing: Checkpointing, step: int, history: list[dict[str, float]]) -> None:
        """Rank 0 saves for all: DDP keeps weights and optimizer states equal on every process, and every process
        restores from this one file; no process runs ahead of a save that might fail."""
        if self.accelerator.is_main_process:
            _save_training_state(checkpointing, step, self.accelerator.unwrap_model(self.model), self.optimizer,
                                 self.scheduler, self.objective, history)
        self.accelerator.wait_for_everyone()

    def resume(self, checkpointing: Optional[Checkpointing]) -> tuple[int, list[dict[str, float]]]:
        """(steps already done, their logged stats) from the last save, or (0, [])."""
        state = load_training_state(checkpointing)
        if state is None:
            return 0, []
        _restore_training_state(state, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler,
                                self.objective)
        return state["step"], list(state["history"])


def _build_loop(model, pairs: list[EncodedPair], objective: Objective, settings: LoopSettings,
                accelerator: Accelerator) -> _Loop:
    total = count_steps(len(pairs), settings)
    sharded = settings.sharding == "fsdp" and accelerator.num_processes > 1
    if sharded:  # before the optimizer exists: it must hold the sharded parameters
        shard_model(model)
    layout = choose_layout(model, settings.padding_free, longest_sequence(pairs))
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = make_optimizer(trainable, settings)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total), total)
    # The scheduler is not prepared: accelerate would step it once per process (for a batch it assumes grows
    # with the process count); here the global batch is the spec's whatever the count. A sharded model is not
    # prepared either: FSDP2 already reduces its gradients (averaged over processes, as DDP's are).
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return _Loop(model, objective, settings, accelerator, optimizer, scheduler, trainable,
                 layout.pairs if objective.reads == "pairs" else layout.chosen,
                 autocast(accelerator.device, settings.precision),
                 torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None)


def train(model, pairs: list[EncodedPair], objective: Objective, settings: LoopSettings, accelerator: Accelerator,
          hooks: LoopHooks = LoopHooks(), checkpointing: Optional[Checkpointing] = None) -> list[dict[str, float]]:
    """Run the loop; returns the logged stats (one dict per logged step). Raises NonFiniteLoss and
    CheckpointWriteError, each naming the step.

    Every process draws the same seeded global batches and trains on its own contiguous share of each, in
    micro-batches whose gradients accumulate into one optimizer step per global batch. With `checkpointing`,
    the loop resumes from the last saved state (if any) and saves every N steps: the batches already consumed
    are replayed from the seeded shuffle and skipped, so the resumed run sees the same batches in the same
    order as an uninterrupted one."""
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(pairs, batch_size=settings.batch_size, shuffle=True, generator=generator, collate_fn=list)
    total = count_steps(len(pairs), settings)
    loop = _build_loop(model, pairs, objective, settings, accelerator)
    done, history = loop.resume(checkpointing)
    step = 0
    for _epoch in range(settings.epochs):
        for global_batch in loader:
            if step < done:  # consumed before the interruption
                step += 1
                continue
            share = _share(global_batch, accelerator.num_processes, accelerator.process_index)
            if share is None:  # a final batch with fewer pairs than processes
                break
            step += 1
            stats = loop.step(share, step)
            if step % settings.log_every == 0 or step == total:
                history.append({"step": step, **stats})
                if hooks.on_log:
                    hooks.on_log(step, total, stats)
            if checkpointing and step % checkpointing.every == 0 and step < total:
                loop.save(checkpointing, step, history)
            if hooks.after_step:
                hooks.after_step(step, total, accelerator.unwrap_model(loop.model))
            if step >= total:
                return history
    return history
