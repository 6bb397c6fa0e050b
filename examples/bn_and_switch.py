"""What ``recompute_bn`` and ``switch_every`` do on the demo's model (tiny CRNN + CTC, synthetic text lines).

    python examples/bn_and_switch.py [--steps 800] [--eval-every 80] [--out bn_and_switch_output]

Trains the demo's recognizer with ``paddle.Model.fit`` three times from the same weights and data order, with
one EMA (half-life 4,000 images, constant schedule) each time:

* ``EMA``: BatchNorm statistics averaged with the weights (``buffers: average``, the default);
* ``EMA + recompute_bn 16``: the statistics recomputed for the EMA weights over the last 16 training batches
  before every evaluation;
* ``EMA + switch_every 250``: Switch EMA, the weights take the EMA weights every 250 optimizer steps.

Prints the final and best validation accuracy of the EMA weights (and of the raw weights, which Switch EMA
changes) and writes ``results.json``.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ema_callback import EMACallback  # noqa: E402
from ema_callback.demo.run import DATA_STYLE, NumpyBatches, _modules, prepared_model  # noqa: E402
from ema_callback.demo.text_lines import make_text_lines  # noqa: E402

VARIANTS = {"EMA": {}, "EMA + recompute_bn 16": {"recompute_bn": 16}, "EMA + switch_every 250": {"switch_every": 250}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=80)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default="bn_and_switch_output")
    args = p.parse_args(argv)
    paddle, TextLines, TinyCRNN, _, _, CyclingBatches = _modules()
    paddle.set_device("cpu")
    images, labels = make_text_lines(args.train_size + args.eval_size, args.seed, **DATA_STYLE)
    train = TextLines(images[:args.train_size], labels[:args.train_size])
    valid = TextLines(images[args.train_size:], labels[args.train_size:])
    paddle.seed(args.seed)
    initial = {k: v.numpy().copy() for k, v in TinyCRNN().state_dict().items()}
    results, started = {}, time.time()
    for name, extra in VARIANTS.items():
        model = prepared_model(initial, args.seed, 0.004)
        rows = []

        class Record(paddle.callbacks.Callback):
            def on_eval_end(self, logs=None):
                rows.append({"ema": float(np.mean(logs["acc"])), "raw": float(np.mean(logs["acc_raw"]))})

        cb = EMACallback(half_life_images=4000, schedule="constant", eval_raw=True, final_weights="raw",
                         monitor="acc", **extra)
        batches = CyclingBatches(len(train), args.batch_size, args.eval_every, args.seed)
        model.fit(NumpyBatches(paddle.io.DataLoader(train, batch_sampler=batches)),
                  NumpyBatches(paddle.io.DataLoader(valid, batch_size=128, shuffle=False)),
                  epochs=args.steps // args.eval_every, verbose=0, callbacks=[cb, Record()])
        results[name] = {"ema_final": rows[-1]["ema"], "ema_best": max(r["ema"] for r in rows),
                         "raw_final": rows[-1]["raw"], "raw_best": max(r["raw"] for r in rows),
                         "switches": cb.ema.features["switch"].count if "switch" in cb.ema.features else 0,
                         "curve": rows}
        print(f"{name}: EMA acc final {rows[-1]['ema']:.3f}, best {results[name]['ema_best']:.3f}; raw final "
              f"{rows[-1]['raw']:.3f} ({time.time() - started:.0f}s)", flush=True)
    print(f"\n{args.steps} steps, batch {args.batch_size}, EMA half-life 4000 images (constant), seed {args.seed}\n")
    print("| run | EMA final val acc | EMA best | raw final | raw best | switches |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ema_final']:.3f} | {r['ema_best']:.3f} | {r['raw_final']:.3f} | {r['raw_best']:.3f} "
              f"| {r['switches']} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"settings": vars(args), "results": results, "seconds": round(time.time() - started, 1)}, handle,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
