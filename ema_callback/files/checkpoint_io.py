"""Single files: atomic writes, and checked, bounded reads of ``paddle.save`` files.

A file is written to a temporary name in the same folder, flushed to disk and renamed over the final name, so a
crash or a full disk never leaves a partial file under a final name and never damages the file that was there
before. A checkpoint *set* (several files published as one) is ``checkpoint_set.StagedWrite``.

Every ``paddle.save`` file this package reads goes through ``checked_load``: a regular file only (a FIFO or device
planted under a checkpoint's name is refused without blocking), read once, checked and unpickled by ``safe_pickle``
(no code runs, nothing grows beyond what the file holds), and every failure is one ``EMAFileError`` line naming the
file.
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import stat
import tempfile
from typing import Any

from ema_callback.errors import EMAFileError, one_line  # EMAFileError re-exported from here


def saved_bytes(obj: Any) -> bytes:
    """What ``paddle.save(obj)`` writes, in memory (to write the same object under several names)."""
    from ema_callback.paddle_compat import paddle

    buffer = io.BytesIO()
    paddle.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj: Any, path: str) -> None:
    """``paddle.save(obj)`` to ``path`` through a temporary file and ``os.replace``."""
    atomic_write_bytes(saved_bytes(obj), path)


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def free_space(folder: str) -> str:
    """``'12.5 MiB free'`` (or KiB, bytes) on the device of ``folder``, for a full disk's message."""
    try:
        return f"{size_text(shutil.disk_usage(folder).free)} free"
    except OSError:
        return "free space unknown"


def size_text(n: int) -> str:
    """``'1.3 MiB'``, ``'10.2 KiB'`` or ``'40 bytes'``."""
    if n >= 2**20:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**10:,.1f} KiB" if n >= 2**10 else f"{n} bytes"


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
        if exc.errno == errno.ENOSPC:
            raise EMAFileError(f"{path}: cannot be written (No space left on device: {free_space(folder)}, this file "
                               f"needs {len(data) / 2**20:,.1f} MiB); the previous file is unchanged") from None
        raise EMAFileError(f"{path}: cannot be written ({exc.strerror or exc}); "
                           "the previous file is unchanged") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_file_bytes(path: str) -> bytes:
    """The bytes of the regular file at ``path``; a missing file, a folder, a FIFO or a device is one
    ``EMAFileError`` line (opened without blocking, so a FIFO cannot hang the reader)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise EMAFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise EMAFileError(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise EMAFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise EMAFileError(f"{path}: is a directory, expected a file")
        if not stat.S_ISREG(mode):
            raise EMAFileError(f"{path}: not a regular file (a FIFO, socket or device), expected a file")
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            return handle.read()
    except OSError as exc:
        raise EMAFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        if fd >= 0:
            os.close(fd)


def checked_load(path: str) -> Any:
    """A ``paddle.save`` file read through the checked unpickler (``safe_pickle``), tensors as numpy arrays.

    One-line errors naming the file: missing, directory, not a regular file, empty, truncated or corrupt, larger
    walked than stored, or naming a global plain data never needs (it would run code when loaded): nothing of it is
    executed, and nothing is allocated beyond about twice the file's size.
    """
    from ema_callback.files.safe_pickle import RefusedGlobal, UnsafePickle, safe_loads

    data = read_file_bytes(path)
    if not data:
        raise EMAFileError(f"{path}: empty file")
    try:
        return safe_loads(data)
    except RefusedGlobal as exc:
        raise EMAFileError(f"{path}: refused to load: it names the global {exc}, which a file of weights never "
                           "needs (loading it would run code); nothing of it was executed") from None
    except UnsafePickle as exc:
        raise EMAFileError(f"{path}: refused to load: not plain data as paddle.save writes it ({exc}); nothing of it "
                           "was built") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            ImportError, RuntimeError, OSError, MemoryError, UnicodeError, OverflowError, LookupError) as exc:
        raise EMAFileError(f"{path}: truncated or corrupt file ({type(exc).__name__}: {one_line(exc, 160)})") from None
