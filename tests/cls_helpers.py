"""Running PaddleClas's real training through the launcher, on a synthetic image folder, in subprocesses."""
import os
import re
import subprocess
import sys

import numpy as np
from conftest import PADDLECLAS_ROOT, tool_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS_CFG = os.path.join(REPO, "configs", "paddleclas", "tiny_mobilenetv3.yml")
TIMEOUT = 420  # every suite run is bounded
CLASSES = 4


def write_cls_dataset(folder, per_class, seed):
    """``per_class`` 32x32 PNG images of each of 4 classes (a colour and a stripe direction each, with noise)
    and ``list.txt`` of ``relative/path label`` lines (PaddleClas's ImageNetDataset format)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    lines = []
    yy, xx = np.mgrid[0:32, 0:32]
    for label in range(CLASSES):
        for i in range(per_class):
            base = np.zeros((32, 32, 3), dtype=np.float64)
            base[..., label % 3] = 150.0
            stripes = ((xx if label < 2 else yy) // 4) % 2
            img = base + 80.0 * stripes[..., None] + rng.normal(0, 40, size=(32, 32, 3))
            name = f"c{label}_{i:03d}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, name))
            lines.append(f"{name} {label}")
    order = rng.permutation(len(lines))
    with open(os.path.join(folder, "list.txt"), "w") as handle:
        handle.write("".join(lines[i] + "\n" for i in order))
    return folder


def data_overrides(data):
    train, val = os.path.join(data, "train"), os.path.join(data, "val")
    return [f"DataLoader.Train.dataset.image_root={train}/",
            f"DataLoader.Train.dataset.cls_label_path={train}/list.txt",
            f"DataLoader.Eval.dataset.image_root={val}/", f"DataLoader.Eval.dataset.cls_label_path={val}/list.txt"]


def env():
    return dict(os.environ, PYTHONPATH=REPO, PADDLECLAS_ROOT=PADDLECLAS_ROOT, PYTHONUNBUFFERED="1",
                PYTHONDONTWRITEBYTECODE="1", FLAGS_call_stack_level="0")  # nothing written into the checkout


def run(cmd, cwd, timeout=TIMEOUT):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env())
    return done.returncode, done.stdout + done.stderr


def each_o(opts):
    """``-o K=V -o K2=V2``: PaddleClas's tools take one option per ``-o``."""
    return [part for opt in opts for part in ("-o", opt)]


def cls_train(out, data, extra=(), cfg=CLS_CFG, launcher=True):
    opts = [f"Global.output_dir={out}/"] + data_overrides(data) + list(extra)
    if launcher:
        cmd = [sys.executable, "-m", "ema_callback.cli", "cls-train", "-c", cfg, *each_o(opts)]
    else:
        cmd = tool_command(os.path.join(PADDLECLAS_ROOT, "tools", "train.py")) + ["-c", cfg, *each_o(opts)]
    return run(cmd, os.path.dirname(os.path.abspath(out)))  # not the checkout: nothing is written there


def paddleclas_tool(tool, data, opts, workdir, cfg=CLS_CFG):
    """PaddleClas's own ``tools/<tool>`` in ``workdir`` (its log goes to ``workdir/output/``)."""
    cmd = tool_command(os.path.join(PADDLECLAS_ROOT, "tools", tool))
    cmd += ["-c", cfg, *each_o(data_overrides(data) + [f"Global.output_dir={workdir}/output/"] + list(opts))]
    return run(cmd, workdir)


def eval_lines(log):
    """Every ``[Eval][Epoch N][Avg]...`` line of a PaddleClas log as (epoch, {name: value})."""
    rows = []
    for line in log.splitlines():
        m = re.search(r"\[Eval\]\[Epoch (\d+)\]\[Avg\](.*)$", line)
        if m:
            rows.append((int(m.group(1)), {k: float(v) for k, v in re.findall(r"(\w+): ([-\d.e]+)", m.group(2))}))
    return rows
