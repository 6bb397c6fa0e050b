"""Several candidates evaluated side by side: which weights each evaluation runs, their metric names, the winner
under ``select: best``, and the end-of-training table (one set of rules for every way in).

The candidates are the EMAs (``ema.labels``: ``ema0.9999``, ``ema_hl5000img``, ...; the primary first) and, with
``eval_raw``, the raw weights (``raw``). At each evaluation:

* ``to_evaluate()``: raw (with ``eval_raw``), the other EMAs (unless ``eval_all: false``), the primary last;
* metric names: the selected candidate's metrics keep their plain names (what the suite logs and compares for its
  best model); every candidate's metrics are also logged as ``<name>_<label>`` (``acc_ema0.9999``, ``acc_raw``);
  with a single EMA only ``_raw`` is added, as before;
* ``select: primary`` selects the primary; ``select: best`` the candidate with the best main metric (ties keep the
  earlier of primary, other EMAs, raw), and the suite's best-model file then holds it.

``finish(folder)`` prints a table of every candidate's final and best main metric, its noise and its realized
horizon, with the recommendation, writes it as ``ema_candidates.json`` in ``folder`` and, when matplotlib is
installed, ``ema_candidates.png`` (validation curves).

The recommendation and ``select: best`` follow the one rule of the product (``honest_pick.decide``, also used by
``length: auto`` and ``posthoc sweep``): the primary, unless another candidate beats it by more than 2 standard
errors of the difference (from paired per-batch results where the way in has them, else from the metric's noise:
with 5 or more EMAs its smoothness over their lengths, else ``sqrt(2) x`` the primary's ``noise``). ``noise`` is
the standard deviation of the metric's residuals around a least-squares line over the evaluations of the last
quarter of training (steps after 3/4 of the last evaluated step): the jumps between evaluations without the trend
(``trend_noise``; None with fewer than 3 evaluations there).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional

from ema_callback.core.run_report import log_realized, realized
from ema_callback.integrations.candidate_eval import metric_value
from ema_callback.integrations.evaluation import RAW_SUFFIX
from ema_callback.plots import pyplot

logger = logging.getLogger("ema_callback")

RAW = RAW_SUFFIX.lstrip("_")  # the raw weights' candidate label: "raw"
TABLE_FILE = "ema_candidates.json"
PLOT_FILE = "ema_candidates.png"


def last_quarter(series: List) -> List:
    """The ``(step, value)`` pairs after 3/4 of the last step (the end of training)."""
    if not series:
        return []
    cut = 0.75 * series[-1][0]
    return [(step, value) for step, value in series if step > cut]


def trend_noise(series: List) -> Optional[float]:
    """Residual standard deviation of ``(step, value)`` pairs around their least-squares line (ddof 2: the line's
    two parameters); None with fewer than 3 points."""
    import numpy as np

    if len(series) < 3:
        return None
    steps = np.array([s for s, _ in series], dtype=np.float64)
    values = np.array([v for _, v in series], dtype=np.float64)
    slope, intercept = np.polyfit(steps, values, 1)
    residuals = values - (slope * steps + intercept)
    return float(np.sqrt(np.sum(residuals ** 2) / (len(series) - 2)))


RULE = ("the primary unless another candidate's final metric beats it by more than 2 standard errors (a paired "
        "bootstrap of the last evaluation where the way in counts per sample, else the two candidates' validation "
        "noise combined, or the noise over lengths with 5 or more EMAs): honest_pick.decide")


def recommend(rows: List[Dict[str, Any]], higher_is_better: bool, primary: Optional[str] = None,
              lengths: Optional[Mapping[str, float]] = None,
              units: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The one rule (``honest_pick.decide``) over the candidates' final metrics: the primary (the first row unless
    named) unless another beats it by more than 2 standard errors, from the last evaluation's paired ``units`` where
    the way in has them, else the candidates' validation noise (``noise``) or, with 5 or more EMAs, the metric's
    smoothness over their lengths (``lengths``: log half-life)."""
    if not rows:
        return None
    from ema_callback.integrations.honest_pick import Evaluated, decide

    primary = primary or rows[0]["candidate"]
    evaluated = {r["candidate"]: Evaluated(r["candidate"], float(r["final"]), (units or {}).get(r["candidate"]),
                                           (lengths or {}).get(r["candidate"])) for r in rows}
    return decide(evaluated, primary, higher_is_better, RAW, {r["candidate"]: r.get("noise") for r in rows}).label


class CandidateBoard:
    """The candidates of one run: what to evaluate, the selection, the history and the end table.

    ``higher_is_better``: whether a larger main metric is better (PaddleOCR and ppdet metrics are; a ``loss`` is
    not)."""

    def __init__(self, ema, config, higher_is_better: bool = True):
        self.ema, self.config = ema, config
        self.higher_is_better = higher_is_better
        self.history: List[Dict[str, Any]] = []
        self.winner: Optional[str] = None  # the candidate selected at the latest evaluation
        self.units: Optional[Mapping[str, Any]] = None  # the latest evaluation's paired units (see ``pick``)
        self.key: Optional[str] = None  # the main metric

    @property
    def primary(self) -> str:
        return self.ema.labels[0]

    @property
    def several(self) -> bool:
        return self.ema.num_candidates > 1

    @property
    def active(self) -> bool:
        """Whether there is more than one candidate (then each evaluation compares them and the run ends with a
        table)."""
        return self.several or self.config.eval_raw

    def to_evaluate(self) -> List[str]:
        """Labels to evaluate this time, the primary last."""
        labels = [RAW] if self.config.eval_raw else []
        if self.config.eval_all:
            labels += self.ema.candidate_labels[1:]
        return labels + [self.primary]

    @contextlib.contextmanager
    def weights(self, label: str, model) -> Iterator[None]:
        """The candidate's weights in ``model`` inside the block (raw: the model as it is)."""
        if label == RAW:
            yield
            return
        with self.ema.swapped(model, label):
            yield

    def lengths(self) -> Dict[str, float]:
        """Each EMA's log half-life in optimizer steps (its place among lengths, for ``honest_pick``)."""
        out = {}
        for label, decay in zip(self.ema.candidate_labels, self.ema.decays):
            if 0 < decay < 1:
                out[label] = math.log(math.log(0.5) / math.log(decay))
        return out

    def pick(self, results: Mapping[str, Mapping[str, Any]], key: str,
             units: Optional[Mapping[str, Any]] = None) -> str:
        """The selected candidate: the primary, or with ``select: best`` the one rule's pick among ``results``
        (``honest_pick.decide``: the primary unless another beats it by more than 2 standard errors, from ``units``
        (per label: each evaluation unit's numerator and denominator) where the way in has them, else from the
        metric's noise)."""
        from ema_callback.integrations.honest_pick import Evaluated, decide

        self.key, self.units = key, units
        if self.config.select != "best":
            return self.primary
        order = ([self.primary] + [label for label in self.ema.candidate_labels[1:] if label in results]
                 + ([RAW] if RAW in results else []))
        lengths = self.lengths()
        evaluated = {}
        for label in order:
            value = metric_value(results[label].get(key)) if label in results else None
            if value is not None and value == value:
                evaluated[label] = Evaluated(label, value, (units or {}).get(label), lengths.get(label))
        if not evaluated:
            names = ", ".join(sorted({k for r in results.values() for k in r}))
            raise KeyError(f"select: best compares {key!r}, which is not among the evaluation's metrics ({names})")
        if self.primary not in evaluated:
            return next(iter(evaluated))
        return decide(evaluated, self.primary, self.higher_is_better, RAW, self.noises(evaluated)).label

    def record(self, step: int, results: Mapping[str, Mapping[str, Any]], key: str, winner: str) -> None:
        """Keep one evaluation's results; log the comparison line."""
        self.key, self.winner = key, winner
        clean = {label: {k: metric_value(v) for k, v in metrics.items() if metric_value(v) is not None}
                 for label, metrics in results.items()}
        self.history.append({"step": int(step), "results": clean, "selected": winner})
        if self.active:
            shown = ", ".join(f"{label} {clean[label].get(key, float('nan')):.6g}" for label in results)
            how = f"select: best -> {winner}" if self.config.select == "best" else f"primary {self.primary}"
            logger.info("EMA: %s at optimizer step %d: %s (%s)", key, step, shown, how)

    def logged(self, results: Mapping[str, Mapping[str, Any]], winner: str) -> Dict[str, Any]:
        """The metrics dict the suite logs: the winner's plain names, and each candidate's suffixed."""
        out = dict(results[winner])
        for label, metrics in results.items():
            if label == self.primary and not self.several and self.config.select != "best":
                continue  # a single EMA: its metrics are the plain names, as always
            for name, value in metrics.items():
                if not name.endswith(RAW_SUFFIX):
                    out[f"{name}_{label}"] = value
        return out

    # ---------------------------------------------------------------- the end of training
    def noises(self, labels) -> Dict[str, Optional[float]]:
        """``noise_of`` each label (for ``honest_pick.decide``)."""
        return {label: self.noise_of(label) for label in labels}

    def noise_of(self, label: str) -> Optional[float]:
        """``trend_noise`` of ``label``'s main metric over the last quarter of the evaluations (None: too few)."""
        if self.key is None:
            return None
        series = [(h["step"], h["results"][label][self.key]) for h in self.history
                  if label in h["results"] and self.key in h["results"][label]]
        return trend_noise(last_quarter(series))

    def summary(self) -> Dict[str, Any]:
        """Every candidate's final and best main metric, and the recommended one."""
        key, rows = self.key, []
        if not self.history or key is None:
            return {}
        decays = dict(zip(self.ema.candidate_labels, self.ema.decays))
        for label in list(self.ema.candidate_labels) + [RAW]:
            series = [(h["step"], h["results"][label][key]) for h in self.history
                      if label in h["results"] and key in h["results"][label]]
            if not series:
                continue
            pick = max if self.higher_is_better else min
            best_step, best = pick(series, key=lambda item: item[1])
            tail = last_quarter(series)
            row = {"candidate": label, "decay_per_step": decays.get(label), "final": series[-1][1],
                   "best": best, "best_step": best_step, "noise": trend_noise(tail), "noise_evaluations": len(tail),
                   "curve": series}
            if label != RAW:  # what the EMA averaged over (horizon.realized)
                r = realized(self.ema, label)
                row.update(half_weight_images=r["half_weight_images"], half_weight_steps=r["half_weight_steps"],
                           weight_on_start=r["weight_on_start"])
            rows.append(row)
        return {"metric": key, "higher_is_better": self.higher_is_better, "select": self.config.select,
                "primary": self.primary, "candidates": rows,
                "recommended": recommend(rows, self.higher_is_better, self.primary, self.lengths(), self.units),
                "recommendation_rule": RULE,
                "selected_last": self.winner}

    def table(self) -> str:
        data = self.summary()
        if not data:
            return ""
        lines = [f"EMA candidates ({data['metric']}, {'higher' if self.higher_is_better else 'lower'} is better):",
                 f"  {'candidate':<18} {'decay/step':>12} {'final':>10} {'best':>10} {'best at step':>12} "
                 f"{'noise':>8} {'half weight on last':>20} {'on start':>8}"]
        for row in data["candidates"]:
            decay = f"{row['decay_per_step']:.8g}" if row["decay_per_step"] is not None else "-"
            span = row.get("half_weight_images") or row.get("half_weight_steps")
            unit = " images" if row.get("half_weight_images") else " steps"
            half = "-" if row["candidate"] == RAW else f"{span:,.0f}{unit}" if span else "> run"
            start = f"{100 * row['weight_on_start']:.1f}%" if "weight_on_start" in row else "-"
            noise = f"{row['noise']:.4f}" if row["noise"] is not None else "-"
            lines.append(f"  {row['candidate']:<18} {decay:>12} {row['final']:>10.5g} {row['best']:>10.5g} "
                         f"{row['best_step']:>12} {noise:>8} {half:>20} {start:>8}")
        lines.append(f"  recommended: {data['recommended']} (the primary unless another's final {data['metric']} "
                     "beats it by more than 2 standard errors); noise: residual std around a linear trend over the "
                     "last quarter")
        return "\n".join(lines)

    def finish(self, folder: Optional[str], write: bool = True) -> Optional[str]:
        """The end of training: each EMA's realized horizon; with several candidates, log the table and write
        ``ema_candidates.json`` (and the plot) into ``folder``; returns the JSON path."""
        log_realized(self.ema)
        if not self.active or not self.history:
            return None
        text = self.table()
        for line in text.splitlines():
            logger.info("%s", line)
        if not folder or not write:
            return None
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, TABLE_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.summary(), handle, indent=1)
        os.replace(tmp, path)
        self._plot(os.path.join(folder, PLOT_FILE))
        logger.info("EMA: candidates table written to %s", path)
        return path

    def _plot(self, path: str) -> None:
        plt = pyplot()
        if plt is None:
            return
        data = self.summary()
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for row in data["candidates"]:
            steps, values = zip(*row["curve"])
            ax.plot(steps, values, marker="o", ms=3, label=row["candidate"],
                    color="0.5" if row["candidate"] == RAW else None, ls="--" if row["candidate"] == RAW else "-")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(data["metric"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=110)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
