"""Bytes a checkpoint set gains from EMA, on the PP-OCRv4 recognizer (PaddleOCR's real model), per setting.

    python benchmarks/checkpoint_sizes.py [--model pp-ocrv4-rec] [--out bench_output]

Writes the files PaddleOCR's ``save_model`` and our ``.pdema`` make for one checkpoint (``integrations.
checkpoints.save_ema_state``, the function ``ocr-train``'s save hook calls), once the way the first release stored them
(``.pdema`` = shadow + raw weights, self-contained) and once with each tensor stored once (``state_file``), and
prints the sizes. ``.pdopt`` is the suite's and the same in both, so it is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_update import MODELS, paddle  # noqa: E402  (paddle through ema_callback.paddle_compat)

from ema_callback import EMAConfig  # noqa: E402
from ema_callback.core.engine import ExponentialMovingAverage  # noqa: E402
from ema_callback.integrations.checkpoints import numpy_state, save_ema_state  # noqa: E402

SETTINGS = {
    "default (save_as: ema)": dict(decay=0.999),
    "save_as: raw": dict(decay=0.999, save_as="raw"),
    "bias_correction": dict(decay=0.999, bias_correction=True),
    "storage_dtype: float16": dict(decay=0.999, storage_dtype="float16"),
}


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def measure(model, settings, folder):
    ema = ExponentialMovingAverage(model, EMAConfig.from_kwargs(**settings))
    with paddle.no_grad():  # one update away from the weights, so EMA != raw
        for p in model.parameters():
            if not p.stop_gradient:
                p.set_value(p.numpy() * np.float32(1.01))
    ema.step()
    raw = numpy_state(model)
    sizes = {}
    for layout in ("before", "after"):
        prefix = os.path.join(folder, layout)
        if settings.get("save_as") == "raw":
            held = raw
            paddle.save(model.state_dict(), prefix + ".pdparams")
        else:
            with ema.swapped(model):
                held = numpy_state(model)
                paddle.save(model.state_dict(), prefix + ".pdparams")
        if layout == "before":  # the first release: everything in the .pdema (+ .ema.pdparams with save_as raw)
            if settings.get("save_as") == "raw":
                ema.export(prefix + ".ema.pdparams", model)
            ema.save(prefix + ".pdema", extra={"raw_weights": raw})
        else:
            save_ema_state(ema, [prefix], model, raw, held, settings.get("save_as", "ema"))
        files = [prefix + s for s in (".pdparams", ".ema.pdparams", ".pdema") if os.path.exists(prefix + s)]
        sizes[layout] = {os.path.basename(f)[len(layout):]: os.path.getsize(f) for f in files}
    return ema.store.numel * 4, ema.store.nbytes, sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pp-ocrv4-rec", choices=sorted(MODELS))
    p.add_argument("--out", default="bench_output")
    args = p.parse_args(argv)
    paddle.set_device("cpu")
    model = MODELS[args.model]()
    rows, lines = [], [f"{args.model}: checkpoint set bytes (the suite's .pdopt left out)",
                       "| setting | shadow | .pdparams | before: .pdema (+ .ema.pdparams) | after: .pdema (+ "
                       ".ema.pdparams) | set growth before / after, in float32 copies of the averaged weights |",
                       "|---|---|---|---|---|---|"]
    for name, settings in SETTINGS.items():
        with tempfile.TemporaryDirectory() as folder:
            weights, shadow, sizes = measure(model, settings, folder)
        params = sizes["after"][".pdparams"]
        grown = {k: sum(v for s, v in sizes[k].items() if s != ".pdparams") for k in ("before", "after")}
        extra = {k: (f" (+ {mib(sizes[k]['.ema.pdparams'])})" if ".ema.pdparams" in sizes[k] else "")
                 for k in grown}
        lines.append(f"| {name} | {mib(shadow)} | {mib(params)} | {mib(sizes['before']['.pdema'])}{extra['before']} | "
                     f"{mib(sizes['after']['.pdema'])}{extra['after']} | {grown['before'] / weights:.2f} / "
                     f"{grown['after'] / weights:.2f} |")
        rows.append({"setting": name, "averaged_float32_bytes": weights, "shadow_bytes": shadow, "sizes": sizes})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "checkpoint_sizes.json"), "w") as handle:
        json.dump({"model": args.model, "rows": rows}, handle, indent=2)
    with open(os.path.join(args.out, "checkpoint_sizes.md"), "w") as handle:  # make bench copies it into docs/
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
