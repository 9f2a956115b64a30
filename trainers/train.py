"""One training loop for SFT and every preference loss (accelerate, so the same code runs on a GPU).

The loop knows nothing about methods: an objective turns a batch into (loss, stats). SFT and preference
objectives are built below; preference losses come from the trainers.losses registry.
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

from trainers.cache import save_tensors, write_file_atomically
from trainers.data import EncodedPair
from trainers.logprobs import choose_layout, per_sequence, sequence_logps, target_logits, token_logps_from_logits
from trainers.losses import LOSS_STATES, epsilon_steps, get_loss
from trainers.packing import Layout, unit_length

OnLog = Callable[[int, int, dict[str, float]], None]  # (step, total_steps, stats)


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


# Autocast dtypes of training.precision; weights and optimizer state stay fp32 (mixed precision).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("training.precision fp16 needs a CUDA GPU (fp16 autocast with loss scaling); this trial "
                         f"runs on {device.type}: use bf16 or fp32")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@dataclass(frozen=True)
class Checkpointing:
    """Save the loop's whole state to `folder`/state.pt every `every` optimizer steps, so a killed, preempted or
    requeued trial continues from its last save with the same result as an uninterrupted run."""
    folder: Path
    every: int

    @property
    def path(self) -> Path:
        return self.folder / "state.pt"

    @property
    def saved_step(self) -> int:
        """The step of the last save (0: none), read without loading the state itself."""
        meta = self.folder / "step"
        return int(meta.read_text()) if meta.is_file() and self.path.is_file() else 0


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
    the shape changes nearly every step. Measured on an H100 (SmolLM2-135M, DPO, 8 pairs of up to 512 tokens,
    torch 2.11): ~19 ms of CPU time per attention call, 278 ms per bf16 step against 202 ms in fp32
    (benchmarks/RESULTS.md). Flash and memory-efficient attention have no per-shape cost."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def count_steps(n_examples: int, settings: LoopSettings) -> int:
    steps = math.ceil(n_examples / settings.batch_size) * settings.epochs
    return min(steps, settings.max_steps) if settings.max_steps else steps


def pair_count(batch: dict) -> float:
    """What a preference objective's loss and stats are means over: the batch's pairs."""
    return float(batch["index"].shape[0])


class Objective:
    """What the loop minimises: (model, batch) -> (loss, stats), loss and stats being means over `count(batch)`
    (pairs by default), so the loop can weight micro-batches and processes back into the whole batch's mean.
    `reads` says which sequences the loop lays out for it: "pairs" (chosen i, then rejected i) or "chosen"."""
    reads = "pairs"

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def count(self, batch: dict) -> float:
        return pair_count(batch)

    def state_dict(self) -> Optional[dict]:
        """What the objective carries from step to step (None: nothing); saved with the loop's state."""
        return None

    def load_state_dict(self, state: dict) -> None:
        raise ValueError(f"{type(self).__name__} carries no state across steps")


class SFTObjective(Objective):
    """Mean next-token NLL over the chosen responses' tokens."""
    reads = "chosen"

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logps, lengths = sequence_logps(model, batch)                                   # (B,)
        loss = -logps.sum() / lengths.sum()
        return loss, {"loss": loss.item()}

    def count(self, batch: dict) -> float:
        """The chosen responses' scored tokens."""
        return float(batch["lengths"].sum())


sft_objective = SFTObjective()


class ObservedObjective(Objective):
    """`objective` unchanged, with `observe(batch)` called before each of its calls (benchmarks count the tokens
    a step consumed, tests the pairs an objective saw)."""

    def __init__(self, objective: Objective, observe: Callable[[dict], None]):
        self.objective, self.observe, self.reads = objective, observe, objective.reads

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        self.observe(batch)
        return self.objective(model, batch)

    def count(self, batch: dict) -> float:
        return self.objective.count(batch)

    def state_dict(self) -> Optional[dict]:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)


class PreferenceObjective(Objective):
    """A registered preference loss. `reference` holds precomputed (N,) chosen and rejected reference
    log-probs indexed by pair index, or None for reference-free methods."""

    def __init__(self, loss_name: str, hparams: dict[str, float],
                 reference: Optional[tuple[torch.Tensor, torch.Tensor]]):
        self.loss_fn, self.hparams, self.reference = get_loss(loss_name), hparams, reference
        # a loss with state across steps (beta_dpo) gets it as `state`; it is part of a resume
        self.state = LOSS_STATES[loss_name]() if loss_name in LOSS_STATES else None

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        half = batch["index"].shape[0]
        logps, lengths = sequence_logps(model, batch)                                   # (2B,)
        ref_c = ref_r = None
        if self.reference is not None:
            idx = batch["index"].cpu()
            ref_c, ref_r = (r[idx].to(logps.device) for r in self.reference)
        extra = {} if self.state is None else {"state": self.state}
        losses, chosen_r, rejected_r = self.loss_fn(logps[:half], logps[half:], ref_c, ref_r, lengths[:half],
                                                    lengths[half:], **self.hparams, **extra)
        return losses.mean(), _pair_stats(losses, chosen_r, rejected_r)

    def state_dict(self) -> Optional[dict]:
        return None if self.state is None else self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)


def preference_objective(loss_name: str, hparams: dict[str, float],
                         reference: Optional[tuple[torch.Tensor, torch.Tensor]]) -> PreferenceObjective:
    return PreferenceObjective(loss_name, hparams, reference)


def _pair_stats(losses: torch.Tensor, chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict[str, float]:
    margin = chosen_r - rejected_r
    return {"loss": losses.mean().item(), "reward_margin": margin.mean().item(),
            "reward_accuracy": (margin > 0).float().mean().item(),
            "chosen_reward": chosen_r.mean().item(), "rejected_reward": rejected_r.mean().item()}


class EpsilonDPOObjective(Objective):
    """ε-DPO needs the reference's token logits at every step (to perturb the policy's logits toward and away
    from it), so it keeps the reference model instead of cached log-probs. β starts at hparams["beta"] and
    after every step becomes β / (1 + ε·mean(s)), used from the next step on (one objective call per
    optimizer step: the spec refuses micro-batches and several processes for it)."""

    def __init__(self, hparams: dict[str, float], ref_model):
        self.loss_fn, self.epsilon = get_loss("epsilon_dpo"), float(hparams["epsilon"])
        self.beta = float(hparams["beta"])
        self.ref_model = ref_model.eval()

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        half, epsilon, target = batch["index"].shape[0], self.epsilon, batch["target"]
        logits = target_logits(model, batch)                                            # (M, V) scored tokens
        logps, lengths = per_sequence(token_logps_from_logits(logits, target), batch)   # (2B,)
        with torch.no_grad():
            ref_logits = target_logits(self.ref_model, batch)
            ref_logps, _ = per_sequence(token_logps_from_logits(ref_logits, target), batch)
            plus, _ = per_sequence(token_logps_from_logits((1 + epsilon) * logits - epsilon * ref_logits, target),
                                   batch)
            minus, _ = per_sequence(token_logps_from_logits((1 - epsilon) * logits + epsilon * ref_logits, target),
                                    batch)
            ratio = lambda x: x[:half] - x[half:]  # noqa: E731 - chosen minus rejected, (B,)
            steps = epsilon_steps(ratio(logps.detach()), ratio(plus), ratio(minus))
        losses, chosen_r, rejected_r = self.loss_fn(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:],
                                                    lengths[:half], lengths[half:], beta=self.beta,
                                                    epsilon=epsilon, steps=steps)
        stats = {**_pair_stats(losses, chosen_r, rejected_r), "beta": self.beta,
                 "epsilon_steps_plus": (steps == 1).float().mean().item(),
                 "epsilon_steps_minus": (steps == -1).float().mean().item()}
        self.beta = self.beta / (1 + epsilon * steps.float().mean().item())
        return losses.mean(), stats

    def state_dict(self) -> Optional[dict]:
        return {"beta": self.beta}                                  # β adapts across steps: part of a resume

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


def epsilon_dpo_objective(hparams: dict[str, float], ref_model) -> EpsilonDPOObjective:
    return EpsilonDPOObjective(hparams, ref_model)


# Methods that need the reference model's token logits at every step (Method.needs_reference_logits):
# name -> builder(hparams, ref_model) -> Objective.
TOKEN_LOGIT_OBJECTIVES: dict[str, Callable[[dict[str, float], torch.nn.Module], Objective]] = {
    "epsilon_dpo": epsilon_dpo_objective,
}


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
    """AdamW as one fused kernel where torch has one for the parameters' device (CPU and CUDA here): on
    SmolLM2-135M on 2 CPU cores 0.02 s per step against 0.34 s for the per-parameter loop, with the same
    updates to float rounding (tests/trainers/test_train.py). Sharded (DTensor) parameters take the foreach
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


def train(model, pairs: list[EncodedPair], objective: Objective, settings: LoopSettings, pad_id: int,
          accelerator: Accelerator, on_log: Optional[OnLog] = None,
          checkpointing: Optional[Checkpointing] = None) -> list[dict[str, float]]:
    """Run the loop; returns the logged stats (one dict per logged step). Raises NonFiniteLoss and
    CheckpointWriteError, each naming the step.

    With `checkpointing`, the loop resumes from the last saved state (if any) and saves every N steps: the
    batches already consumed are replayed from the seeded shuffle and skipped, so the resumed run sees the
    same batches in the same order as an uninterrupted one."""
    generator = torch.Generator().manual_seed(settings.seed)
    # Every process draws the same seeded global batches and trains on its own contiguous share of each, in
    # micro-batches whose gradients accumulate into one optimizer step per global batch.
    loader = DataLoader(pairs, batch_size=settings.batch_size, shuffle=True, generator=generator, collate_fn=list)
    world, rank = accelerator.num_processes, accelerator.process_index
    total = count_steps(len(pairs), settings)
    sharded = settings.sharding == "fsdp" and world > 1
    if sharded:  # before the optimizer exists: it must hold the sharded parameters
        shard_model(model)
    layout = choose_layout(model, settings.padding_free, longest_sequence(pairs))
    collate = layout.pairs if objective.reads == "pairs" else layout.chosen
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = make_optimizer(trainable, settings)
    autocast = _autocast(accelerator.device, settings.precision)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total), total)
    # The scheduler is not prepared: accelerate would step it once per process (for a batch it assumes grows
    # with the process count); here the global batch is the spec's whatever the count. A sharded model is not
    # prepared either: FSDP2 already reduces its gradients (averaged over processes, as DDP's are).
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    history: list[dict[str, float]] = []
    resumed = load_training_state(checkpointing)
    if resumed is not None:
        _restore_training_state(resumed, accelerator.unwrap_model(model), optimizer, scheduler, objective)
        history = list(resumed["history"])
    done = resumed["step"] if resumed is not None else 0
    step = 0
    for _epoch in range(settings.epochs):
        for global_batch in loader:
            if step < done:  # consumed before the interruption
                step += 1
                continue
            share = _share(global_batch, world, rank)
            if share is None:  # a final batch with fewer pairs than processes
                break
            batches = [collate(m, pad_id) for m in micro_batches(share, settings.micro_batch_size)]
            stats = _accumulate_step(model, objective, batches, autocast, scaler, accelerator)
            if not math.isfinite(stats["loss"]):  # every process sees the same summed stats: all stop
                raise NonFiniteLoss(step + 1, stats["loss"])
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
            if settings.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % settings.log_every == 0 or step == total:
                stats = {**stats, "learning_rate": scheduler.get_last_lr()[0]}
                history.append({"step": step, **stats})
                if on_log:
                    on_log(step, total, stats)
            if checkpointing and step % checkpointing.every == 0 and step < total:
                # rank 0 saves for all: DDP keeps weights and optimizer states equal on every process, and every
                # process restores from this one file
                if accelerator.is_main_process:
                    _save_training_state(checkpointing, step, accelerator.unwrap_model(model), optimizer,
                                         scheduler, objective, history)
                accelerator.wait_for_everyone()  # no process runs ahead of a save that might fail
            if step >= total:
                return history
    return history
