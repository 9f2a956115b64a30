"""Work shared across the trials of a sweep: on disk under the sweep's workdir (reference log-probs, for
every process and machine of the sweep) and in memory within one worker process (tokenized training pairs).

Reference log-probs of the training pairs depend only on the reference checkpoint, the pairs and how they
are tokenized — not on a trial's hyperparameters — so every reference-based trial that starts from the same
checkpoint reuses one file. The key covers everything the value depends on: a stale hit is a wrong result.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from orchestrator.infra.files import exclusive_lock, folder_digests, verified_mismatch, write_verified
from trainers.pairs import PreferencePair

CACHE_VERSION = "ref-logps-v2"  # v2: the checkpoint fingerprint hashes per-file digests


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file of a model folder (weights, config, tokenizer), by relative path and content
    (per-file hashes remembered per process: every preference trial of a sweep asks for the same SFT
    checkpoint)."""
    digest = hashlib.sha256()
    for name, file_digest in folder_digests(folder).items():
        digest.update(f"{name}\0{file_digest}\n".encode())
    return digest.hexdigest()


def pairs_fingerprint(pairs: list[PreferencePair]) -> str:
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.prompt_id, p.prompt, p.chosen, p.rejected]).encode() + b"\n")
    return digest.hexdigest()


def reference_cache_key(checkpoint: Path, pairs: list[PreferencePair], max_length: int) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "checkpoint": folder_fingerprint(checkpoint),
                          "pairs": pairs_fingerprint(pairs), "max_length": max_length}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_tensors(obj, path: str) -> None:
    """torch.save through a Python file, so a failed write surfaces its OSError (torch's own writer does not)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def reference_cache_name(key: str) -> str:
    """The entry's path under the cache folder (and its name between nodes: orchestrator.core.outcome.SharedFiles)."""
    return f"ref_logps/{key}.pt"


def reference_cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / reference_cache_name(key)


def cached_reference_logps(cache_dir: Path, key: str, n_pairs: int,
                           compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                           ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """((chosen (N,), rejected (N,)), hit). Computes and stores on a miss. A file that fails its content check
    (the sha256 recorded beside it when it was written: flipped bytes, a stray copy), cannot be read or has
    another shape is a miss, never a hit. Under a lock per key: trials (or ranks of one trial) that miss
    together compute it once; the others wait and read it."""
    path = reference_cache_path(cache_dir, key)
    with exclusive_lock(path.with_name(f".{key}.lock")):
        if path.exists() and verified_mismatch(path) is None:
            try:
                stored = torch.load(path, weights_only=True)
                if stored["chosen"].shape == stored["rejected"].shape == (n_pairs,):
                    return (stored["chosen"], stored["rejected"]), True
            except Exception:  # noqa: BLE001 - torch.load of a damaged file raises many types; recompute it
                pass
        chosen, rejected = compute()
        write_verified(path, lambda tmp: save_tensors({"chosen": chosen, "rejected": rejected}, tmp))
    return (chosen, rejected), False


# ---- in-process: tokenized training pairs ----------------------------------------------------------------
_ENCODED: "OrderedDict[tuple, list]" = OrderedDict()
_ENCODED_MAX = 4  # a worker rarely alternates between more tokenizer/data/length combinations than this


def tokenizer_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's tokenizer files (what tokenization depends on), not its weights."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens", "chat_template"))
                               or path.name in ("vocab.json", "merges.txt")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def shared_encoded_pairs(folder: Path, raw_pairs: list[PreferencePair], max_length: int,
                         encode: Callable[[], list]) -> list:
    """`encode()`'s result, reused by later trials of this process with the same tokenizer files, pairs and
    max_length (every trial of a stage, and the SFT and preference stages alike: they share a tokenizer)."""
    key = (tokenizer_fingerprint(folder), pairs_fingerprint(raw_pairs), max_length)
    if key in _ENCODED:
        _ENCODED.move_to_end(key)
        return _ENCODED[key]
    _ENCODED[key] = encode()
    if len(_ENCODED) > _ENCODED_MAX:
        _ENCODED.popitem(last=False)
    return _ENCODED[key]
