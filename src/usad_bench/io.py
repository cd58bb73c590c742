"""Atomic file writes: a killed process never leaves a half-written output behind.

Every file a run produces is written to a temporary sibling and moved into place with
``os.replace``, which is atomic on POSIX and Windows when both paths are on one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from usad_bench.errors import UsadError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there (the swap still protects finished runs)
    fcntl = None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates owner-only files; outputs should get the permissions a plain open() would give.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_png(image, path: str | os.PathLike, comment: str | None = None) -> None:
    """Save a PIL image as PNG atomically; ``comment`` goes into a PNG text chunk (``Comment``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if comment:
        info.add_text("Comment", comment)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_yaml(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars and paths, which metrics and configs often hold."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- exclusive locks
def lock_path_for(target: str | os.PathLike) -> Path:
    """The lock of a folder is a hidden sibling (``runs/.my_run.lock``): a fit swaps the folder itself."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive_lock(lock_file: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``lock_file`` exclusively, or raise a one-line UsadError naming the holder's pid.

    ``flock`` is released by the kernel when its holder dies, however it dies, so a lock file left
    by a killed process is simply taken over. The file records ``pid N on HOST`` for the message.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsadError(
                f"{what} is in use by another usad-bench process ({holder}); wait for it to finish or stop it, "
                "then run this command again"
            ) from None
        if _still_linked(fd, lock_file):  # not unlinked by a releasing holder between our open and flock
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)  # while still holding it, so no one can lock the unlinked file
        os.close(fd)


def _still_linked(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.stat())
    except FileNotFoundError:
        return False
