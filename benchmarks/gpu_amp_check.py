"""AMP O2 training of a PaddleOCR recognizer with EMA on one GPU: correctness and overhead.

    python benchmarks/gpu_amp_check.py [--device gpu] [--batch 128] [--steps 30]

Checks, under ``paddle.amp.decorate(level="O2")`` + GradScaler (PaddleOCR's AMP path):
* the shadow is float32 and follows the optimizer's fp32 master weights, not the float16 parameters;
* a step the GradScaler skips (inf loss) is not an EMA update;
and measures the training-step overhead of EMA at update_every 1 (target <= 1% at batch 128).
On ``--device cpu`` it runs without AMP (Paddle's CPU build has no fp16 kernels): a dry run of the code.
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import paddle  # noqa: E402

from ema_callback import EMAConfig  # noqa: E402
from ema_callback.core.engine import ExponentialMovingAverage  # noqa: E402
from ema_callback.integrations.optimizer_steps import OptimizerStepCounter  # noqa: E402


def build(root, batch):
    sys.path.insert(0, root)
    import yaml
    from ppocr.losses import build_loss
    from ppocr.modeling.architectures import build_model

    cfg = yaml.load(open(os.path.join(REPO, "configs", "paddleocr", "tiny_rec_ctc.yml")), Loader=yaml.Loader)
    cfg["Architecture"]["Backbone"].update(scale=1.0, model_name="large")  # a real-size PP-OCR style backbone
    cfg["Architecture"]["Head"]["out_channels"] = 97
    model = build_model(cfg["Architecture"])
    loss_fn = build_loss(cfg["Loss"])
    rng = np.random.default_rng(0)
    data = [paddle.to_tensor(rng.normal(size=(batch, 3, 32, 100)).astype("float32")),
            paddle.to_tensor(rng.integers(1, 96, size=(batch, 25)).astype("int64")),
            paddle.to_tensor(np.full((batch,), 10, "int64"))]
    return model, loss_fn, data


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="gpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--paddleocr-root", default=os.environ.get("PADDLEOCR_ROOT", os.path.join(
        os.path.dirname(REPO), "shared", "third_party", "PaddleOCR-2.10")))
    args = p.parse_args()
    paddle.set_device(args.device)
    amp = args.device.startswith("gpu")
    model, loss_fn, data = build(args.paddleocr_root, args.batch)
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters())
    if amp:
        model, opt = paddle.amp.decorate(models=model, optimizers=opt, level="O2", master_weight=True, dtype="float16")
    scaler = paddle.amp.GradScaler(init_loss_scaling=1024, use_dynamic_loss_scaling=True)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.999, schedule="constant"), optimizer=opt)
    counter = OptimizerStepCounter(opt)

    def step(with_ema, poison=False):
        with paddle.amp.auto_cast(enable=amp, level="O2", dtype="float16"):
            preds = model(data[0])
        loss = loss_fn(preds.astype("float32"), data)["loss"]
        if poison:
            loss = loss * float("inf")
        scaled = scaler.scale(loss)
        scaled.backward()
        scaler.minimize(opt, scaled)  # PaddleOCR's AMP path: minimize, not step
        opt.clear_grad()
        if with_ema:
            for _ in range(counter.pop()):
                ema.step()

    for _ in range(3):
        step(True)
    report = {"param dtype": str(model.parameters()[0].dtype), "shadow store": type(ema.store).__name__,
              "shadow dtype": str(ema.averaged_numpy()[ema._averaged[0].name].dtype)}
    masters = getattr(opt, "_master_weights", None) or {}
    report["master weights"] = len(masters)
    if amp:
        first = ema._averaged[0]
        master = masters[first.tensor.name].numpy()
        report["sources are master weights"] = bool(np.array_equal(ema._sources()[0].numpy(), master))
    before = ema.num_updates
    step(True, poison=True)
    report["inf step skipped by scaler"] = bool(counter.skipped >= 1 and ema.num_updates == before) if amp else "n/a"
    times = {"no EMA": [], "EMA every step": []}
    for _ in range(args.steps):
        for label in times:
            if amp:
                paddle.device.synchronize()
            start = time.perf_counter()
            step(label != "no EMA")
            if amp:
                paddle.device.synchronize()
            times[label].append(time.perf_counter() - start)
    base, with_ema = (float(np.median(times[k])) for k in times)
    report["step ms (no EMA)"] = round(base * 1e3, 2)
    report["EMA overhead at update_every 1"] = f"{(with_ema / base - 1) * 100:+.2f}%"
    for k, v in report.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
