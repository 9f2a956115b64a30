"""Work shared across the trials of a sweep, cached on disk under the sweep's workdir.

Reference log-probs of the training pairs depend only on the reference checkpoint, the pairs and how they
are tokenized — not on a trial's hyperparameters — so every reference-based trial that starts from the same
checkpoint reuses one file. The key covers everything the value depends on: a stale hit is a wrong result.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from trainers.pairs import PreferencePair

CACHE_VERSION = "ref-logps-v1"
_CHUNK = 1 << 20


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file of a model folder (weights, config, tokenizer), by relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
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


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_reference_logps(cache_dir: Path, key: str, n_pairs: int,
                           compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                           ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """((chosen (N,), rejected (N,)), hit). Computes and stores on a miss or an unreadable/mismatched file."""
    path = Path(cache_dir) / "ref_logps" / f"{key}.pt"
    if path.exists():
        try:
            stored = torch.load(path, weights_only=True)
            if stored["chosen"].shape == stored["rejected"].shape == (n_pairs,):
                return (stored["chosen"], stored["rejected"]), True
        except Exception:  # noqa: BLE001 - torch.load of a damaged file raises many types; recompute it
            pass
    chosen, rejected = compute()
    save_tensors_atomic(path, {"chosen": chosen, "rejected": rejected})
    return (chosen, rejected), False
