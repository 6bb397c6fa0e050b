"""SIGKILL this process right after its K-th file operation, to stop a save at every point it can stop at.

``arm(k)`` counts, from then on, every file operation a save makes: a file opened for writing (counted when it is
closed), ``os.open`` with ``O_CREAT``, ``os.write``, ``fsync``, a rename or replace, a removal, a folder made or
removed. Right after the ``k``-th, the process kills itself with SIGKILL (no ``finally``, no ``atexit``: as a power
cut or the OOM killer would stop it). ``disarm()`` stops counting and returns how many operations were counted.
"""
import builtins
import os
import shutil
import signal

_state = {"target": None, "count": 0}
_originals = {}


def _tick():
    if _state["target"] is None:
        return
    _state["count"] += 1
    if _state["count"] == _state["target"]:
        os.kill(os.getpid(), signal.SIGKILL)


def _after(function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        _tick()
        return result
    return wrapped


class _CountedFile:
    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __iter__(self):
        return iter(self._handle)

    def close(self):
        self._handle.close()
        _tick()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _open(file, mode="r", *args, **kwargs):
    handle = _originals["open"](file, mode, *args, **kwargs)
    if _state["target"] is not None and any(c in mode for c in "wax+"):
        return _CountedFile(handle)
    return handle


def _os_open(path, flags, *args, **kwargs):
    fd = _originals["os.open"](path, flags, *args, **kwargs)
    if flags & os.O_CREAT:
        _tick()
    return fd


def install():
    if _originals:
        return
    _originals["open"] = builtins.open
    _originals["os.open"] = os.open
    builtins.open = _open
    os.open = _os_open
    for name in ("replace", "rename", "remove", "unlink", "rmdir", "mkdir", "fsync", "write"):
        _originals["os." + name] = getattr(os, name)
        setattr(os, name, _after(getattr(os, name)))
    _originals["shutil.rmtree"] = shutil.rmtree
    shutil.rmtree = _after(shutil.rmtree)


def arm(target):
    install()
    _state["target"], _state["count"] = target, 0


def disarm():
    _state["target"] = None
    return _state["count"]
