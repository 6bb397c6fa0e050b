"""Atomic writes and checked reads of ``.pdema`` / ``.pdparams`` files.

A file is written to a temporary name in the same folder, flushed to disk and renamed over the final
name, so a crash or a full disk never leaves a partial file under a final name and never damages the
file that was there before.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
from typing import Any


from ema_callback.errors import EMAFileError  # re-exported: ema_callback.files.checkpoint_io.EMAFileError


def saved_bytes(obj: Any) -> bytes:
    """What ``paddle.save(obj)`` writes, in memory (to write the same object under several names)."""
    from ema_callback.core.paddle_compat import paddle

    buffer = io.BytesIO()
    paddle.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj: Any, path: str) -> None:
    """``paddle.save(obj)`` to ``path`` through a temporary file and ``os.replace``."""
    atomic_write_bytes(saved_bytes(obj), path)


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise EMAFileError(f"{path}: is a directory, expected a file path")
    if not os.path.isdir(folder):
        raise EMAFileError(f"{path}: folder {folder} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise EMAFileError(f"{path}: cannot be written ({exc.strerror or exc}); the previous file is unchanged") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def checked_load(path: str) -> Any:
    """A ``paddle.save`` file read through the restricted unpickler (``safe_pickle``), tensors as numpy arrays.

    One-line errors naming the file: missing, directory, empty, truncated or corrupt, or a file that names a
    global plain data never needs (it would run code when loaded): nothing of it is executed.
    """
    from ema_callback.files.safe_pickle import RefusedGlobal, safe_loads

    if os.path.isdir(path):
        raise EMAFileError(f"{path}: is a directory, expected a file")
    if not os.path.exists(path):
        raise EMAFileError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise EMAFileError(f"{path}: empty file")
    try:
        with open(path, "rb") as handle:
            return safe_loads(handle.read())
    except RefusedGlobal as exc:
        raise EMAFileError(f"{path}: refused to load: it names the global {exc}, which a file of weights never "
                           "needs (loading it would run code); nothing of it was executed") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            ImportError, RuntimeError, OSError, MemoryError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise EMAFileError(f"{path}: truncated or corrupt file ({type(exc).__name__}: {detail})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedWrite:
    """Write a checkpoint *set* into a hidden staging folder, then move each finished file to its final name.

    ``with StagedWrite(folder) as stage: write(stage.path("x.pdparams")); stage.publish(last=["x.pdema"])``.
    A crash while writing leaves only the staging folder (``.ema-staging-*``, never a final name), and the files
    of the previous set untouched; files named in ``last`` are moved last, so their presence marks a complete set.
    """

    PREFIX = ".ema-staging-"

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        self._remove_orphans()
        self.tmp = tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-", dir=self.folder)

    def _remove_orphans(self) -> None:
        """Staging folders whose writer process is gone (killed mid-save) are removed."""
        for name in os.listdir(self.folder):
            if not name.startswith(self.PREFIX):
                continue
            pid = name[len(self.PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def path(self, relative: str) -> str:
        target = os.path.join(self.tmp, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    def publish(self, last: tuple = ()) -> None:
        files = []
        for root, _, names in os.walk(self.tmp):
            files += [os.path.relpath(os.path.join(root, n), self.tmp) for n in names if not n.endswith(".tmp")]
        for relative in sorted(files, key=lambda r: (r in last, r)):
            target = os.path.join(self.folder, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(self.tmp, relative), target)

    def __enter__(self) -> "StagedWrite":
        return self

    def __exit__(self, *exc) -> bool:
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False
