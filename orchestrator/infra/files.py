"""Files that several processes of a sweep share (a trial's folder, caches, model folders): one writer at a time
under an flock, and writes that a reader sees whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from orchestrator.infra.errors import caused_by


@contextlib.contextmanager
def exclusive_lock(path: Path, shared: bool = False, on_wait: Optional[Callable[[], None]] = None):
    """Hold an flock on `path` (created if needed) for the block, exclusive, or `shared` with other shared
    holders; the OS drops it when its process dies, so a crashed holder never leaves a stale lock. `on_wait` is
    called once before waiting, when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if on_wait is not None:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(handle, mode)
        else:
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_file_atomically(path: Path, write: Callable[[str], None], mode: Optional[int] = None) -> None:
    """`write(tmp_path)` then rename onto `path`: a reader sees the old file or the whole new one, never half.
    The file gets `mode` (a secret: 0o600), else what the umask gives. A failed write removes its temporary file
    and raises OSError naming the errno and `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600: a shared workdir's readers need the umask's
        os.chmod(tmp, 0o666 & ~process_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write as RuntimeError "unexpected pos ..." raised while handling the
        # OSError that says why (EFBIG, ENOSPC, EDQUOT): surface that one
        cause = caused_by(exc, OSError)
        if cause is None or cause is exc:
            raise
        raise OSError(cause.errno, f"{cause.strerror} (writing {path})") from exc


def process_umask() -> int:
    """This process's umask, read without changing it (os.umask sets while it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    """Where a shared file's content hash is kept: FILE.sha256 beside it."""
    return Path(path).with_name(Path(path).name + ".sha256")


def write_verified(path: Path, write: Callable[[str], None]) -> str:
    """write_file_atomically, then its content hash into the sidecar (atomically too); returns the hash. A
    reader that finds the two disagreeing (flipped bytes, a copy from elsewhere) treats the file as absent."""
    write_file_atomically(path, write)
    digest = file_sha256(path)
    write_file_atomically(sidecar(path), lambda tmp: Path(tmp).write_text(digest))
    return digest


def verified_mismatch(path: Path, unrecorded_ok: bool = False) -> Optional[str]:
    """Why `path` cannot be trusted (missing, no recorded hash, content differing from it), or None.
    `unrecorded_ok`: a file without a sidecar (written before hashes were recorded) is taken as it is."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    if not sidecar(path).is_file():
        return None if unrecorded_ok else f"{path} has no recorded content hash ({sidecar(path).name})"
    recorded = sidecar(path).read_text().strip()
    if file_sha256(path) != recorded:
        return f"{path} changed since it was written (sha256 differs from {sidecar(path).name})"
    return None


_DIGESTS: dict[tuple, str] = {}  # (resolved path, size, mtime_ns) -> sha256, per process


def cached_sha256(path: Path) -> str:
    """file_sha256, remembered per process under the file's size and mtime: a real checkpoint is read whole to
    hash it (~1 s per 0.5 GB), and every trial of a stage asks about the same one."""
    stat = Path(path).stat()
    stamp = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = file_sha256(path)
    return _DIGESTS[stamp]


READY_MARKER = "posweep-ready.json"


def folder_digests(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of a folder but its ready marker."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): cached_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != READY_MARKER}


def folder_problem(folder: Path) -> Optional[str]:
    """Why a folder written by write_folder_atomically cannot be trusted now, or None: unfinished (no ready
    marker), or a file its marker lists missing or changed since (sha256). A marker of an older version,
    without hashes, is taken as it is."""
    marker = Path(folder) / READY_MARKER
    if not marker.is_file():
        return f"{folder} is not a finished folder (no {READY_MARKER})"
    recorded = json.loads(marker.read_text()).get("files")
    for name, digest in (recorded or {}).items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing (deleted after the folder was written)"
        if cached_sha256(path) != digest:
            return f"{path} changed since it was written (its sha256 differs from {READY_MARKER}'s)"
    return None


def write_folder_atomically(target: Path, write: Callable[[Path], None], reuse: bool = True) -> Path:
    """Run `write(tmp_dir)` and move the result to `target` in one rename; readers never see half a folder. The
    ready marker written last lists every file's sha256, so a reader can tell the folder from a damaged copy.

    Writers of one folder (trials of a sweep running at once, on one machine or a shared filesystem) take turns
    under an exclusive lock beside it. With `reuse` (shared folders: the base model, a dequantized GGUF) the
    first writes and the others find it intact and return; a folder that fails folder_problem is written again.
    Without `reuse` (a trial's own checkpoint) every call writes."""
    target = Path(target)
    if reuse and folder_problem(target) is None:
        return target
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if reuse and folder_problem(target) is None:  # written while this process waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            write(tmp)
            os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes 0700
            marker = {"name": target.name, "files": folder_digests(tmp)}
            (tmp / READY_MARKER).write_text(json.dumps(marker, indent=1))
            if target.exists():  # a crashed or damaged earlier write (nobody else writes it now)
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
