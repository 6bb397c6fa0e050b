"""``length: auto``: the EMA length picked at the end of the run from its own evaluation, and saved as the model.

What an ``EMA:`` block or ``EMACallback`` that states no length runs (or ``length: auto`` said outright).

**During training** (``resolve``, once the way in knows the run's optimizer steps ``T`` and global batch):

* the primary EMA has the **default length**: a half-life of ``ln 2 x 0.10 x T`` optimizer steps, stated in images
  (a constant decay with bias correction, from the first update). An exponential EMA's averaging window has the
  standard deviation ``h / ln 2``, so this is the window of EDM2's ``sigma_rel = 0.10`` (Karras et al. 2024; their
  best lengths lay between about 0.05 and 0.2). Evaluations during training, and the suite's best-model selection,
  use it;
* beside it, two power-function profiles (``sigma_rel`` 0.05 and 0.15, EDM2's post-hoc EMA) are tracked, updated
  every ``T // 1000`` EMA updates within 8 and 64 (``profile_every``; exact for any gap: ``posthoc.update_every``),
  and snapshotted in float16 4 times in the run, and once more at the end when the last falls before it (4 or 5
  copies of the averaged weights' float32 bytes on disk, the other tensors once), into ``posthoc/`` beside the
  checkpoints (a temporary folder when the run has none). A block's own ``posthoc:`` is used instead.

**At the end** (``AutoPick.run``), through the way in's own evaluation, at most 8 evaluations: the raw weights,
the default, 4 lengths reconstructed from the snapshots (sigma_rel 0.03, 0.06, 0.12, 0.2), then 2 more between the
best of those and its neighbours. The choice is ``honest_pick.decide``: the default unless another candidate beats
it by more than twice the standard error of the difference (paired per-unit results where the metric allows,
else the noise of the metric over nearby lengths). The pick goes into the model and the suite's files, with a
table, ``ema_auto.json`` and a plot of the metric against the length (``ema_auto.png``) in the output folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from ema_callback.config.schema import EMAConfig
from ema_callback.core.horizon import snapshot_period
from ema_callback.errors import EMAConfigError
from ema_callback.integrations.candidate_eval import Measured, evaluate_candidates, metric_value
from ema_callback.integrations.honest_pick import Decision, Evaluated, decide

logger = logging.getLogger("ema_callback")

DEFAULT_SIGMA = 0.10
TRACKED = [0.05, 0.15]
PROFILE_EVERY = (8, 64)  # the profiles' gap in EMA updates: one per 1,000 steps of the run, within these bounds
SNAPSHOTS = 4
COARSE = (0.03, 0.06, 0.12, 0.2)
REFINE = 2
RAW = "raw"
TABLE = "ema_auto.json"
PLOT = "ema_auto.png"


def half_life_steps(total_steps: int, sigma_rel: float = DEFAULT_SIGMA) -> float:
    """The half-life (optimizer steps) of the exponential EMA whose window has EDM2's ``sigma_rel``:
    ``ln 2 x sigma_rel x T`` (std of the exponential window = h / ln 2 = sigma_rel x T)."""
    return max(1.0, math.log(2.0) * sigma_rel * total_steps)


def sigma_label(sigma_rel: float) -> str:
    return f"sigma{sigma_rel:g}"


class AutoPlan:
    """What ``length: auto`` resolved to for one run: the engine's config and the numbers behind it."""

    def __init__(self, config: EMAConfig, engine_config: EMAConfig, total_steps: int, global_batch: float,
                 temporary_dir: Optional[str]):
        self.config, self.engine_config = config, engine_config
        self.total_steps, self.global_batch = total_steps, global_batch
        self.temporary_dir = temporary_dir

    @property
    def half_life_steps(self) -> float:
        """The default length in optimizer steps: the half-life in images the engine runs, over the global batch."""
        return self.engine_config.half_life_images / self.global_batch

    @property
    def snapshots(self) -> int:
        """Snapshots the run writes: one every ``snapshot_every`` steps, and one at the end when the last is before
        it (``AutoPick`` reconstructs at the end)."""
        every = int((self.engine_config.posthoc or {}).get("snapshot_every") or self.total_steps)
        return self.total_steps // every + (1 if self.total_steps % every else 0)

    def describe(self, averaged_elements: int) -> str:
        """The start line's note: what auto does and what it costs."""
        posthoc = self.engine_config.posthoc or {}
        per_snapshot = averaged_elements * len(posthoc.get("sigma_rels", [])) * \
            (2 if posthoc.get("snapshot_dtype", "float16") == "float16" else 4)
        return (f"length auto: the default length, half-life {self.half_life_steps * self.global_batch:,.0f} images "
                f"({self.half_life_steps:,.1f} of the run's {self.total_steps:,} optimizer steps: sigma_rel "
                f"{DEFAULT_SIGMA:g}), is the primary EMA during training; post-hoc profiles sigma_rel "
                f"{', '.join(f'{s:g}' for s in posthoc.get('sigma_rels', []))} updated every "
                f"{posthoc.get('update_every', 1)} EMA updates, {self.snapshots} snapshots of about "
                f"{per_snapshot / 2**20:,.1f} MiB each; at the end at most {2 + len(COARSE) + REFINE} evaluations "
                "(raw, the default, lengths rebuilt from the snapshots) pick the length, the default kept unless "
                "another beats it by more than 2 standard errors, and the pick is saved as the model (Model.fit: with "
                "final_weights='ema', its default)")


def profile_every(total_steps: int) -> int:
    """The post-hoc profiles' ``update_every`` for a run of ``total_steps``: ``total_steps // 1000`` within 8 and 64
    (each profile then sees about 1,000 weights of a long run, at least ``total_steps / 64``). Its cost per step
    over one EMA is about ``2 profiles x c / gap``, ``c`` what an extra shadow costs in the same pass relative to one
    EMA's update: ``make bench`` measures it at the gap of 8 (the automatic-mode rows of ``docs/performance.md``)."""
    return max(PROFILE_EVERY[0], min(PROFILE_EVERY[1], int(total_steps) // 1000))


def has_length(block: Optional[Dict[str, Any]]) -> bool:
    from ema_callback.config.schema import LENGTH_KEYS

    return bool(block) and any(block.get(k) is not None for k in LENGTH_KEYS)


def saved_plan(pdema: Optional[str]) -> Optional[Dict[str, Any]]:
    """The length and post-hoc settings a resumed ``length: auto`` run used, from its ``.pdema`` (ours, or ppdet's
    with ours under ``ema_callback_state``; read by the checked loader; the resume checks the file whole later):
    ``{"half_life_images", "posthoc", "source"}``, or None where there is none."""
    if not pdema or not os.path.isfile(pdema):
        return None
    from ema_callback.files.checkpoint_io import checked_load

    data = checked_load(pdema)
    if isinstance(data, dict) and isinstance(data.get("ema_callback_state"), dict):
        data = data["ema_callback_state"]
    block = data.get("config") if isinstance(data, dict) else None
    if not isinstance(block, dict):
        return None
    images, posthoc = block.get("half_life_images"), block.get("posthoc")
    if not isinstance(images, (int, float)) or isinstance(images, bool) or not images > 0 or \
            not isinstance(posthoc, dict) or not posthoc.get("update_every"):
        return None
    return {"half_life_images": float(images), "posthoc": dict(posthoc), "source": pdema}


def resolve(config: EMAConfig, batch, folder: Optional[str],
            resumed: Optional[Dict[str, Any]] = None) -> Tuple[EMAConfig, Optional[AutoPlan]]:
    """``(engine config, plan)``: for ``length: auto`` the config the engine runs (see the module docstring), else
    ``(config, None)``. ``folder``: where the snapshots go when the block names none (None: a temporary folder).
    ``resumed`` (``saved_plan``): a resumed run continues the plan it started with (default length, profile gap,
    snapshot period), whatever this run's own step count would give: its shadows were built with them."""
    if not config.auto:
        return config, None
    if resumed is not None and not config.posthoc and getattr(batch, "global_batch", 0) > 0:
        posthoc = dict(resumed["posthoc"])
        temporary = None
        if not folder:
            temporary = tempfile.mkdtemp(prefix="ema-auto-")
        posthoc["dir"] = temporary
        images = resumed["half_life_images"]
        engine_config = config.replace(length=None, half_life_images=images, posthoc=posthoc)
        total = max(1, int(round(images / batch.global_batch / (math.log(2.0) * DEFAULT_SIGMA))))
        own = getattr(batch, "total_steps", None)
        if own and abs(half_life_steps(own) * batch.global_batch - images) > 0.5:
            logger.info("EMA: length auto: the resumed run's plan continues (%s): default half-life %s images, "
                        "profiles every %s EMA updates, a snapshot every %s steps, as over its %s optimizer steps; "
                        "this fit's own count (%s steps) would give %s images", resumed["source"], f"{images:,.0f}",
                        posthoc.get("update_every"), posthoc.get("snapshot_every"), f"{total:,}", f"{own:,}",
                        f"{half_life_steps(own) * batch.global_batch:,.0f}")
        return engine_config, AutoPlan(config, engine_config, total, batch.global_batch, temporary)
    total = getattr(batch, "total_steps", None) if batch is not None else None
    if not total or batch.global_batch <= 0:
        raise EMAConfigError("EMA.length: auto needs the number of optimizer steps the run will take and its global "
                             "batch, which this way in does not know (an iterable dataset, no epoch count?); state a "
                             "length instead, e.g. EMA.half_life_images")
    gap = profile_every(int(total))
    every = gap * config.update_every
    snapshot_every = max(every, int(round(total / SNAPSHOTS / every)) * every)
    posthoc = dict(config.posthoc) if config.posthoc else {
        "sigma_rels": list(TRACKED), "snapshot_every": snapshot_every, "snapshot_dtype": "float16",
        "update_every": gap, "dir": None}
    # in optimizer steps: a period in epochs resolved to whole EMA updates
    posthoc["snapshot_every"] = snapshot_period(posthoc, batch, config.update_every)
    temporary = None
    if not posthoc.get("dir") and not folder:
        temporary = tempfile.mkdtemp(prefix="ema-auto-")
        posthoc["dir"] = temporary
    images = half_life_steps(total) * batch.global_batch
    engine_config = config.replace(length=None, half_life_images=images, posthoc=posthoc)
    return engine_config, AutoPlan(config, engine_config, int(total), batch.global_batch, temporary)


class AutoPick:
    """The end of an auto run: candidates, their evaluation (``run``), the decision, the outputs."""

    def __init__(self, ema, plan: AutoPlan, higher_is_better: bool = True, every_rank: bool = False):
        """``every_rank``: every data-parallel rank runs the end together (``Model.fit``, whose evaluation is
        collective): rank 0, which holds the snapshots, reconstructs and broadcasts each candidate, so every rank
        evaluates the same weights. Otherwise rank 0 alone runs it (PaddleOCR, ppdet)."""
        self.ema, self.plan = ema, plan
        self.every_rank = every_rank
        self.higher_is_better = higher_is_better
        self.evaluated: Dict[str, Evaluated] = {}
        self.decision: Optional[Decision] = None
        self.metric: Optional[str] = None
        self._posthoc = None

    @property
    def default(self) -> str:
        return self.ema.labels[0]

    def _reconstruction(self, sigma_rel: float) -> Dict[str, np.ndarray]:
        """The EMA of profile ``sigma_rel`` at the end of the run, by state-dict name (rank 0 reconstructs it from
        the snapshots, with one more of the profiles as they are now unless the last one is of this step; with
        ``every_rank`` the other ranks receive it)."""
        import paddle

        values = None
        if paddle.distributed.get_rank() == 0:
            if self._posthoc is None:
                from ema_callback.posthoc.snapshots import PostHocEMA, snapshot_name

                feature = self.ema.features["posthoc"]
                feature.claim_folder()  # another run's snapshots moved aside: one of this step is this run's
                if not os.path.isfile(os.path.join(feature.folder or "", snapshot_name(self.ema.num_steps))):
                    feature.write_snapshot(self.ema)
                self._posthoc = PostHocEMA(feature.folder)
            values = self._posthoc.reconstruct(sigma_rel)
        if self.every_rank and paddle.distributed.get_world_size() > 1:
            values = _from_rank0(values, self.ema.model)
        return values

    @contextlib.contextmanager
    def weights(self, label: str, model) -> Iterator[None]:
        """The candidate's weights in ``model`` inside the block (raw: as it is)."""
        if label == RAW:
            yield
        elif label == self.default:
            with self.ema.swapped(model, self.default):
                yield
        else:
            self.ema.apply_values(model, self._reconstruction(float(label[len("sigma"):])), label)
            try:
                yield
            finally:
                self.ema.restore(model)

    def run(self, measure: Callable[[], Measured], model,
            trend_noise: Union[None, float, Dict[str, Optional[float]]] = None) -> Decision:
        """Evaluate the candidates and decide: each candidate's weights go into ``model`` (``weights``) and the way
        in's own evaluation ``measure()`` (``candidate_eval``) gives its metrics and per-unit sums; the value
        compared is ``metric`` (the first metric the evaluation reports when ``metric`` is not set)."""
        if self.ema.num_updates == 0:  # no EMA and no profile holds anything but the start: nothing to compare
            self.decision = Decision(RAW, float("nan"), self.default, float("nan"), 0.0, None, "none",
                                     f"no EMA update happened in this run ({self.ema.num_steps} optimizer steps, "
                                     f"start_step {self.ema.config.start_step}): the raw weights are kept")
            logger.warning("EMA: length auto: %s", self.decision.reason)
            return self.decision

        def once(label: str, length: Optional[float] = None) -> Evaluated:
            if label not in self.evaluated:
                metrics, units = evaluate_candidates([label], lambda candidate: self.weights(candidate, model), measure)
                self.metric = self.metric or next(iter(metrics[label]), None)
                value = metric_value(metrics[label].get(self.metric)) if self.metric else None
                result = self._shared(Evaluated(label, float("nan") if value is None else value, units[label]))
                result.length = length
                self.evaluated[label] = result
                logger.info("EMA: length auto: %s -> %s %.6g", label, self.metric or "metric", result.value)
            return self.evaluated[label]

        once(RAW)
        once(self.default)
        for sigma in COARSE:
            once(sigma_label(sigma), math.log(sigma))
        sign = 1.0 if self.higher_is_better else -1.0
        grid = sorted(COARSE)
        best = max(grid, key=lambda s: sign * self.evaluated[sigma_label(s)].value)
        i = grid.index(best)
        neighbours = [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)]
        for other in neighbours[:REFINE]:
            sigma = float(f"{math.sqrt(best * other):.3g}")
            once(sigma_label(sigma), math.log(sigma))
        self.decision = decide(self.evaluated, self.default, self.higher_is_better, RAW, trend_noise)
        self._log()
        return self.decision

    def _shared(self, result: Evaluated) -> Evaluated:
        """With ``every_rank``: rank 0's value and units on every rank (a metric such as the loss is each rank's own
        share of the data), so that every rank evaluates the same candidates and makes the same decision."""
        import paddle

        if not (self.every_rank and paddle.distributed.get_world_size() > 1):
            return result
        value = paddle.to_tensor(np.array([result.value], dtype=np.float64))
        paddle.distributed.broadcast(value, src=0)
        units = result.units if result.units is not None else np.zeros((0, 2), dtype=np.float64)
        count = paddle.to_tensor(np.array([len(units)], dtype=np.int64))
        paddle.distributed.broadcast(count, src=0)
        n = int(count.numpy()[0])
        carried = paddle.to_tensor(np.ascontiguousarray(units, dtype=np.float64) if paddle.distributed.get_rank() == 0
                                   else np.zeros((n, 2), dtype=np.float64))
        if n:
            paddle.distributed.broadcast(carried, src=0)
        return Evaluated(result.label, float(value.numpy()[0]), carried.numpy() if n else None, result.length)

    def values(self, label: str, model) -> Dict[str, np.ndarray]:
        """The full state dict of candidate ``label`` (for the suite's files)."""
        from ema_callback.integrations.checkpoints import numpy_state

        with self.weights(label, model):
            return numpy_state(model)

    def length_of(self, label: str) -> str:
        """A candidate's length in images and as sigma_rel."""
        if label == RAW:
            return "the raw weights"
        steps = self.plan.total_steps
        if label == self.default:
            return (f"half-life {self.plan.half_life_steps * self.plan.global_batch:,.0f} images (sigma_rel "
                    f"{DEFAULT_SIGMA:g}, the default)")
        sigma = float(label[len("sigma"):])
        return (f"sigma_rel {sigma:g} (the power-function EMA whose window has the std of {sigma * steps:,.0f} "
                f"optimizer steps, {sigma * steps * self.plan.global_batch:,.0f} images)")

    def _log(self) -> None:
        d = self.decision
        se = f" +- {d.se:.2g}" if d.se is not None else ""
        raw = (f", {d.gain_over_raw:+.4g}{f' +- {d.se_over_raw:.2g}' if d.se_over_raw is not None else ''} over the "
               "raw weights" if d.gain_over_raw is not None else "")
        logger.info("EMA: length auto picked %s: %s %.6g, %+.4g%s over the default%s; %s", self.length_of(d.label),
                    self.metric or "metric", d.value, d.gain, se, raw, d.reason)

    def write(self, folder: Optional[str]) -> None:
        """``ema_auto.json`` and ``ema_auto.png`` (the metric against sigma_rel) in ``folder``."""
        if not folder or self.decision is None:
            return
        from ema_callback.files.checkpoint_io import atomic_write_text

        os.makedirs(folder, exist_ok=True)
        out = self.decision.as_dict()
        out.update({"metric": self.metric, "higher_is_better": self.higher_is_better,
                    "lengths": {label: self.length_of(label) for label in self.evaluated},
                    "total_steps": self.plan.total_steps, "global_batch": self.plan.global_batch})
        atomic_write_text(json.dumps(out, indent=1, default=float), os.path.join(folder, TABLE))
        from ema_callback.plots import pyplot

        plt = pyplot()
        if plt is None:
            return
        points = sorted((math.exp(e.length), e.value) for e in self.evaluated.values() if e.length is not None)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="post-hoc lengths")
        for label, style in ((self.default, "--"), (RAW, ":")):
            if label in self.evaluated:
                ax.axhline(self.evaluated[label].value, linestyle=style, color="gray",
                           label="default" if label == self.default else "raw")
        ax.set_xscale("log")
        ax.set_xlabel("sigma_rel (EMA length relative to the run)")
        ax.set_ylabel(self.metric or "metric")
        ax.set_title(f"length auto: picked {self.decision.label}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, PLOT), dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.plan.temporary_dir:
            import shutil

            shutil.rmtree(self.plan.temporary_dir, ignore_errors=True)


def _from_rank0(values: Optional[Dict[str, np.ndarray]], model) -> Dict[str, np.ndarray]:
    """``values`` (rank 0's, by state-dict name) on every rank: one broadcast per tensor of ``model``'s state dict,
    shaped and typed as rank 0's."""
    import paddle

    out = {}
    for name, tensor in model.state_dict().items():
        floating = tensor.dtype in (paddle.float32, paddle.float16, paddle.bfloat16, paddle.float64)
        dtype = np.float32 if floating else np.asarray(tensor.numpy()).dtype  # the same on every rank
        here = np.asarray(values[name]).astype(dtype) if values is not None else np.zeros(tensor.shape, dtype)
        carried = paddle.to_tensor(np.ascontiguousarray(here))
        paddle.distributed.broadcast(carried, src=0)
        out[name] = carried.numpy()
    return out


def ratio_units(pairs: List[Tuple[float, float]]) -> Optional[np.ndarray]:
    """Per-unit (numerator, denominator) pairs as an array (None when empty)."""
    return np.array(pairs, dtype=np.float64) if pairs else None
