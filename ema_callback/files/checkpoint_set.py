"""A checkpoint *set* (``latest.pdparams``, ``.pdopt``, ``.states``, ``.pdema`` ...) published as one.

``with StagedWrite(folder) as stage: <write every file to stage.path(name)>; stage.publish(last=("x.pdema",))``

1. The files are written into a hidden staging folder beside the set (``.ema-staging-<random>``), whose writer
   holds an exclusive ``flock`` on ``<staging>/.lock`` for as long as it lives. The kernel drops the lock when the
   process dies, however it dies, so liveness needs no PID (PIDs mean nothing across PID namespaces, containers or
   hosts sharing a volume); the lock file also names the writer (host, pid, time) for messages.
2. ``publish`` flushes every staged file to disk, then writes the journal ``<staging>/.publish.json`` (the list of
   files in publishing order) through a temporary name and a rename: **that rename is the commit**. Then it moves
   each file over its final name (``last`` ones last), and removes the journal.
3. A save killed at any point is finished or undone by the next ``StagedWrite`` in that folder, or by
   ``recover(folder)`` (which every resume calls before it reads a set): a staging folder whose lock is free (its
   writer is dead) is rolled *forward* when its journal exists (the rest of its files are moved into place: the new
   set is whole) and removed otherwise (the old set was never touched: it is whole). A live writer's folder is
   never touched, wherever that writer runs.

So after any kill, once the folder is recovered, it holds the complete previous set or the complete new one. Between
the kill and the recovery a suite's own tool may see a set that is half published; our own readers recover first,
and ``.pdema`` files fingerprint their companions, so a mix is refused, never loaded. ``publish`` fails loudly when
its staging folder vanished (removed by someone else), and a full disk is an ``EMAFileError`` saying how much the
save needs; the previous set stays whole in both cases.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ema_callback.errors import EMAFileError

logger = logging.getLogger("ema_callback")

PREFIX = ".ema-staging-"
PREPARING = ".ema-prep-"  # a staging folder before its lock is taken (then renamed to PREFIX...)
LOCK = ".lock"
JOURNAL = ".publish.json"
MAX_JOURNAL = 1 << 20  # a journal lists a few file names
STALE_SECONDS = 600  # a folder of ours with no lock file that is older than this is a leftover (a live writer has
# no lock file for the microseconds between making its folder and creating the file)

_OWN: Dict[str, "StagedWrite"] = {}  # this process's live staging folders (a flock of our own would not conflict)


def try_lock(fd: int, blocking: bool = False) -> bool:
    """An exclusive ``flock`` on ``fd``; False if another open file holds it (only with ``blocking=False``)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def owner_note() -> str:
    """Who holds a lock, for messages: host, pid and start time."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _staged_files(root: str) -> List[str]:
    files = []
    for base, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(base, d))]
        for name in names:
            path = os.path.join(base, name)
            if base == root and name in (LOCK, JOURNAL):
                continue
            if name.endswith(".tmp") or os.path.islink(path):
                continue
            files.append(os.path.relpath(path, root))
    return files


def _inside(folder: str, relative: str) -> bool:
    """Whether ``relative`` names a place inside ``folder`` through real folders only: no ``..``, no absolute path,
    and no part on the way that is a symbolic link (which would lead a move or a removal out of the folder)."""
    if not _safe_relative(relative):
        return False
    parts = relative.replace("\\", "/").split("/")[:-1]
    path = folder
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
            return False
    return True


def _move_into_place(staging: str, folder: str, order: Sequence[str], check_present: bool) -> List[str]:
    moved = []
    for relative in order:
        if not _inside(folder, relative):
            if check_present:
                raise EMAFileError(f"{folder}: {relative} leads out of the folder (a part of it is a symbolic link); "
                                   "this checkpoint set was not saved")
            logger.warning("EMA: %s: a staged file %s leads out of the folder (a symbolic link on the way): left "
                           "alone", folder, relative)
            continue
        source, target = os.path.join(staging, relative), os.path.join(folder, relative)
        if not os.path.isfile(source):
            if check_present:
                raise EMAFileError(f"{source}: vanished before it was published (the staging folder was removed by "
                                   "another process); this checkpoint set was not saved")
            continue  # moved already by the publish that was killed
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        moved.append(relative)
    for parent in {os.path.dirname(os.path.join(folder, r)) for r in order}:
        _fsync_dir(parent)
    return moved


def _journal(staging: str) -> Optional[Tuple[List[str], List[str]]]:
    """The committed publishing order of a staging folder and the files it removes, or None (not committed, or
    unreadable)."""
    path = os.path.join(staging, JOURNAL)
    try:
        if os.path.getsize(path) > MAX_JOURNAL or os.path.islink(path):
            return None
        with open(path, "r", encoding="utf-8") as handle:
            journal = json.load(handle)
        order, remove = journal.get("files"), journal.get("remove", [])
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(order, list) or not isinstance(remove, list) or \
            not all(_safe_relative(r) for r in order + remove):
        return None
    return order, remove


def _remove_stale(folder: str, names: Sequence[str]) -> List[str]:
    """Remove the files of ``names`` (relative to ``folder``) that a published set makes stale."""
    removed = []
    for relative in names:
        path = os.path.join(folder, relative)
        if _inside(folder, relative) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(relative)
    return removed


def _safe_relative(relative: object) -> bool:
    """A path inside the set's folder: relative, no ``..``, no empty part."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        return False
    return all(part not in ("", ".", "..") for part in relative.replace("\\", "/").split("/"))


def _remove_staging(staging: str) -> None:
    """Everything in ``staging`` but its lock file, then the lock file, then the folder."""
    try:
        names = os.listdir(staging)
    except OSError:
        return
    for name in names:
        if name == LOCK:
            continue
        path = os.path.join(staging, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass
    try:
        os.remove(os.path.join(staging, LOCK))
        os.rmdir(staging)
    except OSError:
        pass


def recover(folder: str) -> List[str]:
    """Finish or undo the saves in ``folder`` whose writer is dead (see the module docstring); returns the files
    that were moved into place by rolling a committed save forward. Live writers' folders are left alone."""
    if not os.path.isdir(folder):
        return []
    finished: List[str] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.startswith((PREFIX, PREPARING)) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if os.path.abspath(path) in _OWN:
            continue
        finished += _recover_one(folder, path)
    return finished


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except OSError:
        return False


def _recover_one(folder: str, staging: str) -> List[str]:
    lock_path = os.path.join(staging, LOCK)
    try:
        fd = os.open(lock_path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:  # no lock: an older version's folder, or one being removed
        if _older_than(staging, STALE_SECONDS):
            shutil.rmtree(staging, ignore_errors=True)
        return []
    except OSError:
        return []
    try:
        if not try_lock(fd):
            return []  # its writer is alive (here, in another PID namespace, or on another host)
        if not os.path.isdir(staging):
            return []  # recovered meanwhile by another process
        journal = _journal(staging) if os.path.basename(staging).startswith(PREFIX) else None
        moved = _move_into_place(staging, folder, journal[0], check_present=False) if journal else []
        if journal:
            moved += [f"{r} (removed)" for r in _remove_stale(folder, [r for r in journal[1] if r not in journal[0]])]
        if moved:
            logger.warning("EMA: %s: finished publishing a checkpoint set whose save was killed after it was "
                           "committed (%s): the new set is whole", folder, ", ".join(moved))
        _remove_staging(staging)
        return moved
    finally:
        os.close(fd)


class StagedWrite:
    """Write a checkpoint set into a staging folder, then publish it as one (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise EMAFileError(f"{self.folder}: cannot create the checkpoint folder ({exc.strerror or exc})") from None
        recover(self.folder)
        self._lock_fd = -1
        try:
            preparing = tempfile.mkdtemp(prefix=PREPARING, dir=self.folder)
            lock = os.path.join(preparing, LOCK)
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try_lock(self._lock_fd, blocking=True)
            if os.fstat(self._lock_fd).st_ino != os.stat(lock).st_ino:  # a recovery took the folder meanwhile
                raise FileNotFoundError(lock)
            os.write(self._lock_fd, owner_note().encode())
            self.tmp = os.path.join(self.folder, PREFIX + os.path.basename(preparing)[len(PREPARING):])
            os.rename(preparing, self.tmp)  # the lock is held on the inode: it moves with the folder
        except OSError as exc:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            raise EMAFileError(f"{self.folder}: cannot start a checkpoint save here ({exc.strerror or exc}); nothing "
                               "was changed") from None
        _OWN[self.tmp] = self
        self.published = False

    def path(self, relative: str) -> str:
        """Where to write the file ``relative`` (a name, or ``sub/name``) of the set."""
        if not _inside(self.folder, relative):
            raise EMAFileError(f"{self.folder}: {relative} leads out of the folder (.., an absolute path, or a "
                               "symbolic link on the way); this checkpoint set is not saved")
        target = os.path.join(self.tmp, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    def record_sets(self, entries) -> None:
        """What the ``.pdparams`` of the sets saved now hold (``files.set_index``), published with them."""
        from ema_callback.files.set_index import NAME, write_updated

        write_updated(self.folder, self.path(NAME), entries)

    def staged_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.tmp, r)) for r in _staged_files(self.tmp)
                   if os.path.isfile(os.path.join(self.tmp, r)))

    def replaced_bytes(self) -> int:
        """The bytes of the files in the folder that belong to the sets being saved (same name up to the first dot
        as a staged file: ``latest.pdparams`` staged -> ``latest.*``): what a second copy of the set takes."""
        total, seen = 0, set()
        for relative in _staged_files(self.tmp):
            folder = os.path.join(self.folder, os.path.dirname(relative))
            stem = os.path.basename(relative).split(".")[0] + "."
            if (folder, stem) in seen or not os.path.isdir(folder):
                continue
            seen.add((folder, stem))
            for entry in os.scandir(folder):
                if entry.name.startswith(stem) and entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def publish(self, last: Sequence[str] = (), remove: Sequence[str] = ()) -> List[str]:
        """Commit the staged files and move them over their final names (``last`` ones last), then remove the
        files of ``remove`` (names relative to the folder: files of the set that the new one makes stale, such as
        the ``.pdema`` of a set saved again with the EMA off); both are in the journal, so a kill finishes both."""
        if not all(_safe_relative(r) for r in remove):
            raise EMAFileError(f"{remove!r}: not file names inside the checkpoint folder")
        if not os.path.isdir(self.tmp) or not os.path.isfile(os.path.join(self.tmp, LOCK)):
            raise EMAFileError(f"{self.tmp}: the staging folder of this save vanished (removed by another process); "
                               f"this checkpoint set was not saved and the one in {self.folder} is unchanged")
        files = _staged_files(self.tmp)
        order = sorted(files, key=lambda r: (r in last, last.index(r) if r in last else 0, r))
        for relative in order:  # the content is on disk before the commit
            with open(os.path.join(self.tmp, relative), "rb") as handle:
                os.fsync(handle.fileno())
        journal = os.path.join(self.tmp, JOURNAL)
        with open(journal + ".tmp", "w", encoding="utf-8") as handle:
            json.dump({"files": order, "remove": list(remove)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(journal + ".tmp", journal)  # the commit
        _fsync_dir(self.tmp)
        moved = _move_into_place(self.tmp, self.folder, order, check_present=True)
        _remove_stale(self.folder, [r for r in remove if r not in order])
        os.remove(journal)
        self.published = True
        return moved

    def close(self) -> None:
        """Remove the staging folder, its lock file last (a kill meanwhile leaves a folder a recovery removes)."""
        _OWN.pop(self.tmp, None)
        if not getattr(self, "_keep", False):
            _remove_staging(self.tmp)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "StagedWrite":
        return self

    def _finish_committed(self) -> None:
        """A publish interrupted after its commit (an exception, Ctrl-C): finish it, as recovery would after a kill,
        so that the new set is whole instead of mixed."""
        journal = _journal(self.tmp) if os.path.isdir(self.tmp) else None
        if journal and not self.published:
            try:
                _move_into_place(self.tmp, self.folder, journal[0], check_present=False)
                _remove_stale(self.folder, [r for r in journal[1] if r not in journal[0]])
                self.published = True
            except OSError as exc:  # left to the next recovery: keep the staging folder and its journal
                logger.warning("EMA: %s: a committed save could not be finished now (%s); the next save or resume "
                               "in this folder finishes it", self.folder, exc.strerror or exc)
                self._keep = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                self._finish_committed()
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                written = self.staged_bytes() if os.path.isdir(self.tmp) else 0
                replaced = self.replaced_bytes() if os.path.isdir(self.tmp) else 0
                from ema_callback.files.checkpoint_io import free_space, size_text

                need = f"about {size_text(replaced)}" if replaced >= written else f"at least {size_text(written)}"
                size = f"{need} free (the set it replaces holds " \
                    f"{size_text(replaced)}; {size_text(written)} of the new one were written when the disk filled)" \
                    if replaced else f"more than the {size_text(written)} of the new set written when the disk filled"
                raise EMAFileError(f"{self.folder}: the checkpoint set could not be saved (No space left on "
                                   f"device: {free_space(self.folder)}); a save writes the whole new set beside the "
                                   f"previous one before it replaces it, so it needs room for a second copy of the "
                                   f"set: {size}; the previous set is whole") from None
            if isinstance(exc, OSError):
                raise EMAFileError(f"{self.folder}: the checkpoint set could not be saved ({exc.strerror or exc}); "
                                   f"{'the new set is whole' if self.published else 'the previous set is whole'}") \
                    from None
        finally:
            self.close()
        return False
