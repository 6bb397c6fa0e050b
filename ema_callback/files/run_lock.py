"""One run per output folder: ``<folder>/.ema-run.lock``, held with ``flock`` while a run with the EMA writes there.

A second run started into a folder that a live run is writing (the same config run twice, a typo in ``-o
Global.save_model_dir``, two nodes or containers sharing a volume) would move the first run's snapshots aside and
overwrite its checkpoints, each set whole but the two runs mixed, without a word. ``RunLock.acquire`` refuses it
at start-up, in one line naming the other run (host, pid, start time, command), which the lock file records.

The kernel drops the lock when its process dies, however it dies, so a crashed run never leaves the folder stuck,
and liveness needs no PID (it holds across PID namespaces, containers and, where the file system supports
``flock``, hosts). A run removes the file when it ends (a crashed run leaves it unlocked, which the next run takes);
a run that locked a file then checks that the name still refers to it, so a file removed meanwhile is never held
by two runs. Locks are per process: the same process may take the same folder again (a second ``fit`` in one
script).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional

from ema_callback.errors import EMAFileError, one_line
from ema_callback.files.checkpoint_set import owner_note, try_lock

NAME = ".ema-run.lock"
_HELD: Dict[str, "RunLock"] = {}  # folder (real path) -> this process's lock on it


class RunLock:
    """The lock of one output folder (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = os.path.realpath(folder)
        self.path = os.path.join(self.folder, NAME)
        self._fd: Optional[int] = None
        self._count = 0

    def acquire(self) -> "RunLock":
        held = _HELD.get(self.folder)
        if held is not None:
            held._count += 1
            return held
        while True:
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as exc:
                raise EMAFileError(f"{self.folder}: cannot take the run lock {NAME} ({exc.strerror or exc})") from None
            if not try_lock(fd):
                other = _describe(fd)
                os.close(fd)
                raise EMAFileError(f"{self.folder}: another run is writing into this folder ({other}); two runs in "
                                   "one folder would overwrite each other's checkpoints: give this run another output "
                                   "folder, or wait for that run to end")
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the file was removed by the run that ended meanwhile: take the new one
        note = json.loads(owner_note())
        note["command"] = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        self._fd, self._count = fd, 1
        _HELD[self.folder] = self
        return self

    def release(self) -> None:
        self._count -= 1
        if self._fd is not None and self._count <= 0:
            _HELD.pop(self.folder, None)
            try:
                os.remove(self.path)  # while still locked: a run waiting on this file will see it gone
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _describe(fd: int) -> str:
    """The other run, from what it wrote into the lock file (bounded: a damaged file is 'unknown')."""
    try:
        note = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        return one_line(f"host {note.get('host')}, pid {note.get('pid')}, since {note.get('since')}: "
                        f"{note.get('command', '')}", 300)
    except (OSError, ValueError, AttributeError):
        return "a run that did not say who it is"
