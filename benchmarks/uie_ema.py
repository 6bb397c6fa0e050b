"""UIE span extraction with PaddleNLP's Trainer: raw weights against their EMA on the same run, several seeds.

    python benchmarks/uie_ema.py --seeds 1,2,3,4,5 --out bench_output/uie     # then copy to docs/ (make bench-nlp)

Each seed trains a randomly initialised UIE (``examples/uie_ema.py``: small ErnieConfig, the synthetic span task
with 15% of the training spans moved by one token) with ``EMATrainerCallback(half_life_images=H, eval_raw=True)``
at a constant learning rate, as UIE's ``finetune.py`` does, evaluating raw and EMA every ``steps / 10`` optimizer
steps on the Trainer's eval split. At the end both weight sets are scored on a separate test split (never seen
during training or evaluation): span F1 = 2 x correct / (predicted + gold) over the split, with PaddleNLP's
``SpanEvaluator`` per example. The paired difference EMA - raw is on the same test examples; its standard error is
a bootstrap over the examples (2,000 resamples, seed 0). Across seeds: the mean difference, its standard error
(sample std / sqrt(seeds)) and how many seeds the EMA is ahead. "Plateau": the raw F1's least-squares slope over the
last half of the evaluations, per 1,000 steps, is reported beside each seed (near 0: the run has stopped improving).

Writes ``uie_ema.json`` (every figure) and ``uie_ema.md`` (the table) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "examples"), os.path.join(HERE, "..")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def f1_of(units: np.ndarray) -> float:
    """Span F1 of (correct, predicted, gold) counts summed over examples."""
    c, p, g = units.sum(axis=0)
    return float(2.0 * c / (p + g)) if p + g > 0 else 0.0


def paired_bootstrap_se(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0) -> float:
    """Standard error of F1(b) - F1(a) by resampling the same examples for both."""
    rng = np.random.default_rng(seed)
    n = len(a)
    diffs = np.empty(reps)
    for i in range(reps):
        idx = rng.integers(0, n, n)
        diffs[i] = f1_of(b[idx]) - f1_of(a[idx])
    return float(diffs.std(ddof=1))


def slope_per_1000(points) -> float:
    steps = np.array([s for s, _ in points], float)
    values = np.array([v for _, v in points], float)
    return float(np.polyfit(steps, values, 1)[0] * 1000.0) if len(points) >= 3 else float("nan")


def run_seed(seed: int, args, out: str) -> dict:
    import paddle
    import uie_ema

    from ema_callback.integrations.paddlenlp_trainer import EMATrainerCallback

    every = max(1, args.steps // 10)
    cb = EMATrainerCallback(half_life_images=args.half_life_images, eval_raw=True)
    with paddle.utils.unique_name.guard():
        trainer = uie_ema.make_trainer(os.path.join(out, f"seed{seed}"), seed=seed, callbacks=[cb],
                                       model=uie_ema.tiny_uie(seed, hidden=args.hidden), n_train=args.n_train,
                                       n_eval=256, max_steps=args.steps, eval_steps=every, save_steps=args.steps,
                                       logging_steps=every, learning_rate=args.lr,
                                       per_device_train_batch_size=args.batch, metric_for_best_model="eval_f1")
        start = time.time()
        trainer.train()
        seconds = time.time() - start
    test = uie_ema.make_examples(args.n_test, seed=12345)
    ema_units = uie_ema.per_example_f1_units(trainer.model, test)  # after train() the model holds the EMA
    cb.ema.restore(trainer.model)
    raw_units = uie_ema.per_example_f1_units(trainer.model, test)
    curve = [(h["step"], h["eval_f1_raw"], h["eval_f1"]) for h in trainer.state.log_history if "eval_f1_raw" in h]
    half = curve[len(curve) // 2:]
    raw_f1, ema_f1 = f1_of(raw_units), f1_of(ema_units)
    return {"seed": seed, "raw_f1": raw_f1, "ema_f1": ema_f1, "diff": ema_f1 - raw_f1,
            "diff_se": paired_bootstrap_se(raw_units, ema_units), "test_examples": int(len(test)),
            "raw_slope_last_half_per_1000_steps": slope_per_1000([(s, r) for s, r, _ in half]),
            "curve": [{"step": s, "raw_f1": r, "ema_f1": e} for s, r, e in curve],
            "ema_label": cb.ema.labels[0], "decay_per_step": cb.ema.decays[0], "train_seconds": seconds}


def table(data: dict) -> str:
    s = data["settings"]
    lines = [f"UIE span extraction, PaddleNLP {data['paddlenlp']} Trainer, paddle {data['paddle']}, {data['cpu']}: "
             f"{s['steps']} optimizer steps at a constant learning rate {s['lr']}, batch {s['batch']}, "
             f"EMA half-life {s['half_life_images']:,} images ({data['rows'][0]['decay_per_step']:.6f} per step); "
             f"span F1 on {data['rows'][0]['test_examples']} held-out test examples (`benchmarks/uie_ema.py`).", "",
             "| seed | raw F1 | EMA F1 | EMA - raw (paired, +- SE) | raw F1 slope, last half (per 1,000 steps) "
             "| best evaluation, raw / EMA (step) |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        raw_best = max(r["curve"], key=lambda c: c["raw_f1"])
        ema_best = max(r["curve"], key=lambda c: c["ema_f1"])
        lines.append(f"| {r['seed']} | {r['raw_f1']:.4f} | {r['ema_f1']:.4f} | {r['diff']:+.4f} +- {r['diff_se']:.4f} "
                     f"| {r['raw_slope_last_half_per_1000_steps']:+.4f} | {raw_best['raw_f1']:.3f} "
                     f"({raw_best['step']}) "
                     f"/ {ema_best['ema_f1']:.3f} ({ema_best['step']}) |")
    m = data["summary"]
    lines += ["", f"Mean over {m['seeds']} seeds: raw {m['raw_mean']:.4f}, EMA {m['ema_mean']:.4f}, paired difference "
              f"**{m['diff_mean']:+.4f} +- {m['diff_se']:.4f}** (SE over seeds); the EMA is ahead on {m['ema_ahead']} "
              f"of {m['seeds']} seeds, by more than 2 paired SE on {m['ema_ahead_2se']}, behind by more than 2 SE on "
              f"{m['ema_behind_2se']}. Raw F1 slope: least squares over the last half of the evaluations on the "
              f"Trainer's eval split ({data['rows'][0]['curve'][-1]['step'] // len(data['rows'][0]['curve'])}-step "
              "spacing); best evaluation: the highest F1 of the run's evaluations on that split (256 examples, an "
              "optimistic pick for both)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5,6,7")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--half-life-images", type=float, default=1600)
    parser.add_argument("--out", default="bench_output/uie")
    parser.add_argument("--table-only", action="store_true", help="rewrite uie_ema.md from --out's uie_ema.json")
    args = parser.parse_args(argv)
    if args.table_only:
        with open(os.path.join(args.out, "uie_ema.json")) as handle:
            data = json.load(handle)
        with open(os.path.join(args.out, "uie_ema.md"), "w") as handle:
            handle.write(table(data))
        return data
    logging.getLogger("paddlenlp").setLevel(logging.WARNING)
    import paddle
    import paddlenlp

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows.append(run_seed(seed, args, args.out))
        print(f"seed {seed}: raw {rows[-1]['raw_f1']:.4f} ema {rows[-1]['ema_f1']:.4f} "
              f"diff {rows[-1]['diff']:+.4f} +- {rows[-1]['diff_se']:.4f}", flush=True)
    diffs = np.array([r["diff"] for r in rows])
    summary = {"seeds": len(rows), "raw_mean": float(np.mean([r["raw_f1"] for r in rows])),
               "ema_mean": float(np.mean([r["ema_f1"] for r in rows])), "diff_mean": float(diffs.mean()),
               "diff_se": float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan"),
               "ema_ahead": int((diffs > 0).sum()),
               "ema_ahead_2se": int(sum(r["diff"] > 2 * r["diff_se"] for r in rows)),
               "ema_behind_2se": int(sum(r["diff"] < -2 * r["diff_se"] for r in rows))}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    data = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "table_only")},
            "paddle": paddle.__version__,
            "paddlenlp": paddlenlp.__version__, "cpu": f"{cpu} ({os.cpu_count()} cores)", "rows": rows,
            "summary": summary}
    with open(os.path.join(args.out, "uie_ema.json"), "w") as handle:
        json.dump(data, handle, indent=1)
    with open(os.path.join(args.out, "uie_ema.md"), "w") as handle:
        handle.write(table(data))
    print(table(data))
    return data


if __name__ == "__main__":
    main()
