"""Post-hoc EMA: the EMA of any length reconstructed after training from the snapshots of the tracked
power-function profiles (the math, with its sources, is in ``power_math``; tracking and writing the snapshots is
the engine feature ``tracking``).

During training (``EMA.posthoc``) the engine keeps one extra shadow per tracked ``sigma_rel`` and every
``snapshot_every`` optimizer steps rank 0 writes ``<dir>/phema-<step as 9 digits>.safetensors``: the profiles'
averaged tensors (``profile0``, ``profile1``, ... flat, in ``snapshot_dtype``), the other tensors of the state dict
once in float32 (``other:<name>``), and a JSON header in the file's metadata (``ema_callback``: format, step, time,
sigma_rels, gammas, tensor names and shapes, a fingerprint of the model's names and shapes, the run's id, and the
sha256 of the data). The file is written under a temporary name and renamed, so a killed run loses at most the
snapshot being written; a resumed run writes the next ones under their step numbers.

Reading trusts nothing in a snapshot folder: safetensors holds no code and every size it declares is checked
against the file (``files.safetensors_file``); the header's fields are checked (types, ranges, a run id of 12 hex
digits, the step in the name equal to the step inside), the data against its sha256; a file whose name is not
``phema-<9 digits>.safetensors`` (or the ``.npz`` of earlier versions, read with every zip member stored and every
declared size checked) is skipped with a warning, and so is a symbolic link (never followed). Every failure is one
``EMAFileError`` line naming the file.

A series belongs to one run: the engine's ``run_id`` (new for a fresh run, carried by the ``.pdema`` into a
resume) is in every header. Before its first snapshot a run moves any other run's snapshots out of the folder into
``<dir>-run-<their id>`` beside it (one warning says so), a resumed run moves its own snapshots later than the step
it resumed from into ``<dir>-run-<id>-after-<step>`` (the abandoned part of the run), and ``load_snapshots``
refuses a folder that mixes runs.

Bytes per snapshot = averaged elements x profiles x dtype size (+ the non-averaged tensors once).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ema_callback.errors import EMAConfigError, EMAFileError, one_line, short_list
from ema_callback.files.safetensors_file import SafetensorsFile, dumps
from ema_callback.files.state_file import RUN_ID
from ema_callback.posthoc.power_math import SIGMA_REL_MAX, coefficients, gamma_of

logger = logging.getLogger("ema_callback")

FORMAT = "ema-callback-phema-2"  # safetensors
LEGACY_FORMAT = "ema-callback-phema-1"  # numpy .npz, written by earlier versions
NAME = re.compile(r"^phema-(\d{9})\.(safetensors|npz)$")
PATTERN = "phema-<step>.safetensors"
METADATA_KEY = "ema_callback"


def snapshot_name(step: int) -> str:
    return f"phema-{step:09d}.safetensors"


def names_fingerprint(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha1()
    for name, shape in zip(names, shapes):
        digest.update(f"{name}:{list(shape)};".encode())
    return digest.hexdigest()[:16]


LEGACY_RUN = "legacy"  # the run of snapshots (and .pdema files) written before run ids


def snapshot_bytes(header: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> bytes:
    """A snapshot file's bytes: ``arrays`` in safetensors, ``header`` (with the data's sha256 added) as metadata."""
    return dumps(arrays, lambda sha256: {METADATA_KEY: json.dumps(dict(header, format=FORMAT, digest=sha256))})


def run_of(path: str) -> str:
    """The run id in a snapshot's header (``legacy`` for files written before run ids); the header is checked, the
    data not read (this only decides which folder a snapshot belongs in)."""
    return str(Snapshot(path, verify_data=False).header.get("run") or LEGACY_RUN)


def _number(value: Any, integer: bool = False) -> bool:
    """A number >= 0 (a whole one with ``integer``) below 2**62, finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return False
    if isinstance(value, int):
        return 0 <= value < 2 ** 62
    return math.isfinite(value) and value >= 0


def check_header(header: Any, path: str, step_in_name: int) -> Dict[str, Any]:
    """The fields of a snapshot header, each of the type and range the writer gives it."""
    def bad(field: str, expected: str) -> EMAFileError:
        value = header.get(field) if isinstance(header, dict) else None
        return EMAFileError(f"{path}: header field {field}: expected {expected}, found {one_line(repr(value), 60)}")

    if not isinstance(header, dict):
        raise EMAFileError(f"{path}: the snapshot header is not a mapping")
    if header.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise bad("format", repr(FORMAT))
    for field in ("step", "updates"):
        if not _number(header.get(field), integer=True):
            raise bad(field, "a whole number >= 0")
    if header["step"] != step_in_name:
        raise EMAFileError(f"{path}: header field step: {header['step']}, but the file is named for step "
                           f"{step_in_name}")
    if not _number(header.get("time")) or header["time"] == 0:
        raise bad("time", "a finite number > 0")
    sigma_rels, gammas = header.get("sigma_rels"), header.get("gammas")
    if not isinstance(sigma_rels, list) or not sigma_rels or len(sigma_rels) > 64 or \
            not all(_number(s) and 0 < s < SIGMA_REL_MAX for s in sigma_rels):
        raise bad("sigma_rels", f"a list of numbers in (0, {SIGMA_REL_MAX:.4f})")
    if not isinstance(gammas, list) or len(gammas) != len(sigma_rels) or not all(
            _number(g) and abs(g - float(gamma_of(s))) <= 1e-6 * max(1.0, g) for g, s in zip(gammas, sigma_rels)):
        raise bad("gammas", "the gamma of each sigma_rel")
    names, shapes = header.get("names"), header.get("shapes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("names", "a list of tensor names")
    if not isinstance(shapes, list) or len(shapes) != len(names) or not all(
            isinstance(sh, list) and all(_number(d, integer=True) for d in sh) for sh in shapes):
        raise bad("shapes", "one list of sizes per name")
    if header.get("dtype") not in ("float16", "float32"):
        raise bad("dtype", "float16 or float32")
    fingerprint = header.get("fingerprint")
    if not isinstance(fingerprint, str) or fingerprint != names_fingerprint(names, shapes):
        raise bad("fingerprint", "the fingerprint of its names and shapes")
    run = header.get("run")
    if run is not None and not (isinstance(run, str) and RUN_ID.match(run)):
        raise bad("run", "12 hexadecimal digits")
    return header


class Snapshot:
    """One snapshot file, checked when opened (see the module docstring; ``verify_data=False`` skips reading the
    data for its digest); tensors are read when first needed."""

    def __init__(self, path: str, verify_data: bool = True):
        self.path = path
        match = NAME.match(os.path.basename(path))
        if not match:
            raise EMAFileError(f"{path}: not named phema-<9 digits>.safetensors")
        step = int(match.group(1))
        if match.group(2) == "npz":
            self._file = _LegacyNpz(path)
            header = self._file.header
        else:
            self._file = SafetensorsFile(path)
            try:
                header = json.loads(self._file.metadata.get(METADATA_KEY, "null"))
            except (ValueError, RecursionError) as exc:
                raise EMAFileError(f"{path}: damaged snapshot header ({type(exc).__name__})") from None
        self.header = check_header(header, path, step)
        self.step, self.time = int(self.header["step"]), float(self.header["time"])
        self._check_tensors()
        if verify_data and self.header["format"] == FORMAT and self._file.data_sha256() != self.header.get("digest"):
            raise EMAFileError(f"{path}: the digest does not match the data (the file was changed or damaged after "
                               "it was written)")

    def _check_tensors(self) -> None:
        names = self._file.names()
        count = len(self.header["sigma_rels"])
        elements = int(sum(int(np.prod(shape)) if shape else 1 for shape in self.header["shapes"]))
        dtype = np.dtype(self.header["dtype"])
        for j in range(count):
            spec = self._file.spec(f"profile{j}")
            if spec is None or spec != (dtype, (elements,)):
                raise EMAFileError(f"{self.path}: tensor profile{j}: expected {elements:,} {dtype} values, found "
                                   f"{spec[1] if spec else 'none'}")
        unexpected = [n for n in names if not (n.startswith("other:") or re.match(r"^profile\d+$", n))
                      and n != "header"]
        extra = [n for n in names if re.match(r"^profile\d+$", n) and int(n[7:]) >= count]
        if unexpected or extra:
            raise EMAFileError(f"{self.path}: unexpected tensors {short_list(unexpected + extra)}")

    def profile(self, j: int) -> np.ndarray:
        return self._file.array(f"profile{j}")

    def others(self) -> Dict[str, np.ndarray]:
        return {k[len("other:"):]: self._file.array(k) for k in self._file.names() if k.startswith("other:")}

    @property
    def nbytes(self) -> int:
        return os.path.getsize(self.path)


class _LegacyNpz:
    """A ``.npz`` snapshot of earlier versions, read strictly: every member stored (not compressed) and within the
    file, every ``.npy`` header's shape and dtype (numeric only) matching the member's size, no pickle."""

    def __init__(self, path: str):
        self.path = path
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise EMAFileError(f"{path}: not a regular file")
            self._zip = zipfile.ZipFile(path)
            self._specs: Dict[str, Tuple[np.dtype, Tuple[int, ...], int]] = {}
            total = 0
            for member in self._zip.infolist():
                total += member.file_size
                if member.compress_type != zipfile.ZIP_STORED or member.file_size != member.compress_size or \
                        total > info.st_size:
                    raise EMAFileError(f"{path}: member {one_line(member.filename, 80)} is compressed or larger than "
                                       "the file (snapshots are stored, never compressed)")
                if not member.filename.endswith(".npy"):
                    raise EMAFileError(f"{path}: member {one_line(member.filename, 80)} is not a .npy array")
                with self._zip.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0) else
                                             np.lib.format.read_array_header_2_0(handle))
                    header_size = handle.tell()
                if dtype.hasobject or dtype.kind not in "biuf" or fortran:
                    raise EMAFileError(f"{path}: member {one_line(member.filename, 80)} holds {dtype} values")
                count = 1
                for d in shape:
                    count *= int(d)
                if count * dtype.itemsize != member.file_size - header_size:
                    raise EMAFileError(f"{path}: member {one_line(member.filename, 80)} declares shape {shape} of "
                                       f"{dtype}, which its {member.file_size - header_size:,} bytes do not hold")
                self._specs[member.filename[:-4]] = (dtype, tuple(shape), member.file_size)
            self.header = json.loads(bytes(self.array("header")).decode()) if "header" in self._specs else None
        except EMAFileError:
            raise
        except Exception as exc:  # a damaged zip, npy header or JSON
            raise EMAFileError(f"{path}: not an ema-callback post-hoc snapshot ({type(exc).__name__}: "
                               f"{one_line(exc, 120)})") from None

    def names(self) -> List[str]:
        return list(self._specs)

    def spec(self, name: str):
        entry = self._specs.get(name)
        return (entry[0].newbyteorder("="), entry[1]) if entry else None

    def array(self, name: str) -> np.ndarray:
        try:
            with self._zip.open(name + ".npy") as handle:
                return np.lib.format.read_array(handle, allow_pickle=False)
        except Exception as exc:
            raise EMAFileError(f"{self.path}: member {name}: {type(exc).__name__}: {one_line(exc, 120)}") from None

    def data_sha256(self) -> None:
        return None


def list_snapshots(folder: str) -> Tuple[List[str], List[str]]:
    """(the snapshot files of ``folder`` by step, the entries skipped): only regular files named
    ``phema-<9 digits>.safetensors`` (or ``.npz``) are snapshots; symbolic links are never followed; hidden files
    (temporary ones) are passed over silently."""
    paths, skipped = [], []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if NAME.match(name) and stat.S_ISREG(mode):
            paths.append(path)
        else:
            skipped.append(name + (" (a symbolic link, not followed)" if stat.S_ISLNK(mode) else ""))
    paths.sort(key=lambda p: int(NAME.match(os.path.basename(p)).group(1)))
    return paths, skipped


def load_snapshots(folder: str) -> List[Snapshot]:
    """The snapshots of ``folder`` by step; one-line errors for no snapshots, a damaged snapshot, or snapshots of
    different runs or models; other entries are skipped with a warning."""
    if not os.path.isdir(folder):
        raise EMAFileError(f"--snapshots {folder}: no such folder")
    paths, skipped = list_snapshots(folder)
    if skipped:
        logger.warning("EMA.posthoc: %s: skipped %d entr%s that %s not snapshots: %s", folder, len(skipped),
                       "y" if len(skipped) == 1 else "ies", "is" if len(skipped) == 1 else "are", short_list(skipped))
    if not paths:
        raise EMAFileError(f"--snapshots {folder}: no post-hoc snapshots (phema-<step>.safetensors) in this folder; "
                           "train with an EMA.posthoc block to write them")
    snaps = [Snapshot(p) for p in paths]
    runs: Dict[str, List[Snapshot]] = {}
    for snap in snaps:
        runs.setdefault(str(snap.header.get("run") or LEGACY_RUN), []).append(snap)
    if len(runs) > 1:
        listed = "; ".join(f"run {run}: {', '.join(os.path.basename(s.path) for s in group[:3])}"
                           f"{f' (+{len(group) - 3} more)' if len(group) > 3 else ''}" for run, group in runs.items())
        raise EMAFileError(f"--snapshots {folder}: snapshots of {len(runs)} runs mixed ({listed}); keep one run's "
                           "snapshots per folder")
    first = snaps[0].header
    for snap in snaps[1:]:
        if snap.header["fingerprint"] != first["fingerprint"] or snap.header["sigma_rels"] != first["sigma_rels"]:
            raise EMAFileError(f"--snapshots {folder}: {os.path.basename(snap.path)} is of another model or other "
                               f"profiles than {os.path.basename(snaps[0].path)}; keep one run's snapshots per folder")
    return snaps


class PostHocEMA:
    """The EMA of any length after training, from a folder of snapshots (EDM2 post-hoc EMA).

    ``reconstruct(sigma_rel, at_step=None)`` gives a full state dict; ``export`` writes it as a plain
    ``.pdparams``; ``sweep(model, eval_fn, sigma_rels)`` loads each reconstruction into ``model``, calls
    ``eval_fn(model) -> float`` and returns the rows (for ``Model.fit`` users: ``eval_fn`` can wrap
    ``paddle.Model.evaluate``).
    """

    def __init__(self, folder: str, use_sigma_rels: Optional[Sequence[float]] = None):
        self.folder = folder
        self.snapshots = load_snapshots(folder)
        header = self.snapshots[0].header
        self.sigma_rels: List[float] = list(header["sigma_rels"])
        self.gammas: List[float] = list(header["gammas"])
        self.names: List[str] = list(header["names"])
        self.shapes = [tuple(s) for s in header["shapes"]]
        self.use = [j for j, s in enumerate(self.sigma_rels) if use_sigma_rels is None or
                    any(abs(s - u) < 1e-12 for u in use_sigma_rels)]

    @property
    def steps(self) -> List[int]:
        return [s.step for s in self.snapshots]

    def tensor_shapes(self) -> Dict[str, List[int]]:
        """``{name: shape}`` of every tensor a reconstruction holds (averaged ones, then the others)."""
        out = {name: list(shape) for name, shape in zip(self.names, self.shapes)}
        out.update({name: list(np.shape(value)) for name, value in self.snapshots[-1].others().items()})
        return out

    def extrapolated(self, sigma_rel: float) -> bool:
        """Whether ``sigma_rel`` lies outside the tracked profiles' range (the fit then extrapolates)."""
        tracked = [self.sigma_rels[j] for j in self.use]
        return not min(tracked) - 1e-12 <= sigma_rel <= max(tracked) + 1e-12

    def disk_use(self) -> str:
        total = sum(s.nbytes for s in self.snapshots)
        elements = int(sum(int(np.prod(shape)) if shape else 1 for shape in self.shapes))
        size = np.dtype(self.snapshots[0].header["dtype"]).itemsize
        return (f"{len(self.snapshots)} snapshots, {total / 2**20:.1f} MiB on disk "
                f"({total / len(self.snapshots) / 2**20:.2f} "
                f"MiB each: {elements:,} averaged elements x {len(self.sigma_rels)} profiles x {size} B "
                f"= {elements * len(self.sigma_rels) * size / 2**20:.2f} MiB, + the other tensors once)")

    def coefficients(self, sigma_rel: float, at_step: Optional[int] = None):
        """(snapshots used, profile index per term, weights) for the target profile."""
        if not 0 < sigma_rel < SIGMA_REL_MAX:
            raise EMAConfigError(f"--sigma-rel {sigma_rel}: out of range; a power-function EMA has 0 < sigma_rel < "
                                 f"{SIGMA_REL_MAX:.4f}")
        at = self.snapshots[-1].step if at_step is None else int(at_step)
        used = [s for s in self.snapshots if s.step <= at]
        if not used:
            raise EMAConfigError(f"--at-step {at}: before the first snapshot (step {self.snapshots[0].step})")
        target = next((s for s in used if s.step == at), used[-1])
        terms = [(s, j) for s in used for j in self.use]
        try:
            x = coefficients([self.gammas[j] for _, j in terms], [s.time for s, _ in terms],
                             float(gamma_of(sigma_rel)), target.time)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
            raise EMAFileError(f"--snapshots {self.folder}: the snapshots' times do not give a solvable fit "
                               f"({type(exc).__name__}: {one_line(exc, 80)}); are two of them copies?") from None
        return terms, x, target

    def reconstruct(self, sigma_rel: float, at_step: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The full state dict of the EMA with profile ``sigma_rel`` at ``at_step`` (default: the last snapshot)."""
        terms, x, target = self.coefficients(sigma_rel, at_step)
        flat = None
        for (snap, j), weight in zip(terms, x):
            part = snap.profile(j).astype(np.float64) * weight
            flat = part if flat is None else flat + part
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape)) if shape else 1
            out[name] = flat[start:start + size].reshape(shape).astype(np.float32)
            start += size
        for name, value in target.others().items():
            out[name] = value
        return out

    def export(self, sigma_rel: float, path: str, at_step: Optional[int] = None) -> str:
        from ema_callback.files.checkpoint_io import atomic_save

        atomic_save(self.reconstruct(sigma_rel, at_step), path)
        return path

    def sweep(self, model, eval_fn: Callable[[Any], float], sigma_rels: Sequence[float],
              at_step: Optional[int] = None, progress: Callable[[str], None] = print) -> List[Dict[str, float]]:
        """Evaluate each reconstruction with ``eval_fn(model)``; ``model`` gets its raw state back afterwards."""
        import paddle

        saved = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        rows = []
        try:
            for i, sigma in enumerate(sigma_rels, start=1):
                model.set_state_dict({k: paddle.to_tensor(v) for k, v in self.reconstruct(sigma, at_step).items()})
                value = float(eval_fn(model))
                rows.append({"sigma_rel": float(sigma), "metric": value})
                progress(f"post-hoc EMA {i}/{len(sigma_rels)}: sigma_rel {sigma:.4g} -> {value:.5g}")
        finally:
            model.set_state_dict({k: paddle.to_tensor(v) for k, v in saved.items()})
        return rows


def parse_sigma_rels(text: str) -> List[float]:
    """``0.05`` / ``0.05,0.1`` / ``start:stop:step`` (stop included when on the grid)."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            count = int(np.floor((stop - start) / step + 1e-9)) + 1
            return [round(start + i * step, 10) for i in range(count)]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EMAConfigError(f"--sigma-rel {text!r}: expected a number, a list a,b,c or start:stop:step") from None
