"""Work shared across the trials of a sweep: on disk under the sweep's workdir (reference log-probs, for
every process and machine of the sweep) and in memory within one worker process (tokenized training pairs).

Reference log-probs of the training pairs depend only on the reference checkpoint, the pairs and how they
are tokenized — not on a trial's hyperparameters — so every reference-based trial that starts from the same
checkpoint reuses one file. The key covers everything the value depends on: a stale hit is a wrong result.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from orchestrator.errors import caused_by
from trainers.pairs import PreferencePair

CACHE_VERSION = "ref-logps-v1"
_CHUNK = 1 << 20


_FINGERPRINTS: dict[tuple, str] = {}  # (folder, files' names, sizes, mtimes) -> content hash, per process


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file of a model folder (weights, config, tokenizer), by relative path and bytes.
    Remembered per process under the files' sizes and mtimes: hashing a real checkpoint reads every byte
    (~1 s for 0.5 GB), and every preference trial of a sweep asks for the same SFT checkpoint."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    stamp = (str(Path(folder).resolve()),
             tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        _FINGERPRINTS[stamp] = digest.hexdigest()
    return _FINGERPRINTS[stamp]


def pairs_fingerprint(pairs: list[PreferencePair]) -> str:
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.prompt_id, p.prompt, p.chosen, p.rejected]).encode() + b"\n")
    return digest.hexdigest()


def reference_cache_key(checkpoint: Path, pairs: list[PreferencePair], max_length: int) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "checkpoint": folder_fingerprint(checkpoint),
                          "pairs": pairs_fingerprint(pairs), "max_length": max_length}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an flock on `path` (created if needed) for the block; the OS drops it when its process dies,
    so a crashed holder never leaves a stale lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_file_atomically(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` then rename onto `path`: a reader sees the old file or the whole new one, never half.
    A failed write removes its temporary file and raises OSError naming the errno and `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write as RuntimeError "unexpected pos ..." raised while handling the
        # OSError that says why (EFBIG, ENOSPC, EDQUOT): surface that one
        cause = caused_by(exc, OSError)
        if cause is None or cause is exc:
            raise
        raise OSError(cause.errno, f"{cause.strerror} (writing {path})") from exc


def save_tensors(obj, path: str) -> None:
    """torch.save through a Python file, so a failed write surfaces its OSError (torch's own writer does not)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def cached_reference_logps(cache_dir: Path, key: str, n_pairs: int,
                           compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                           ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """((chosen (N,), rejected (N,)), hit). Computes and stores on a miss or an unreadable/mismatched file.
    Under a lock per key: trials (or ranks of one trial) that miss together compute it once; the others wait
    and read it."""
    path = Path(cache_dir) / "ref_logps" / f"{key}.pt"
    with exclusive_lock(path.with_name(f".{key}.lock")):
        if path.exists():
            try:
                stored = torch.load(path, weights_only=True)
                if stored["chosen"].shape == stored["rejected"].shape == (n_pairs,):
                    return (stored["chosen"], stored["rejected"]), True
            except Exception:  # noqa: BLE001 - torch.load of a damaged file raises many types; recompute it
                pass
        chosen, rejected = compute()
        write_file_atomically(path, lambda tmp: save_tensors({"chosen": chosen, "rejected": rejected}, tmp))
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
