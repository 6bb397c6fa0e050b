"""EMA update speed and memory on real model shapes, each model's variants in one interleaving, ratios per repetition.

    python benchmarks/bench_update.py [--reps 15] [--calls 3] [--out bench_output] [--models resnet50,pp-ocrv4-rec]

For each model (paddle.vision ResNet50 and MobileNetV3; a PP-OCRv4 and an SVTR recognizer built from the
PaddleOCR checkout's configs; PicoDet-XS from the PaddleDetection checkout's config) it times, in one interleaving
(``interleave``: every repetition runs each variant ``--calls`` times in turn, the order rotated at every turn,
and keeps each variant's fastest call):

* our update (``ExponentialMovingAverage.step``, NaN/Inf guard included) against the floor, one fused update
  over one flat float32 buffer of the same element count (the faster, by median, of Paddle ``lerp_`` and a chunked
  numpy pass; bound: 1.35x), the same without the guard, a naive per-tensor loop ``e = d*e + (1-d)*w``, and
  PaddleDetection's ``ModelEMA.update``; and the numpy floor on buffers of its own against the floor (an A/A
  control: how finely this run's ratios resolve);
* swap in + restore (``apply_to`` + ``restore``) against one plain copy of the weights;
* for ``--several-models``: 2, 3 and 4 EMAs in one pass (``decays``) against the one EMA (bound ``1 + 0.6 (k - 1)``),
  and the automatic mode's update (one EMA with bias correction and two post-hoc profiles updated every 8th EMA
  update, the smallest gap ``auto_length.profile_every`` gives: runs up to 16,000 steps; longer runs cost less) per
  optimizer step, timed over 8 steps, against the one EMA (bound 1.3x); then the bytes of one of its snapshots
  (written once, after the timing) and of the 5 a run writes at most;
* the shadow's bytes for ``storage_dtype`` float32/float16 and ``device`` same/cpu.

For ``--device-models`` the forced device path gets its own interleaving (one EMA, no guard, 2/3/4 EMAs, a flat
``lerp_`` floor). Then the overhead of EMA on a real training step (the tiny PaddleOCR recognizer of
configs/paddleocr and the demo's CRNN) with ``update_every`` 1, 4 and 16 and in the automatic mode. Every ratio is
taken within each repetition and reported as its median with the interquartile range over the repetitions; the
bounds are checked on the median. The machine line names the CPU model (/proc/cpuinfo). Prints markdown tables and
writes ``results.json`` (every repetition's ratio included).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
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

from ema_callback import EMAConfig  # noqa: E402
from ema_callback.core.engine import ExponentialMovingAverage  # noqa: E402
from ema_callback.core.storage import CHUNK  # noqa: E402
from ema_callback.integrations.auto_length import PROFILE_EVERY, SNAPSHOTS  # noqa: E402
from ema_callback.paddle_compat import paddle  # noqa: E402  (checks the Paddle range; zlib before paddle 2.6)

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
GUARDED_BOUND = 1.35  # the guarded one-EMA update over the floor
AUTO_BOUND = 1.3  # the automatic mode's update cost per optimizer step over one EMA's
AUTO_EVERY = PROFILE_EVERY[0]  # the profiles' smallest gap (runs up to 16,000 steps; longer runs cost less): one
# timed call is this many optimizer steps
AUTO_SNAPSHOTS = SNAPSHOTS + 1  # at most: 4 in the run and one at its end


def several_bound(k):
    """k EMAs in one pass cost at most this many times one EMA."""
    return 1 + 0.6 * (k - 1)


def _sync():
    if not paddle.device.get_device().startswith("cpu"):
        paddle.device.synchronize()


def interleave(fns, reps, calls=3):
    """Seconds of each function in each of ``reps`` repetitions, as ``{name: array of reps}``.

    A repetition runs every function ``calls`` times in turn (A B C ... A B C ...), the order rotated by one at
    every turn, so that no function always follows the same one or always meets the same phase of a periodic
    disturbance; a function's time in the repetition is the fastest of its calls there (what it costs when the
    machine lets it run). Ratios are then taken within each repetition (``spread``). One warm-up call each;
    the garbage collector is off while timing."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {k: np.empty((reps, calls)) for k in names}
    gc.collect()
    gc.disable()
    try:
        turn = 0
        for r in range(reps):
            for c in range(calls):
                shift = turn % len(names)
                turn += 1
                for k in names[shift:] + names[:shift]:
                    _sync()
                    start = time.perf_counter()
                    fns[k]()
                    _sync()
                    times[k][r, c] = time.perf_counter() - start
            gc.collect()
    finally:
        gc.enable()
    return {k: v.min(axis=1) for k, v in times.items()}


def spread(values):
    """The median of per-repetition values with their interquartile range (25th-75th percentile) and extremes."""
    v = np.asarray(values, dtype=float)
    q25, median, q75 = np.percentile(v, [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75), "min": float(v.min()),
            "max": float(v.max()), "reps": [float(x) for x in v]}


def ms(seconds):
    return float(np.median(seconds)) * 1e3


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


SEVERAL = (2, 3, 4)
SEVERAL_DECAYS = [0.999, 0.9999, 0.99, 0.9995]
AUTO_PROFILES = [0.05, 0.15]


def auto_config(folder):
    """The automatic mode's update: one EMA (constant decay, bias correction) and two post-hoc profiles updated
    every ``AUTO_EVERY`` EMA updates; no snapshot is written while timing (``snapshot_every`` out of reach)."""
    return EMAConfig.from_block({"decay": DECAY, "schedule": "constant", "bias_correction": True,
                                 "posthoc": {"sigma_rels": AUTO_PROFILES, "snapshot_every": 10 ** 9,
                                             "update_every": AUTO_EVERY, "dir": folder}})


def _steps(step, n):
    def run():
        for _ in range(n):
            step()
    return run


def _auto_disk(engine):
    """Memory of the automatic mode's shadows, and the bytes of one snapshot it writes (written here once, after the
    timing) and of the most a run writes, also in float32 copies of the averaged weights."""
    path = engine.features["posthoc"].write_snapshot(engine)
    one = os.path.getsize(path)
    return {"shadow_bytes": engine.store.nbytes, "averaged_elements": engine.store.numel, "snapshot_bytes": one,
            "snapshots_per_run": AUTO_SNAPSHOTS, "run_bytes": AUTO_SNAPSHOTS * one, "profile_every": AUTO_EVERY,
            # over 4 bytes per averaged element
            "run_in_float32_copies": AUTO_SNAPSHOTS * one / (4 * engine.store.numel)}


def bench_model(name, reps, calls, several=False):
    """Every CPU update variant of one model in one interleaving: ours (one EMA, guarded), unguarded, the floors,
    the naive loop, ppdet's ModelEMA, swap in + restore, a plain copy; with ``several`` also 2, 3 and 4 EMAs in one
    pass and the automatic mode (its time per optimizer step over ``AUTO_EVERY`` steps)."""
    paddle.seed(0)
    model = MODELS[name]()
    model.eval()
    state = model.state_dict()
    tensors = [t for t in state.values() if t.dtype == paddle.float32]
    numel = int(sum(t.size for t in tensors))
    ema = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, schedule="constant"))
    unguarded = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, schedule="constant", nan_guard=False))
    naive_shadow = [t.clone() for t in tensors]

    def naive_loop():
        with paddle.no_grad():
            for i, w in enumerate(tensors):
                naive_shadow[i] = DECAY * naive_shadow[i] + (1 - DECAY) * w

    fns = {"ours": ema.step, "ours_no_guard": unguarded.step, "naive_loop": naive_loop}
    fns["floor_paddle"], fns["floor_numpy"] = floor_fns(numel)
    fns["floor_numpy_again"] = floor_fns(numel)[1]  # A/A: the same floor on its own buffers, the ratios' resolution
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
    folder = tempfile.mkdtemp(prefix="bench-posthoc-")
    auto = None
    if several:
        for k in SEVERAL:
            engine = ExponentialMovingAverage(model, EMAConfig(decays=SEVERAL_DECAYS[:k], schedule="constant"))
            fns[f"{k} EMA"] = engine.step
        auto = ExponentialMovingAverage(model, auto_config(folder))
        fns["auto"] = _steps(auto.step, AUTO_EVERY)
    load = _load_average()
    times = interleave(fns, reps, calls)
    if "auto" in times:
        times["auto"] = times["auto"] / AUTO_EVERY  # per optimizer step
    on_cpu = paddle.device.get_device().startswith("cpu")
    floor = min(("floor_paddle", "floor_numpy"), key=lambda k: np.median(times[k])) if on_cpu else "floor_paddle"
    memory = {}
    for dtype in ("float32", "float16"):
        for device in ("same", "cpu"):
            store = ExponentialMovingAverage(model, EMAConfig(decay=DECAY, storage_dtype=dtype, device=device)).store
            memory[f"{dtype}/{device}"] = {"bytes": store.nbytes, "on_host": True if device == "cpu" or
                                           tensors[0].place.is_cpu_place() else False}
    ours = times["ours"]
    row = {
        "model": name, "tensors": len(state), "float32_elements": numel, "floor": floor,
        "ms": {k: ms(v) for k, v in times.items()},
        "ours_over_floor": spread(ours / times[floor]),
        "ours_no_guard_over_floor": spread(times["ours_no_guard"] / times[floor]),
        "floor_again_over_floor": spread(times["floor_numpy_again"] / times["floor_numpy"]),
        "ppdet_over_ours": spread(times["ppdet_ModelEMA"] / ours) if "ppdet_ModelEMA" in times else None,
        "naive_over_ours": spread(times["naive_loop"] / ours),
        "swap_over_copy": spread(times["swap_in_restore"] / times["plain_copy"]),
        "memory": memory,
    }
    row["within_bound"] = row["ours_over_floor"]["median"] <= GUARDED_BOUND
    if several:
        row["several"] = {"backend": "numpy (CPU default)" if on_cpu else "device path (default)", "load": load,
                          "one_ms": ms(ours),
                          "over_one": {k: spread(times[f"{k} EMA"] / ours) for k in SEVERAL},
                          "bound": {k: several_bound(k) for k in SEVERAL}}
        row["several"]["within_bound"] = {k: row["several"]["over_one"][k]["median"] <= several_bound(k)
                                          for k in SEVERAL}
        row["auto"] = {"one_ms": ms(ours), "ms_per_step": ms(times["auto"]),
                       "over_one": spread(times["auto"] / ours), "bound": AUTO_BOUND,
                       **_auto_disk(auto)}
        row["auto"]["within_bound"] = row["auto"]["over_one"]["median"] <= AUTO_BOUND
    shutil.rmtree(folder, ignore_errors=True)
    return row


def bench_device_path(name, reps, calls):
    """The device path forced (``backend="paddle"``; on a GPU it is the default), in one interleaving: one update
    against a flat ``lerp_`` floor on the same device, which does only the arithmetic (no gather, no NaN/Inf test),
    the update without the guard, and 2, 3 and 4 EMAs in one pass against the one EMA."""
    paddle.seed(0)
    model = MODELS[name]()
    model.eval()
    numel = int(sum(t.size for t in model.state_dict().values() if t.dtype == paddle.float32))

    def synced(engine):
        def run():
            engine.step()
            _sync()
        return run

    def engine(**kw):
        return ExponentialMovingAverage(model, EMAConfig(schedule="constant", **kw), backend="paddle")

    floor, _ = floor_fns(numel)
    fns = {"device_path": synced(engine(decay=DECAY)),
           "device_path_no_guard": synced(engine(decay=DECAY, nan_guard=False)), "floor_lerp": floor}
    for k in SEVERAL:
        fns[f"{k} EMA"] = synced(engine(decays=SEVERAL_DECAYS[:k]))
    load = _load_average()
    times = interleave(fns, reps, calls)
    one = times["device_path"]
    several = {"backend": "device path (forced)", "load": load, "one_ms": ms(one),
               "over_one": {k: spread(times[f"{k} EMA"] / one) for k in SEVERAL},
               "bound": {k: several_bound(k) for k in SEVERAL}}
    several["within_bound"] = {k: several["over_one"][k]["median"] <= several_bound(k) for k in SEVERAL}
    return {"model": name, "float32_elements": numel, "ms": {k: ms(v) for k, v in times.items()},
            "over_floor": spread(one / times["floor_lerp"]),
            "no_guard_over_floor": spread(times["device_path_no_guard"] / times["floor_lerp"]),
            "several": several}


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


def bench_training_step(reps, block=AUTO_EVERY):
    """Time per training step over blocks of ``block`` steps, each variant one block per repetition in turn
    (``interleave`` with one call): no EMA, ``update_every`` 1, 4 and 16, and the automatic mode; the overhead of
    each is taken against the no-EMA block of the same repetition."""
    rows = []
    for name, build in (("tiny PaddleOCR recognizer (batch 16)", _tiny_ocr_step), ("demo CRNN (batch 32)", _demo_step)):
        paddle.seed(0)
        model, step = build()
        folder = tempfile.mkdtemp(prefix="bench-posthoc-")
        engines = {f"update_every {k}": ExponentialMovingAverage(model, EMAConfig(decay=DECAY, update_every=k))
                   for k in (1, 4, 16)}
        engines["automatic mode"] = ExponentialMovingAverage(model, auto_config(folder))

        def run(engine):
            def block_of_steps():
                for _ in range(block):
                    step()
                    if engine is not None:
                        engine.step()
            return block_of_steps

        fns = {"no EMA": run(None), **{label: run(e) for label, e in engines.items()}}
        times = interleave(fns, reps, calls=1)
        base = times["no EMA"]
        rows.append({"model": name, "step_ms": ms(base) / block,
                     "step_ms_all": {k: ms(v) / block for k, v in times.items()},
                     "overhead_pct": {k: spread((v / base - 1) * 100) for k, v in times.items() if k != "no EMA"}})
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def cpu_model():
    """The CPU's name from /proc/cpuinfo (``model name``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _r(stat, digits=2):
    """A ratio as ``median [25th-75th percentile]``."""
    return f"{stat['median']:.{digits}f} [{stat['q25']:.{digits}f}-{stat['q75']:.{digits}f}]"


def _yes(flag):
    return "yes" if flag else "**no**"


def markdown(results):
    lines = [f"Machine: {results['machine']}", "", results["method"]]
    if results["update"]:
        lines += _update_tables(results)
    return "\n".join(lines + _other_tables(results))


def _update_tables(results):
    lines = ["",
             f"| model | tensors | fp32 elements | ours ms | floor ms (paddle / numpy) | ours / floor "
             f"| within {GUARDED_BOUND}x? | nan_guard off ms (/ floor) | A/A: numpy floor / itself | naive loop ms "
             "| ppdet ModelEMA ms | ppdet / ours | swap+restore ms | plain copy ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["update"]:
        m = r["ms"]
        ppdet = f"{m['ppdet_ModelEMA']:.2f} | {r['ppdet_over_ours']['median']:.1f}x" if r["ppdet_over_ours"] else \
            "not measured | -"
        lines.append(f"| {r['model']} | {r['tensors']} | {r['float32_elements'] / 1e6:.2f}M | {m['ours']:.2f} | "
                     f"{m['floor_paddle']:.2f} / {m['floor_numpy']:.2f} | {_r(r['ours_over_floor'])} | "
                     f"{_yes(r['within_bound'])} | {m['ours_no_guard']:.2f} ({_r(r['ours_no_guard_over_floor'])}) | "
                     f"{_r(r['floor_again_over_floor'])} | {m['naive_loop']:.2f} | {ppdet} | "
                     f"{m['swap_in_restore']:.2f} | "
                     f"{m['plain_copy']:.2f} |")
    lines += ["", "| model | shadow bytes fp32/same | fp32/cpu | fp16/same | fp16/cpu |", "|---|---|---|---|---|"]
    for r in results["update"]:
        m = r["memory"]
        lines.append(f"| {r['model']} | " + " | ".join(
            f"{m[k]['bytes'] / 2**20:.1f} MiB" for k in ("float32/same", "float32/cpu", "float16/same", "float16/cpu"))
            + " |")
    return lines


def _other_tables(results):
    lines = []
    if results.get("device_path"):
        lines += ["", "| device path (forced) | fp32 elements | ours ms | floor: flat lerp_ ms | ours / floor "
                  "| nan_guard off ms (/ floor) |", "|---|---|---|---|---|---|"]
        for r in results["device_path"]:
            m = r["ms"]
            lines.append(f"| {r['model']} | {r['float32_elements'] / 1e6:.2f}M | {m['device_path']:.2f} | "
                         f"{m['floor_lerp']:.2f} | {_r(r['over_floor'])} | {m['device_path_no_guard']:.2f} "
                         f"({_r(r['no_guard_over_floor'])}) |")
    device = {r["model"]: r["several"] for r in results.get("device_path", [])}
    several = []
    for r in results["update"]:  # per model: the numpy rows, then the device path's
        several += [(r["model"], r["several"])] if r.get("several") else []
        several += [(r["model"], device.pop(r["model"]))] if r["model"] in device else []
    several += list(device.items())
    if several:
        bounds = " / ".join(f"{several_bound(k):.1f}" for k in SEVERAL)
        lines += ["", "| several EMAs in one pass | path | load average at its start | 1 EMA ms | "
                  + " | ".join(f"{k} EMAs / 1" for k in SEVERAL) + f" | within {bounds}? |",
                  "|---|---|---|---|" + "---|" * len(SEVERAL) + "---|"]
        for model, r in several:
            lines.append(f"| {model} | {r['backend']} | {r['load']:.1f} | {r['one_ms']:.2f} | "
                         + " | ".join(_r(r["over_one"][k]) for k in SEVERAL) + " | "
                         + " / ".join(_yes(r["within_bound"][k]) for k in SEVERAL) + " |")
    autos = [r for r in results["update"] if r.get("auto")]
    if autos:
        lines += ["", f"| automatic mode (1 EMA + {len(AUTO_PROFILES)} post-hoc profiles every {AUTO_EVERY}th update) "
                  f"| 1 EMA ms | automatic mode ms per step | automatic / 1 EMA | within {AUTO_BOUND}x? "
                  f"| shadows in memory | one snapshot | {AUTO_SNAPSHOTS} snapshots per run (at most) "
                  "| = fp32 copies of the averaged weights |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in autos:
            a = r["auto"]
            lines.append(f"| {r['model']} | {a['one_ms']:.2f} | {a['ms_per_step']:.2f} | {_r(a['over_one'])} | "
                         f"{_yes(a['within_bound'])} | {a['shadow_bytes'] / 2**20:.1f} MiB | "
                         f"{a['snapshot_bytes'] / 2**20:.1f} MiB | {a['run_bytes'] / 2**20:.1f} MiB | "
                         f"{a['run_in_float32_copies']:.2f} |")
    if results.get("training"):
        labels = ["update_every 1", "update_every 4", "update_every 16", "automatic mode"]
        lines += ["", "| training step | step ms (no EMA) | overhead update_every 1 | 4 | 16 | automatic mode |",
                  "|---|---|---|---|---|---|"]
        for r in results["training"]:
            o = r["overhead_pct"]
            lines.append(f"| {r['model']} | {r['step_ms']:.1f} | " + " | ".join(
                f"{o[k]['median']:+.1f}% [{o[k]['q25']:+.1f}, {o[k]['q75']:+.1f}]" for k in labels) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--calls", type=int, default=3, help="calls of each variant per repetition (its fastest counts)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default="bench_output")
    p.add_argument("--no-training", action="store_true")
    p.add_argument("--several-models", default="resnet50,pp-ocrv4-rec,picodet-xs",
                   help="models with the several-EMAs and automatic-mode rows ('' for none)")
    p.add_argument("--device-models", default="resnet50,pp-ocrv4-rec",
                   help="models for the forced device-path rows ('' for none)")
    args = p.parse_args(argv)
    paddle.set_device(os.environ.get("BENCH_DEVICE", "cpu"))
    several = set(filter(None, args.several_models.split(",")))
    load = _load_average()
    results = {"machine": f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, "
                          f"{paddle.device.get_device()}, paddle {paddle.__version__}, numpy {np.__version__}",
               "method": f"Each model's variants run in one interleaving: {args.reps} repetitions, each running every "
                         f"variant {args.calls} times in turn (order rotated at every turn); a variant's time in a "
                         "repetition is the fastest of its calls there. ms: medians over the repetitions; ratios: "
                         "taken within each repetition, shown as median [interquartile range, 25th-75th percentile] "
                         "over the repetitions; bounds are checked on the median.",
               "reps": args.reps, "calls": args.calls, "update": [], "training": []}
    for name in filter(None, args.models.split(",")):
        print(f"measuring {name} ...", flush=True)
        results["update"].append(bench_model(name, args.reps, args.calls, several=name in several))
    results["device_path"] = []
    for name in filter(None, args.device_models.split(",")):
        print(f"measuring {name} on the device path ...", flush=True)
        results["device_path"].append(bench_device_path(name, args.reps, args.calls))
    if not args.no_training:
        print("measuring training-step overhead ...", flush=True)
        results["training"] = bench_training_step(args.reps)
    results["load_average"] = [load, _load_average()]
    results["method"] += (f" Load average (1 min, other work on the machine included): {load:.1f} at the start, "
                          f"{results['load_average'][1]:.1f} at the end.")
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
