"""Sampling responses from a causal LM: one random stream per prompt, behind one engine interface.

A sample depends only on (the evaluation seed, its prompt, the weights). Prompt i draws one uniform per new
token from its own generator, seeded with `stream_seed(seed, prompt_id)`; nothing else is random. Which prompts
share its batch, the batch size and the order batches run in change nothing but float rounding in the model's
matmuls, so an engine may sort prompts by length, batch them under a token budget and drop rows that have
ended (tests/trainers/test_generation.py holds the samples equal across batch sizes and orders).

The draw at each step (SAMPLER_VERSION 2), per row, from the model's next-token logits z (float32):
  1. suppressed tokens (pad, BOS, unknown: never text) get z = -inf;
  2. p = softmax(z / temperature);
  3. nucleus: tokens by decreasing p (ties: the lower id first); keep the shortest prefix whose mass reaches
     top_p (top_p = 1: every token, in id order);
  4. with the row's next uniform u, the token is the first kept one whose cumulative mass exceeds u times the
     kept mass (inverse CDF, in float64).
A stop token (EOS or another special token) ends the row and is kept in its ids; so does max_new_tokens. The
log-prob of every sampled token under the sampling model at temperature 1 without suppression (log softmax(z))
comes with each sample: the policy's half of the KL metric, without a second forward pass.

Engines are a registry (ENGINES): today the transformers forward with its KV cache (TransformersEngine). A
serving engine (vLLM on GPU machines) plugs in with the same per-prompt seeds and the same draw.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from orchestrator.core.registry import Registry

SAMPLER_VERSION = 2   # evaluation.sampler_version: 1 was one random stream per batch (gone)
NUCLEUS_CANDIDATES = 256  # the nucleus is looked for among the most likely tokens first (a full sort is 25x slower)


def stream_seed(seed: int, prompt_id: str) -> int:
    """The seed of a prompt's random stream: 63 bits of sha256(evaluation seed, prompt id)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def stream_uniforms(seed: int, count: int) -> torch.Tensor:
    """(count,) float64 uniforms in [0, 1) of one prompt's stream."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_new_tokens: int
    suppressed: tuple[int, ...] = ()   # never sampled
    stops: tuple[int, ...] = ()        # end a response (kept in its ids)


@dataclass(frozen=True)
class Request:
    ids: list[int]      # the prompt's token ids (already cut to evaluation.max_prompt_length)
    seed: int           # its random stream (stream_seed)


@dataclass(frozen=True)
class Sample:
    ids: list[int]      # sampled tokens, the stop token included when one was sampled
    logp: float         # sum over ids of log softmax(z)[token]: temperature 1, nothing suppressed


@dataclass
class GenerationUsage:
    """What a generation call cost: positions the prefill computed (padding included), the prompts' real tokens,
    tokens sampled, and decode row-steps (rows fed one token: live rows and ended rows not yet dropped)."""
    prefill_positions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_rows: int = 0
    batches: int = 0

    @property
    def padding_share(self) -> float:
        return 1 - self.prompt_tokens / self.prefill_positions if self.prefill_positions else 0.0


class Engine(Protocol):
    def generate(self, requests: Sequence[Request], params: SamplingParams) -> tuple[list[Sample], GenerationUsage]:
        """One sample per request, in request order."""


# ---- the draw --------------------------------------------------------------------------------------------
def _descending(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) -> the k largest of each row and their ids, (B, k) each, by decreasing value, ties by lower id."""
    if k >= probs.shape[-1]:
        values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        return values, ids
    values, ids = probs.topk(k, dim=-1)
    # topk leaves the order of equal values open: order them by id, as the stable full sort does
    order = torch.argsort(ids, dim=-1, stable=True)
    values, ids = values.gather(-1, order), ids.gather(-1, order)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), ids.gather(-1, order)


def _nucleus_pick(values: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, k) descending probabilities and their ids, (B,) uniforms -> (B,) drawn ids (steps 3-4 of the draw)."""
    cumulative = values.double().cumsum(-1)                                            # (B, k)
    before = cumulative - values.double()
    kept = (before < top_p) & (values > 0)                                             # a prefix of each row
    last = kept.sum(-1).clamp(min=1) - 1                                               # (B,)
    mass = cumulative.gather(-1, last[:, None])                                        # (B, 1)
    target = uniforms[:, None] * mass
    pick = torch.searchsorted(cumulative, target, right=True).squeeze(-1)
    return ids.gather(-1, torch.minimum(pick, last)[:, None]).squeeze(-1)


def draw(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) next-token logits, (B,) uniforms -> (B,) sampled ids: the draw in the module docstring. Each row is
    computed on its own (no reduction across rows), so a row's token does not depend on the others."""
    logits = logits.float()
    if params.suppressed:
        logits = logits.index_fill(-1, torch.tensor(params.suppressed, device=logits.device), float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)                         # (B, V)
    uniforms = uniforms.to(probs.device)
    if params.top_p >= 1.0:  # every token: no order needed
        cumulative = probs.double().cumsum(-1)
        pick = torch.searchsorted(cumulative, uniforms[:, None] * cumulative[:, -1:], right=True).squeeze(-1)
        return pick.clamp(max=probs.shape[-1] - 1)
    values, ids = _descending(probs, NUCLEUS_CANDIDATES)
    short = values.double().sum(-1) < params.top_p                                     # nucleus beyond the candidates
    picked = _nucleus_pick(values, ids, uniforms, params.top_p)
    for row in short.nonzero().flatten().tolist():
        full_values, full_ids = _descending(probs[row:row + 1], probs.shape[-1])
        picked[row] = _nucleus_pick(full_values, full_ids, uniforms[row:row + 1], params.top_p)[0]
    return picked


# ---- batches -----------------------------------------------------------------------------------------------
# What grouping prompts into batches trades off (ratios measured on SmolLM2-135M, 2 CPU cores, fp32; the timings
# behind them are bench_eval's, benchmarks/RESULTS.md): a decode step has a fixed part (weights read, Python and
# kernel overheads) worth about STEP_OVERHEAD prefill positions, so fewer, fuller batches are cheaper. A padded
# position costs a prefill position when the batch's prompts are prefilled together, left-padded; when they are
# prefilled apart (TransformersEngine, full attention), only a cache read per decode step, about 1/CACHE_READS of a
# position.
STEP_OVERHEAD = 32
CACHE_READS = 550


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int, reserve: int = 0,
                   batch_cost: float = STEP_OVERHEAD) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first. A batch is a run of the indices sorted by
    decreasing length with at most max_rows rows and rows x (its longest + reserve) <= max_tokens (a single row
    always fits); among those partitions, the one with the fewest positions computed (rows x longest, padding
    included) plus batch_cost per batch (dynamic programming over the sorted lengths: O(n x max_rows))."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = [lengths[i] for i in order]
    n = len(order)
    best, start = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):                    # the last batch is order[first:end]; its widest is order[first]
        for first in range(end - 1, max(end - max_rows, 0) - 1, -1):
            rows = end - first
            if rows > 1 and rows * (longest[first] + reserve) > max_tokens:
                break                              # an earlier first only widens the batch
            cost = best[first] + rows * longest[first] + batch_cost
            if cost < best[end]:
                best[end], start[end] = cost, first
    batches, end = [], n
    while end > 0:
        batches.append(order[start[end]:end])
        end = start[end]
    return batches[::-1]


# ---- the transformers engine ----------------------------------------------------------------------------
def _cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` in transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in buffers sized for the whole generation, each
    step written in place. A DynamicLayer concatenates instead, copying the whole cache every step, which on long
    prompts is a sizeable share of a decode step on a CPU."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._keys, self._values, self.length = keys, values, length                      # (B, H, capacity, D)
        self.device, self.is_initialized = keys.device, True
        self._views()

    @classmethod
    def right_aligned(cls, keys: list[torch.Tensor], values: list[torch.Tensor], width: int,
                      capacity: int) -> "_PreallocatedLayer":
        """A layer holding each row's (H, n, D) prompt keys and values in columns [width - n, width) (zeros on the
        left: masked), with room up to `capacity` positions."""
        heads, _, dim = keys[0].shape
        buffers = []
        for states in (keys, values):
            buffer = states[0].new_zeros(len(states), heads, capacity, dim)
            for row, state in enumerate(states):
                buffer[row, :, width - state.shape[1]:width] = state
            buffers.append(buffer)
        return cls(*buffers, width)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a preallocated cache layer is built filled (right_aligned)")

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        return self._views()

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()


def full_attention_only(model) -> bool:
    """Whether every layer attends to the whole sequence (no sliding window): then a prompt's cached keys and
    values can be moved between caches, and the cache preallocated."""
    config = model.config.get_text_config(decoder=True)
    return set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"} and \
        getattr(config, "sliding_window", None) is None


@dataclass(frozen=True)
class Prefilled:
    """A prompt after its prefill: its cached keys and values per layer ((H, n, D) each) and next-token logits."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor                                                                   # (V,)


# Ended rows stay in the batch (fed a token whose output is ignored) until they are this share of it: dropping
# them copies the whole KV cache, which costs about half a decode step (SmolLM2, 2 CPU cores).
DROP_SHARE = 0.25


@dataclass
class _Rows:
    """The live state of one batch during decoding; index r is a row still in the batch."""
    requests: list[int]           # request index of each row
    lengths: torch.Tensor         # (R,) prompt lengths
    mask: torch.Tensor            # (R, W + N) attention mask: 0 on left padding, 1 on the prompt and beyond
    uniforms: torch.Tensor        # (R, N) each row's stream
    ended: torch.Tensor           # (R,) bool
    ids: list[list[int]] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)

    def keep(self, rows: torch.Tensor) -> None:
        self.requests = [self.requests[r] for r in rows.tolist()]
        self.lengths, self.mask = self.lengths[rows], self.mask[rows]
        self.uniforms, self.ended = self.uniforms[rows], self.ended[rows]
        self.ids = [self.ids[r] for r in rows.tolist()]
        self.logps = [self.logps[r] for r in rows.tolist()]


def _left_padded(prompts: list[list[int]], width: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, W) input ids and position ids of prompts right-aligned in rows of `width` (positions 0.. per prompt)."""
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, ids in enumerate(prompts):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        positions[r, width - len(ids):] = torch.arange(len(ids))
    return input_ids.to(device), positions.to(device)


def waves(batches: list[list[int]], lengths: Sequence[int], max_tokens: int) -> list[list[list[int]]]:
    """Consecutive batches grouped so that a group's prompts hold at most max_tokens tokens (at least one batch):
    the prompts prefilled together, packed."""
    groups: list[list[list[int]]] = []
    held = 0
    for batch in batches:
        tokens = sum(lengths[i] for i in batch)
        if groups and held + tokens <= max_tokens:
            groups[-1].append(batch)
            held += tokens
        else:
            groups.append([batch])
            held = tokens
    return groups


class TransformersEngine:
    """Sampling with a transformers causal LM's own forward and KV cache.

    Prompts are sorted by length and grouped into decode batches (length_batches: at most max_rows, rows x
    (longest prompt + max_new_tokens) <= max_tokens). Where every layer attends to the whole sequence, consecutive
    batches whose prompts hold at most max_tokens tokens (a wave) are prefilled together, in forward passes of
    prompts of similar length (little padding, and attention as wide as the prompts, not the batch's longest), and
    each batch's cache is then assembled from those passes, its prompts right-aligned, in buffers with room for
    every new token; other models prefill each batch left-padded. Then one token per row per step; rows that ended
    are dropped once they are DROP_SHARE of the batch. `autocast`: a context manager factory for the forward passes
    (evaluation.precision)."""

    def __init__(self, model, pad_id: int, device: torch.device, max_rows: int, max_tokens: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.max_rows, self.max_tokens, self.autocast = max_rows, max_tokens, autocast
        self._cache_arg = _cache_argument(model)

    def _forward(self, cache, input_ids, mask, positions) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1]                                                           # (R, V)

    def _padded_prefill(self, prompts: list[list[int]], cache, usage: GenerationUsage) -> torch.Tensor:
        """Prompts right-aligned in one left-padded pass into `cache`; (R, V) next-token logits."""
        width = max(len(ids) for ids in prompts)
        input_ids, positions = _left_padded(prompts, width, self.pad_id, self.device)
        lengths = torch.tensor([len(ids) for ids in prompts], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] >= (width - lengths)[:, None]).long()
        usage.prefill_positions += input_ids.numel()
        return self._forward(cache, input_ids, mask, positions)

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], params: SamplingParams) -> tuple[list[Sample], GenerationUsage]:
        self.model.eval()
        usage = GenerationUsage()
        samples: list[Sample] = [None] * len(requests)  # type: ignore[list-item]
        lengths = [len(r.ids) for r in requests]
        movable = full_attention_only(self.model)
        # a batch's cost in the unit its padding is paid in (see STEP_OVERHEAD): cache reads when prompts are
        # prefilled apart from their batch, else prefill positions
        batch_cost = STEP_OVERHEAD * (CACHE_READS if movable else params.max_new_tokens)
        batches = length_batches(lengths, self.max_rows, self.max_tokens, params.max_new_tokens, batch_cost)
        for wave in waves(batches, lengths, self.max_tokens) if movable else [[b] for b in batches]:
            with self.autocast():
                prefilled = self._prefill_wave(requests, [i for b in wave for i in b], usage) if movable else {}
                for batch in wave:
                    cache, logits = self._batch_cache(requests, batch, prefilled, params.max_new_tokens, usage)
                    for index, sample in self._decode(requests, batch, params, cache, logits, usage):
                        samples[index] = sample
                    usage.batches += 1
        return samples, usage

    def _prefill_wave(self, requests: Sequence[Request], members: list[int], usage: GenerationUsage
                      ) -> dict[int, Prefilled]:
        """Each member prompt prefilled, in passes of prompts of similar length."""
        lengths = [len(requests[i].ids) for i in members]
        prefilled: dict[int, Prefilled] = {}
        for chunk in length_batches(lengths, self.max_rows, self.max_tokens, 0, STEP_OVERHEAD):
            rows = [members[k] for k in chunk]
            cache = DynamicCache()
            logits = self._padded_prefill([requests[i].ids for i in rows], cache, usage)
            width = int(cache.get_seq_length())
            for r, i in enumerate(rows):
                start = width - len(requests[i].ids)
                prefilled[i] = Prefilled([layer.keys[r, :, start:] for layer in cache.layers],
                                         [layer.values[r, :, start:] for layer in cache.layers], logits[r])
        return prefilled

    def _batch_cache(self, requests: Sequence[Request], batch: list[int], prefilled: dict[int, Prefilled],
                     n_new: int, usage: GenerationUsage) -> tuple[Cache, torch.Tensor]:
        """The batch's KV cache (its prompts right-aligned, room for n_new tokens) and (B, V) next-token logits."""
        width = max(len(requests[i].ids) for i in batch)
        if not prefilled:
            cache = DynamicCache(config=self.model.config)
            return cache, self._padded_prefill([requests[i].ids for i in batch], cache, usage)
        rows = [prefilled.pop(i) for i in batch]  # each prompt's states are freed with its batch's cache
        layers = [_PreallocatedLayer.right_aligned([p.keys[k] for p in rows], [p.values[k] for p in rows], width,
                                                   width + n_new) for k in range(len(rows[0].keys))]
        return Cache(layers=layers), torch.stack([p.logits for p in rows])

    def _decode(self, requests: Sequence[Request], batch: list[int], params: SamplingParams, cache: Cache,
                logits: torch.Tensor, usage: GenerationUsage):
        """(request index, sample) of each row of the batch as it ends."""
        n_new, stops = params.max_new_tokens, torch.tensor(params.stops or (-1,), device=self.device)
        lengths = torch.tensor([len(requests[i].ids) for i in batch], device=self.device)
        width = int(lengths.max())
        columns = torch.arange(width + n_new, device=self.device)[None, :]
        rows = _Rows(list(batch), lengths, (columns >= (width - lengths)[:, None]).long(),
                     torch.stack([stream_uniforms(requests[i].seed, n_new) for i in batch]),
                     torch.zeros(len(batch), dtype=torch.bool, device=self.device),
                     [[] for _ in batch], [0.0] * len(batch))
        usage.prompt_tokens += int(lengths.sum())
        for step in range(n_new):
            live = ~rows.ended
            tokens = draw(logits, rows.uniforms[:, step], params)                          # (R,)
            logps = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
            token_list, logp_list = tokens.tolist(), logps.tolist()
            for r in live.nonzero().flatten().tolist():
                rows.ids[r].append(token_list[r])
                rows.logps[r] += logp_list[r]
            usage.generated_tokens += int(live.sum())
            rows.ended |= torch.isin(tokens, stops) | (step == n_new - 1)
            for r in (rows.ended & live).nonzero().flatten().tolist():
                yield rows.requests[r], Sample(rows.ids[r], rows.logps[r])
            if bool(rows.ended.all()):
                return
            if int(rows.ended.sum()) >= DROP_SHARE * len(rows.requests):
                keep = (~rows.ended).nonzero().flatten()
                cache.batch_select_indices(keep)
                rows.keep(keep)
                tokens = tokens[keep]
            usage.decode_rows += len(rows.requests)
            logits = self._forward(cache, tokens[:, None], rows.mask[:, :width + step + 1],
                                   (rows.lengths + step)[:, None])


ENGINES: Registry[Callable[..., Engine]] = Registry("generation engine", {"transformers": TransformersEngine})
