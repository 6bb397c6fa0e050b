"""Post-hoc EMA: the EMA of any length reconstructed after training from the snapshots of the tracked
power-function profiles (the math, with its sources, is in ``posthoc_math``; tracking and writing the snapshots is
the engine feature ``posthoc_profiles``).

During training (``EMA.posthoc``) the engine keeps one extra shadow per tracked ``sigma_rel`` and every
``snapshot_every`` optimizer steps rank 0 writes ``<dir>/phema-<step>.npz``: the profiles' averaged tensors in ``snapshot_dtype``, the other tensors of the state
dict once in float32, and a JSON header (step, time, sigma_rels, gammas, tensor names and shapes, a fingerprint of
the model's names and shapes, the run's id). The file is written under a temporary name and renamed, so a killed
run loses at most the snapshot being written; a resumed run writes the next ones under their step numbers (a step
written again holds the same values). ``np.load(allow_pickle=False)`` reads them: a snapshot cannot run code.

A series belongs to one run: the engine's ``run_id`` (new for a fresh run, carried by the ``.pdema`` into a
resume) is in every header. Before its first snapshot a run moves any other run's snapshots out of the folder into
``<dir>-run-<their id>`` beside it (one warning says so), and ``load_snapshots`` refuses a folder that mixes runs.

Bytes per snapshot = averaged elements x profiles x dtype size (+ the non-averaged tensors once).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ema_callback.errors import EMAConfigError, EMAFileError
from ema_callback.posthoc.power_math import SIGMA_REL_MAX, coefficients, gamma_of

logger = logging.getLogger("ema_callback")

FORMAT = "ema-callback-phema-1"
PATTERN = "phema-*.npz"


def names_fingerprint(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha1()
    for name, shape in zip(names, shapes):
        digest.update(f"{name}:{list(shape)};".encode())
    return digest.hexdigest()[:16]


LEGACY_RUN = "legacy"  # the run of snapshots (and .pdema files) written before run ids


def run_of(path: str) -> str:
    """The run id in a snapshot's header (``legacy`` for files written before run ids)."""
    return str(Snapshot(path).header.get("run") or LEGACY_RUN)


class Snapshot:
    """One snapshot file, read without unpickling; profile arrays are read when first needed."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._data = np.load(path, allow_pickle=False)
            self.header = json.loads(bytes(self._data["header"]).decode())
        except Exception as exc:  # a damaged or foreign file
            raise EMAFileError(f"{path}: not an ema-callback post-hoc snapshot ({type(exc).__name__}: {exc})") \
                from None
        if self.header.get("format") != FORMAT:
            raise EMAFileError(f"{path}: format {self.header.get('format')!r}, expected {FORMAT!r}")
        self.step, self.time = int(self.header["step"]), float(self.header["time"])

    def profile(self, j: int) -> np.ndarray:
        return self._data[f"profile{j}"]

    def others(self) -> Dict[str, np.ndarray]:
        return {k[len("other:"):]: self._data[k] for k in self._data.files if k.startswith("other:")}

    @property
    def nbytes(self) -> int:
        return os.path.getsize(self.path)


def load_snapshots(folder: str) -> List[Snapshot]:
    """The snapshots of ``folder`` by step; one-line errors for no snapshots or snapshots of different models."""
    if not os.path.isdir(folder):
        raise EMAFileError(f"--snapshots {folder}: no such folder")
    paths = sorted(glob.glob(os.path.join(folder, PATTERN)))
    if not paths:
        raise EMAFileError(f"--snapshots {folder}: no post-hoc snapshots (phema-*.npz) in this folder; train with "
                           "an EMA.posthoc block to write them")
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
        return (f"{len(self.snapshots)} snapshots, {total / 2**20:.1f} MiB on disk ({total / len(self.snapshots) / 2**20:.2f} "
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
        x = coefficients([self.gammas[j] for _, j in terms], [s.time for s, _ in terms], float(gamma_of(sigma_rel)),
                         target.time)
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
