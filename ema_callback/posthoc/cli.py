"""``ema-callback posthoc``: choose the EMA length after training, from the snapshots of an ``EMA.posthoc`` run.

    ema-callback posthoc reconstruct --snapshots DIR --sigma-rel 0.07 [--at-step N] -o weights.pdparams
    ema-callback posthoc sweep --snapshots DIR --sigma-rel 0.02:0.25:0.01 --out DIR
        [--paddleocr-root R | --paddledet-root R] -c cfg.yml [-o Key=value ...] [--metric NAME]

``sweep`` evaluates every reconstruction through the suite's **own** ``tools/eval.py`` (PaddleOCR on the YAML's
``Eval`` section, ppdet on its ``EvalDataset``), run as ``python tools/eval.py`` would be, then writes
``sweep.json``, ``sweep.md``, ``sweep.png`` (metric against sigma_rel, the tracked profiles marked) and the
reconstruction the one rule picks (``honest_pick.decide``: sigma_rel 0.10, always evaluated, unless another beats it
by more than 2 standard errors of the metric's noise over the lengths) as ``best.pdparams`` with ``best.json``
saying what it is. For ``Model.fit`` users the same is the
Python API ``ema_callback.posthoc.PostHocEMA(folder).sweep(model, eval_fn, sigma_rels)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

from ema_callback.errors import EMAConfigError
from ema_callback.integrations.auto_length import DEFAULT_SIGMA
from ema_callback.integrations.honest_pick import Evaluated, decide
from ema_callback.integrations.suite_checkout import Suite, checkout_for_one_of
from ema_callback.plots import pyplot
from ema_callback.posthoc.snapshots import PostHocEMA, parse_sigma_rels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ema-callback posthoc", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("reconstruct", help="write the EMA of one sigma_rel as a plain .pdparams")
    r.add_argument("--snapshots", required=True, help="the run's posthoc/ folder")
    r.add_argument("--sigma-rel", required=True, type=float)
    r.add_argument("--at-step", type=int, default=None, help="optimizer step (default: the last snapshot)")
    r.add_argument("-o", "--out", required=True, help="the .pdparams to write")
    s = sub.add_parser("sweep", help="evaluate many sigma_rel with the suite's own evaluation; export the best")
    s.add_argument("--snapshots", required=True)
    s.add_argument("--sigma-rel", required=True, help="start:stop:step or a,b,c")
    s.add_argument("--at-step", type=int, default=None)
    s.add_argument("--out", required=True, help="folder for sweep.json/.md/.png and best.pdparams")
    from ema_callback.integrations.registry import WAYS_IN

    for suite in (w.adapter().suite for w in WAYS_IN):  # one flag per suite: --paddleocr-root, --paddledet-root, ...
        s.add_argument(suite.option, default=None, dest=_dest(suite),
                       help=f"evaluate with this {suite.name} checkout (default: ${suite.env}, else the working "
                            "directory when it is one)")
    s.add_argument("-c", "--config", required=True, help="the suite YAML the run trained with")
    s.add_argument("-o", "--opt", nargs="+", action="extend", default=[], help="suite overrides for tools/eval.py")
    s.add_argument("--metric", default=None, help="PaddleOCR: the metric to maximise (default: its first, the "
                                                  "main indicator); ppdet: bbox mAP(0.50:0.95)")
    return p


def _dest(suite: Suite) -> str:
    return suite.option.lstrip("-").replace("-", "_")


def _suite(args) -> Tuple[Suite, str]:
    """The suite whose ``tools/eval.py`` evaluates, and its checkout, by ``suite_checkout``'s one rule; before any
    work."""
    from ema_callback.integrations.registry import WAYS_IN

    suites = [w.adapter().suite for w in WAYS_IN]
    suite, root = checkout_for_one_of([getattr(args, _dest(s)) for s in suites], "posthoc sweep", suites)
    args.way = WAYS_IN[suites.index(suite)]
    if not os.path.isfile(os.path.join(root, "tools", "eval.py")):
        raise EMAConfigError(f"{suite.name} checkout {root}: no tools/eval.py there")
    if not os.path.isfile(args.config):
        raise EMAConfigError(f"-c {args.config}: no such file")
    return suite, root


def _suite_eval(args, weights_prefix: str, expect: str) -> Tuple[float, str]:
    """(metric, name) from the suite's own tools/eval.py on ``weights_prefix``.pdparams; ``expect`` is a JSON file
    of the weights' ``{name: shape}``, checked against the model the config builds before anything is evaluated
    (``integrations.checked_suite_eval``)."""
    adapter = args.way.adapter()
    script = os.path.join(args.root, "tools", "eval.py")
    from ema_callback.integrations.checked_suite_eval import MISMATCH_EXIT, PREFIX

    cmd = [sys.executable, "-m", "ema_callback.integrations.checked_suite_eval", "--expect", expect, "--suite",
           args.way.name, script, "-c", args.config,
           *adapter.eval_options([adapter.eval_weights_option(weights_prefix), *args.opt])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log = done.stdout + done.stderr
    if done.returncode == MISMATCH_EXIT and PREFIX in log:
        line = next(log_line for log_line in log.splitlines() if PREFIX in log_line)
        raise EMAConfigError(f"-c {args.config}: the snapshots in {args.snapshots} are not of this model: "
                             f"{line.split(PREFIX, 1)[1]}")
    if done.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise EMAConfigError(f"{script} failed on {weights_prefix}.pdparams (exit {done.returncode}); its last "
                             f"lines:\n{tail}")
    try:
        return adapter.eval_metric(log, args.metric)
    except EMAConfigError as exc:
        raise EMAConfigError(f"{script}: {exc}") from None


def sweep(args) -> int:
    args.suite, args.root = _suite(args)
    post = PostHocEMA(args.snapshots)
    sigmas = parse_sigma_rels(args.sigma_rel)
    if not any(abs(s - DEFAULT_SIGMA) < 1e-12 for s in sigmas):  # the one rule compares against the default
        sigmas = sorted(sigmas + [DEFAULT_SIGMA])
    print(f"post-hoc EMA: {post.disk_use()}; tracked sigma_rel {', '.join(map(str, post.sigma_rels))}; "
          f"steps {post.steps[0]}..{post.steps[-1]}", flush=True)
    for sigma in sigmas:
        post.coefficients(sigma, args.at_step)  # every target checked before minutes of evaluation
    os.makedirs(args.out, exist_ok=True)
    rows, name = [], None
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        expect = os.path.join(tmp, "names.json")
        with open(expect, "w", encoding="utf-8") as handle:
            json.dump(post.tensor_shapes(), handle)
        for i, sigma in enumerate(sigmas, start=1):
            prefix = os.path.join(tmp, f"sigma_{sigma:.4f}".replace(".", "p"))  # ppdet splits names at dots
            post.export(sigma, prefix + ".pdparams", args.at_step)
            value, name = _suite_eval(args, prefix, expect)
            outside = post.extrapolated(sigma)
            rows.append({"sigma_rel": sigma, "metric": value, "extrapolated": outside})
            print(f"  [{i}/{len(sigmas)}] sigma_rel {sigma:.4f}: {name} {value:.6g}"
                  f"{'  (extrapolated: outside the tracked profiles)' if outside else ''}", flush=True)
    evaluated = {f"{r['sigma_rel']:g}": Evaluated(f"{r['sigma_rel']:g}", r["metric"], None, math.log(r["sigma_rel"]))
                 for r in rows}
    decision = decide(evaluated, f"{DEFAULT_SIGMA:g}", raw=None)  # the one rule: the default unless beaten
    best = next(r for r in rows if f"{r['sigma_rel']:g}" == decision.label)
    post.export(best["sigma_rel"], os.path.join(args.out, "best.pdparams"), args.at_step)
    at = post.coefficients(best["sigma_rel"], args.at_step)[2].step  # the snapshot the targets are at
    summary = {"metric": name, "rows": rows, "best": best, "decision": decision.as_dict(), "at_step": at,
               "tracked_sigma_rels": post.sigma_rels,
               "snapshots": os.path.abspath(args.snapshots), "disk": post.disk_use(),
               "evaluation": f"{args.suite.name} tools/eval.py"}
    with open(os.path.join(args.out, "sweep.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    with open(os.path.join(args.out, "best.json"), "w") as handle:
        json.dump({"what": f"post-hoc EMA, power-function profile sigma_rel {best['sigma_rel']} at optimizer step "
                           f"{at}, reconstructed from {len(post.snapshots)} snapshots of {post.sigma_rels}",
                   "sigma_rel": best["sigma_rel"], name: best["metric"], "at_step": at}, handle, indent=1)
    lines = [f"| sigma_rel | {name} | |", "|---|---|---|"] + [
        f"| {r['sigma_rel']:.4f} | {r['metric']:.6g} | {'extrapolated' if r['extrapolated'] else ''} |" for r in rows]
    lines.append(f"\nextrapolated: sigma_rel outside the tracked profiles ({min(post.sigma_rels):g} to "
                 f"{max(post.sigma_rels):g}); the least-squares fit cannot build a profile narrower or wider than "
                 "those it combines, so such values are unreliable")
    with open(os.path.join(args.out, "sweep.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"best: sigma_rel {best['sigma_rel']:.4f} ({name} {best['metric']:.6g}; {decision.reason}) -> "
          f"{os.path.join(args.out, 'best.pdparams')}")
    plot_sweep(rows, post.sigma_rels, name, os.path.join(args.out, "sweep.png"))
    return 0


def plot_sweep(rows, tracked, name: str, path: str, extra: Optional[dict] = None) -> Optional[str]:
    """Metric against sigma_rel, the tracked profiles as dotted lines, ``extra`` {label: value} as horizontal lines."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot([r["sigma_rel"] for r in rows], [r["metric"] for r in rows], "-o", ms=3, label="post-hoc EMA")
    for i, s in enumerate(tracked):
        ax.axvline(s, ls=":", color="0.5", label="tracked profiles" if i == 0 else None)
    for i, (label, value) in enumerate((extra or {}).items()):
        ax.axhline(value, ls="--", color=["#c44e52", "#55a868", "#8172b2", "#ccb974"][i % 4], label=label)
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reconstruct(args) -> int:
    post = PostHocEMA(args.snapshots)
    terms, _, target = post.coefficients(args.sigma_rel, args.at_step)
    post.export(args.sigma_rel, args.out, args.at_step)
    used = sorted({snap.step for snap, _ in terms})
    asked = f" (--at-step {args.at_step}: the last snapshot at or before it)" if args.at_step is not None and \
        args.at_step != target.step else ""
    outside = "; extrapolated: outside the tracked profiles, unreliable" if post.extrapolated(args.sigma_rel) else ""
    print(f"wrote {args.out}: post-hoc EMA sigma_rel {args.sigma_rel} at optimizer step {target.step}{asked} from "
          f"{len(used)} snapshots (steps {used[0]}..{used[-1]}){outside}; {post.disk_use()}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return sweep(args) if args.action == "sweep" else reconstruct(args)
