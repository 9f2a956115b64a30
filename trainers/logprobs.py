"""Summed log-probs of scored tokens under a causal LM, without full-vocabulary logits.

`sequence_logps(model, batch)` takes a batch laid out by trainers.packing (padded or packed rows) and returns
each sequence's summed log-prob and scored-token count. How:

- The model's own forward runs with `logits_to_keep` = the positions that predict a scored token, so its output
  layer only sees those hidden states (response tokens: under a fifth of the positions on HH-RLHF).
- While that forward runs, the output layer is stood in for by `TargetLogProbs`: per chunk of positions, the
  chunk's logits, their log-softmax at the target, then the chunk is dropped; backward recomputes each chunk.
  At most one chunk of logits (CHUNK_BYTES) exists at a time, forward or backward.
- A model whose forward changes its head's output (logit soft-capping or scaling), does not take positions in
  `logits_to_keep`, or whose head is not a plain Linear (a LoRA-adapted head) is found by a one-time probe and
  takes the plain path: its own logits at the kept positions (or at every position), then log-softmax.

Packed rows need a block mask per row (trainers.packing: units attend only to themselves, a pair's responses
only to their prompt and themselves), given to the attention implementations that take one as a 4-D mask;
`choose_layout` falls back to padded rows, with the reason, for every other model.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from orchestrator.core.registry import Registry
from trainers.packing import PADDED, Layout

# Logit bytes (fp32) of one chunk of the chunked head; 64 MiB is 341 positions of a 49k vocabulary.
CHUNK_BYTES = 64 * 2 ** 20
HALF = (torch.float16, torch.bfloat16)


def core_model(model) -> torch.nn.Module:
    """The transformers model inside the wrappers a trial puts around it (DDP, the LoRA reference view, peft)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):      # DDP
            model = model.module
        elif "_peft" in vars(model):                                                      # AdapterDisabled
            model = vars(model)["_peft"]
        elif hasattr(model, "get_base_model"):                                            # peft
            model = model.get_base_model()
        else:
            return model


# ---- attention masks of packed rows -------------------------------------------------------------------
def packed_allowed(unit: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(R, L) unit and branch ids -> (R, L, L) bool: query i may attend key j. Keys of the same unit, not after
    the query, on the prompt branch or the query's own branch; padding (unit -1) attends only to itself."""
    width = unit.shape[1]
    position = torch.arange(width, device=unit.device)
    causal = position[:, None] >= position[None, :]                                     # (L, L)
    same_unit = (unit[:, :, None] == unit[:, None, :]) & (unit[:, None, :] >= 0)        # (R, L, L)
    own_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return (same_unit & own_branch & causal) | torch.eye(width, dtype=torch.bool, device=unit.device)


def _bool_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return allowed[:, None]                                                               # (R, 1, L, L)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]                 # (R, 1, L, L)


# attention implementation (config._attn_implementation) -> the 4-D mask it takes. Others (flash attention
# kernels, flex attention: no backward on a CPU) get padded rows.
ATTENTION_MASKS: Registry[Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = Registry("attention mask", {
    "sdpa": _bool_mask,
    "eager": _additive_mask,
})


def _attention(core) -> str:
    return getattr(core.config, "_attn_implementation", None) or "eager"


def packing_refusal(model, longest: int) -> Optional[str]:
    """Why `model` cannot read packed rows of units up to `longest` tokens exactly, or None when it can."""
    core = core_model(model)
    config = core.config.get_text_config() if hasattr(core.config, "get_text_config") else core.config
    attention = _attention(core)
    if attention not in ATTENTION_MASKS:
        return f"attention implementation {attention!r} takes no block mask (packing works with: " \
               f"{', '.join(ATTENTION_MASKS.names())})"
    if "position_ids" not in inspect.signature(core.forward).parameters:
        return f"{type(core).__name__} takes no position_ids"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention"}:
        return f"layers of types {sorted(kinds - {'full_attention'})} need masks of their own"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < longest:
        return f"sliding-window attention ({window} tokens) shorter than the sequences ({longest})"
    return None


def choose_layout(model, padding_free: bool, longest: int) -> Layout:
    """Packed rows when asked for and the model reads them exactly; else padded rows, saying why."""
    if not padding_free:
        return PADDED
    refusal = packing_refusal(model, longest)
    return Layout(False, refusal) if refusal else Layout(True)


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward's keyword arguments for a batch of either layout (no KV cache: nothing is generated)."""
    if "unit" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    core = core_model(model)
    attention = _attention(core)
    if attention not in ATTENTION_MASKS:
        raise ValueError(f"a packed batch needs sdpa or eager attention; this model uses {attention!r}")
    dtype = next(core.parameters()).dtype
    mask = ATTENTION_MASKS[attention](packed_allowed(batch["unit"], batch["branch"]), dtype)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": mask,
            "use_cache": False}


# ---- the chunked output layer -------------------------------------------------------------------------
def chunk_positions(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: the autocast dtype under autocast, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class TargetLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row, in chunks of `chunk` rows: (M, H) -> (M,).

    Forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits z and applies
    d/dz (z_t − lse) = onehot(t) − softmax(z), so no (M, V) tensor ever exists. Matmuls run in the autocast
    dtype when autocast is on (as the model's own head would), the softmax in at least float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk: int):
        dtype = _compute_dtype(weight)
        out_dtype = torch.float32 if dtype in HALF else dtype
        out = torch.empty(hidden.shape[0], dtype=out_dtype, device=hidden.device)          # (M,)
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = F.linear(hidden[rows].to(dtype), w, b).to(out_dtype)               # (c, V)
                lse[rows] = torch.logsumexp(logits, -1)
                out[rows] = logits.gather(1, target[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        dtype = ctx.dtype
        grad_hidden = torch.empty_like(hidden)
        # (V, H) gradient: accumulated in place in the weight's dtype (at least float32) by addmm, so no zero
        # fill, temporary or separate add of a vocabulary-sized tensor per chunk (each is 113 MB on SmolLM2)
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = None
        grad_bias = None if bias is None else torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h, g = hidden[rows].to(dtype), grad_out[rows]                               # (c, H), (c,)
                logits = F.linear(h, w, b).to(lse.dtype)                                     # (c, V)
                grad_logits = torch.exp(logits - lse[rows, None]).mul_(-g[:, None])          # −softmax·g
                grad_logits.scatter_add_(1, target[rows, None], g[:, None])                  # +onehot·g
                grad_logits = grad_logits.to(dtype)
                grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
                if dtype != accumulate:                                                      # half: sum in fp32
                    part = (grad_logits.t() @ h).to(accumulate)
                    grad_weight = part if grad_weight is None else grad_weight.add_(part)
                elif grad_weight is None:
                    grad_weight = grad_logits.t() @ h                                        # (V, H)
                else:
                    grad_weight.addmm_(grad_logits.t(), h)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0).to(accumulate)
        if grad_weight is None:  # no scored token at all
            grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None


@contextlib.contextmanager
def _head_replaced(model, forward: Callable[[torch.Tensor], torch.Tensor]):
    """While the block runs, the model's output layer calls `forward(hidden)` instead of computing logits."""
    head = core_model(model).get_output_embeddings()
    head.forward = forward
    try:
        yield head
    finally:
        del head.forward


@dataclass(frozen=True)
class HeadSupport:
    keeps_positions: bool   # the forward hands its head exactly the hidden states logits_to_keep selects
    plain_head: bool        # ... and returns the head's output untouched, from a plain Linear head


_HEAD_SUPPORT: "weakref.WeakKeyDictionary[torch.nn.Module, HeadSupport]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_support(model) -> HeadSupport:
    """Probe once per model with a 2-token forward: is the chunked head exact for it? Every process of a trial
    probes at the same point (a forward of a DDP or FSDP model is collective)."""
    core = core_model(model)
    if core in _HEAD_SUPPORT:
        return _HEAD_SUPPORT[core]
    device = next(core.parameters()).device
    keep = torch.tensor([[True, False]], device=device)
    seen: list[tuple] = []
    marker = torch.zeros(1, device=device)

    def probe(hidden):
        seen.append(tuple(hidden.shape))
        return marker

    try:
        with _head_replaced(model, probe) as head:
            out = model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), logits_to_keep=keep,
                        use_cache=False)
        keeps = len(seen) == 1 and len(seen[0]) == 2 and seen[0][0] == 1  # (1 kept position, H)
        support = HeadSupport(keeps, keeps and out.logits is marker and type(head) is torch.nn.Linear)
    except (TypeError, ValueError, IndexError, RuntimeError):  # no logits_to_keep, or not as positions
        support = HeadSupport(False, False)
    _HEAD_SUPPORT[core] = support
    return support


def describe_head(model) -> str:
    support = head_support(model)
    if support.plain_head:
        return "chunked log-probs at the scored positions"
    if support.keeps_positions:
        return "full-vocabulary logits at the scored positions (the model changes its head's output)"
    return "full-vocabulary logits at every position (the model takes no positions in logits_to_keep)"


# ---- log-probs --------------------------------------------------------------------------------------
def target_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(M, V) next-token logits that predict each scored token, from the model's own head (for objectives
    that need whole distributions, e.g. ε-DPO)."""
    inputs = model_inputs(model, batch)
    if head_support(model).keeps_positions:
        return model(**inputs, logits_to_keep=batch["keep"]).logits[batch["gather"]]
    logits = model(**inputs).logits                                                     # (R, L, V)
    return logits.reshape(-1, logits.shape[-1])[batch["source"]]


def token_logps_from_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(M, V) logits, (M,) targets -> (M,) log-probs; half-precision logits are upcast (their log-softmax
    loses too much)."""
    if logits.dtype in HALF:
        logits = logits.float()
    # gather - logsumexp avoids materialising a second (M, V) log-softmax tensor
    return logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def target_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(M,) log-prob of each scored token."""
    if not head_support(model).plain_head:
        return token_logps_from_logits(target_logits(model, batch), batch["target"])
    head = core_model(model).get_output_embeddings()
    chunk = chunk_positions(head.out_features)

    def chunked(hidden):                                                                  # (K, H) kept positions
        return TargetLogProbs.apply(hidden.index_select(0, batch["gather"]), head.weight, head.bias,
                                    batch["target"], chunk)

    with _head_replaced(model, chunked):
        return model(**model_inputs(model, batch), logits_to_keep=batch["keep"]).logits


def per_sequence(token_values: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) values of scored tokens -> their sums per sequence and the sequences' scored-token counts, (S,) each."""
    lengths = batch["lengths"]
    sums = token_values.new_zeros(lengths.shape[0]).index_add(0, batch["sequence"], token_values)
    return sums, lengths.to(sums.dtype)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's scored tokens and their count, (S,) each."""
    return per_sequence(target_logps(model, batch), batch)
