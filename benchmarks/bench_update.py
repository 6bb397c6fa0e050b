"""EMA update speed and memory on real model shapes, in one process, with alternating repetitions.

    python benchmarks/bench_update.py [--reps 15] [--out bench_output] [--models resnet50,pp-ocrv4-rec]

For each model (paddle.vision ResNet50 and MobileNetV3; a PP-OCRv4 and an SVTR recognizer built from the
PaddleOCR checkout's configs; PicoDet-XS from the PaddleDetection checkout's config) it measures, as medians
of alternating repetitions:

* our update (``ExponentialMovingAverage.step``, NaN/Inf guard included) against the floor, one fused update
  over one flat float32 buffer of the same element count (the faster of Paddle ``lerp_`` and a chunked numpy
  pass), a naive per-tensor loop ``e = d*e + (1-d)*w``, and PaddleDetection's ``ModelEMA.update``;
* swap in + restore (``apply_to`` + ``restore``) against one plain copy of the weights;
* the shadow's bytes for ``storage_dtype`` float32/float16 and ``device`` same/cpu;
* several EMAs in one pass (``decays`` of 1, 2 and 4 entries), each against one EMA measured in the same run, on
  the numpy path and on the forced device path (target: k EMAs cost at most ``1 + 0.6 (k - 1)`` times one).

Then the overhead of EMA on a real training step (the tiny PaddleOCR recognizer of configs/paddleocr and the
demo's CRNN) with ``update_every`` 1, 4 and 16. Prints markdown tables and writes ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "third_party")
OCR_ROOT = os.environ.get("PADDLEOCR_ROOT", os.path.join(SHARED, "PaddleOCR-2.10"))
DET_ROOT = os.environ.get("PADDLEDET_ROOT", os.path.join(SHARED, "PaddleDetection-develop"))
sys.path.insert(0, REPO)

from ema_callback.core.paddle_compat import paddle  # noqa: E402  (checks the Paddle range; zlib before paddle 2.6)
from ema_callback import EMAConfig  # noqa: E402
from ema_callback.core.engine import ExponentialMovingAverage  # noqa: E402
from ema_callback.core.storage import CHUNK  # noqa: E402

DECAY = 0.999


# ---------------------------------------------------------------------------- models
def _ocr_model(config_rel, head_fix):
    sys.path.insert(0, OCR_ROOT)
    import yaml
    from ppocr.modeling.architectures import build_model

    with open(os.path.join(OCR_ROOT, config_rel)) as handle:
        text = handle.read()
    arch = yaml.load(text, Loader=yaml.Loader)["Architecture"]
    head_fix(arch)
    return build_model(arch)


def _pp_ocrv4_rec():
    def fix(arch):  # character counts of the Chinese dictionary (6623 + space), as train.py sets them
        arch["Head"]["out_channels_list"] = {"CTCLabelDecode": 6625, "NRTRLabelDecode": 6628}
    return _ocr_model("configs/rec/PP-OCRv4/ch_PP-OCRv4_rec.yml", fix)


def _svtr_rec():
    def fix(arch):
        arch["Head"]["out_channels"] = 37
    return _ocr_model("configs/rec/rec_svtrnet.yml", fix)


def _picodet_xs():
    sys.path.insert(0, DET_ROOT)
    from ppdet.core.workspace import create, load_config

    cfg = load_config(os.path.join(DET_ROOT, "configs", "picodet", "picodet_xs_320_coco_lcnet.yml"))
    return create(cfg.architecture)


MODELS = {
    "resnet50": lambda: paddle.vision.models.resnet50(),
    "mobilenetv3-large": lambda: paddle.vision.models.mobilenet_v3_large(),
    "pp-ocrv4-rec": _pp_ocrv4_rec,
    "svtr-rec": _svtr_rec,
    "picodet-xs": _picodet_xs,
}


# ---------------------------------------------------------------------------- timing
def _sync():
    if not paddle.device.get_device().startswith("cpu"):
        paddle.device.synchronize()


def alternate(fns, reps):
    """Median seconds of each function, running them in turn ``reps`` times (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def floor_fns(numel):
    """One fused update over one flat float32 buffer of ``numel`` elements: Paddle lerp_ and chunked numpy."""
    s_t, w_t = paddle.zeros([numel], "float32"), paddle.ones([numel], "float32")
    weight = paddle.full([], 1 - DECAY, "float32")
    s_np, w_np = np.zeros(numel, np.float32), np.ones(numel, np.float32)
    scratch = np.empty(CHUNK, np.float32)
    take = np.float32(1 - DECAY)

    def paddle_lerp():
        paddle._C_ops.lerp_(s_t, w_t, weight)

    def numpy_chunked():
        for a in range(0, numel, CHUNK):
            s, w = s_np[a:a + CHUNK], w_np[a:a + CHUNK]
            t = scratch[:s.size]
            np.subtract(w, s, out=t)
            t *= take
            s += t

    return paddle_lerp, numpy_chunked


def bench_model(name, reps):
    paddle.seed(0)
    model = MODELS[name]()
    model.eval()
    state = model.state_dict()
    tensors = [t for t in state.values() if t.dtype == paddle.float32]
    numel = int(sum(t.size for t in tensors))
    ema = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, schedule="constant"))
    unguarded = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, schedule="constant", nan_guard=False))
    naive_shadow = [t.clone() for t in tensors]

    def ours():
        ema.step()

    def naive_loop():
        with paddle.no_grad():
            for i, w in enumerate(tensors):
                naive_shadow[i] = DECAY * naive_shadow[i] + (1 - DECAY) * w

    fns = {"ours": ours, "ours_no_guard": unguarded.step, "naive_loop": naive_loop}
    fns["floor_paddle"], fns["floor_numpy"] = floor_fns(numel)
    try:
        sys.path.insert(0, DET_ROOT)
        from ppdet.optimizer.ema import ModelEMA

        peer = ModelEMA(model, decay=DECAY, ema_decay_type="normal")
        fns["ppdet_ModelEMA"] = peer.update
    except Exception as exc:  # ppdet needs numpy<2: say so, do not hide it
        print(f"  ({name}: PaddleDetection ModelEMA not measured: {type(exc).__name__}: {exc})")

    def swap():
        ema.apply_to(model)
        ema.restore(model)

    def plain_copy():
        with paddle.no_grad():
            [t.clone() for t in tensors]

    fns["swap_in_restore"], fns["plain_copy"] = swap, plain_copy
    times = alternate(fns, reps)
    on_cpu = paddle.device.get_device().startswith("cpu")
    floor = min(times["floor_paddle"], times["floor_numpy"]) if on_cpu else times["floor_paddle"]
    memory = {}
    for dtype in ("float32", "float16"):
        for device in ("same", "cpu"):
            store = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, storage_dtype=dtype, device=device)).store
            memory[f"{dtype}/{device}"] = {"bytes": store.nbytes, "on_host": True if device == "cpu" or
                                           tensors[0].place.is_cpu_place() else False}
    row = {
        "model": name, "tensors": len(state), "float32_elements": numel,
        "ms": {k: v * 1e3 for k, v in times.items()},
        "ours_over_floor": times["ours"] / floor,
        "ours_no_guard_over_floor": times["ours_no_guard"] / floor,
        "ppdet_over_ours": times.get("ppdet_ModelEMA", float("nan")) / times["ours"],
        "naive_over_ours": times["naive_loop"] / times["ours"],
        "swap_over_copy": times["swap_in_restore"] / times["plain_copy"],
        "memory": memory,
    }
    return row


def bench_device_path(name, reps):
    """The device path forced (``backend="paddle"``; on a GPU it is the default): one update against a flat
    ``lerp_`` floor on the same device, which does only the arithmetic (no gather, no NaN/Inf test)."""
    paddle.seed(0)
    model = MODELS[name]()
    model.eval()
    numel = int(sum(t.size for t in model.state_dict().values() if t.dtype == paddle.float32))
    ema = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, schedule="constant"), backend="paddle")
    unguarded = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, schedule="constant", nan_guard=False),
                                         backend="paddle")
    floor, _ = floor_fns(numel)

    def synced(fn):
        def run():
            fn()
            _sync()
        return run

    times = alternate({"device_path": synced(ema.step), "device_path_no_guard": synced(unguarded.step),
                       "floor_lerp": synced(floor)}, reps)
    return {"model": name, "float32_elements": numel, "ms": {k: v * 1e3 for k, v in times.items()},
            "over_floor": times["device_path"] / times["floor_lerp"],
            "no_guard_over_floor": times["device_path_no_guard"] / times["floor_lerp"]}


SEVERAL = (1, 2, 4)
SEVERAL_DECAYS = [0.999, 0.9999, 0.99, 0.9995]


def bench_several(name, reps, backend="auto"):
    """Per-update time of k = 1, 2, 4 EMAs kept in one pass (one engine with ``decays`` of k entries), alternating,
    each as a ratio to the one-EMA engine of the same run; the target is ``1 + 0.6 (k - 1)``."""
    paddle.seed(0)
    model = MODELS[name]()
    model.eval()
    engines = {k: ExponentialMovingAverage(model, EMAConfig(decays=SEVERAL_DECAYS[:k], schedule="constant"),
                                           backend=backend) for k in SEVERAL}

    def timed(engine):
        def run():
            engine.step()
            if engine.deferred:
                _sync()
        return run

    times = alternate({f"{k} EMA": timed(e) for k, e in engines.items()}, reps)
    one = times["1 EMA"]
    return {"model": name, "backend": "device path (forced)" if backend == "paddle" else "numpy (CPU default)",
            "ms": {k: v * 1e3 for k, v in times.items()},
            "over_one": {k: times[f"{k} EMA"] / one for k in SEVERAL},
            "target": {k: 1 + 0.6 * (k - 1) for k in SEVERAL}}


# ---------------------------------------------------------------------------- training-step overhead
def _tiny_ocr_step():
    sys.path.insert(0, OCR_ROOT)
    import yaml
    from ppocr.losses import build_loss
    from ppocr.modeling.architectures import build_model

    cfg = yaml.load(open(os.path.join(REPO, "configs", "paddleocr", "tiny_rec_ctc.yml")), Loader=yaml.Loader)
    cfg["Architecture"]["Head"]["out_channels"] = 12  # 10 digits + blank + space, as train.py computes
    model = build_model(cfg["Architecture"])
    loss_fn = build_loss(cfg["Loss"])
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters())
    rng = np.random.default_rng(0)
    images = paddle.to_tensor(rng.normal(size=(16, 3, 32, 100)).astype("float32"))
    labels = paddle.to_tensor(rng.integers(1, 11, size=(16, 8)).astype("int64"))
    lengths = paddle.to_tensor(np.full((16,), 5, "int64"))

    def step():
        loss = loss_fn(model(images), [images, labels, lengths])["loss"]
        loss.backward()
        opt.step()
        opt.clear_grad()
    return model, step


def _demo_step():
    from ema_callback.demo.run import _modules

    _, _, TinyCRNN, CTCLoss, _, _ = _modules()
    model = TinyCRNN()
    loss_fn = CTCLoss()
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters())
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(32, 1, 32, 128)).astype("float32"))
    y = paddle.to_tensor(rng.integers(1, 37, size=(32, 8)).astype("int32"))
    n = paddle.to_tensor(np.full((32, 1), 6, "int64"))

    def step():
        loss = loss_fn(model(x), y, n)
        loss.backward()
        opt.step()
        opt.clear_grad()
    return model, step


def bench_training_step(reps, block=4):
    """Median per-step time over blocks of ``block`` steps, the variants taking turns block by block."""
    rows = []
    for name, build in (("tiny PaddleOCR recognizer (batch 16)", _tiny_ocr_step), ("demo CRNN (batch 32)", _demo_step)):
        paddle.seed(0)
        model, step = build()
        engines = {k: ExponentialMovingAverage(model, EMAConfig(decay=DECAY, update_every=k)) for k in (1, 4, 16)}
        variants = {"no EMA": None, **{f"update_every {k}": e for k, e in engines.items()}}
        for _ in range(2):  # warm-up
            step()
        times = {k: [] for k in variants}
        for _ in range(reps):
            for label, engine in variants.items():
                start = time.perf_counter()
                for _ in range(block):
                    step()
                    if engine is not None:
                        engine.step()
                times[label].append((time.perf_counter() - start) / block)
        medians = {k: float(np.median(v)) for k, v in times.items()}
        base = medians["no EMA"]
        rows.append({"model": name, "step_ms": base * 1e3, "step_ms_all": {k: v * 1e3 for k, v in medians.items()},
                     "overhead_pct": {k: (v / base - 1) * 100 for k, v in medians.items() if k != "no EMA"}})
    return rows


def markdown(results):
    lines = [f"Machine: {results['machine']}"]
    if results["update"]:
        lines += _update_tables(results)
    return "\n".join(lines + _other_tables(results))


def _update_tables(results):
    lines = ["",
             "| model | tensors | fp32 elements | ours ms | floor ms (paddle / numpy) | ours / floor "
             "| ours, nan_guard off: ms (/ floor) | naive loop ms | ppdet ModelEMA ms | ppdet / ours "
             "| swap+restore ms | plain copy ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["update"]:
        ms = r["ms"]
        lines.append(f"| {r['model']} | {r['tensors']} | {r['float32_elements'] / 1e6:.2f}M | {ms['ours']:.2f} | "
                     f"{ms['floor_paddle']:.2f} / {ms['floor_numpy']:.2f} | {r['ours_over_floor']:.2f} | "
                     f"{ms['ours_no_guard']:.2f} ({r['ours_no_guard_over_floor']:.2f}) | "
                     f"{ms['naive_loop']:.2f} | {ms.get('ppdet_ModelEMA', float('nan')):.2f} | "
                     f"{r['ppdet_over_ours']:.1f}x | {ms['swap_in_restore']:.2f} | {ms['plain_copy']:.2f} |")
    lines += ["", "| model | shadow bytes fp32/same | fp32/cpu | fp16/same | fp16/cpu |", "|---|---|---|---|---|"]
    for r in results["update"]:
        m = r["memory"]
        lines.append(f"| {r['model']} | " + " | ".join(f"{m[k]['bytes'] / 2**20:.1f} MiB" for k in
                                                    ("float32/same", "float32/cpu", "float16/same", "float16/cpu")) + " |")
    return lines


def _other_tables(results):
    lines = []
    if results.get("device_path"):
        lines += ["", "| device path (forced) | fp32 elements | ours ms | floor: flat lerp_ ms | ours / floor "
                  "| nan_guard off ms (/ floor) |", "|---|---|---|---|---|---|"]
        for r in results["device_path"]:
            ms = r["ms"]
            lines.append(f"| {r['model']} | {r['float32_elements'] / 1e6:.2f}M | {ms['device_path']:.2f} | "
                         f"{ms['floor_lerp']:.2f} | {r['over_floor']:.2f} | {ms['device_path_no_guard']:.2f} "
                         f"({r['no_guard_over_floor']:.2f}) |")
    if results.get("several"):
        lines += ["", "| several EMAs in one pass | path | 1 EMA ms | 2 EMAs ms (/ 1) | 4 EMAs ms (/ 1) | target 2 / 4 |",
                  "|---|---|---|---|---|---|"]
        for r in results["several"]:
            ms, ratio = r["ms"], r["over_one"]
            lines.append(f"| {r['model']} | {r['backend']} | {ms['1 EMA']:.2f} | {ms['2 EMA']:.2f} ({ratio[2]:.2f}) | "
                         f"{ms['4 EMA']:.2f} ({ratio[4]:.2f}) | <= {r['target'][2]:.1f} / <= {r['target'][4]:.1f} |")
    if results.get("training"):
        lines += ["", "| training step | step ms (no EMA) | overhead update_every 1 | 4 | 16 |", "|---|---|---|---|---|"]
        for r in results["training"]:
            o = r["overhead_pct"]
            lines.append(f"| {r['model']} | {r['step_ms']:.1f} | {o['update_every 1']:+.1f}% | "
                         f"{o['update_every 4']:+.1f}% | {o['update_every 16']:+.1f}% |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default="bench_output")
    p.add_argument("--no-training", action="store_true")
    p.add_argument("--several-models", default="resnet50,pp-ocrv4-rec,picodet-xs",
                   help="models for the several-EMAs rows ('' for none)")
    p.add_argument("--device-models", default="resnet50,pp-ocrv4-rec",
                   help="models for the forced device-path rows ('' for none)")
    args = p.parse_args(argv)
    paddle.set_device(os.environ.get("BENCH_DEVICE", "cpu"))
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {paddle.device.get_device()}, "
                          f"paddle {paddle.__version__}, numpy {np.__version__}", "update": [], "training": []}
    for name in filter(None, args.models.split(",")):
        print(f"measuring {name} ...", flush=True)
        results["update"].append(bench_model(name, args.reps))
    results["device_path"] = []
    for name in filter(None, args.device_models.split(",")):
        print(f"measuring {name} on the device path ...", flush=True)
        results["device_path"].append(bench_device_path(name, args.reps))
    results["several"] = []
    for name in filter(None, args.several_models.split(",")):
        for backend in ("auto", "paddle"):
            print(f"measuring 1/2/4 EMAs of {name} ({backend}) ...", flush=True)
            results["several"].append(bench_several(name, args.reps, backend))
    if not args.no_training:
        print("measuring training-step overhead ...", flush=True)
        results["training"] = bench_training_step(args.reps)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    tables = markdown(results)
    with open(os.path.join(args.out, "tables.md"), "w") as handle:  # make bench copies it into docs/
        handle.write(tables + "\n")
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
