"""Running PaddleOCR's real training through the launcher, on synthetic data, in subprocesses."""
import os
import re
import subprocess
import sys

from conftest import PADDLEOCR_ROOT, tool_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REC_CFG = os.path.join(REPO, "configs", "paddleocr", "tiny_rec_ctc.yml")
DET_CFG = os.path.join(REPO, "configs", "paddleocr", "tiny_det_db.yml")
DIGITS_DICT = os.path.join(REPO, "configs", "paddleocr", "digits_dict.txt")
TIMEOUT = 420  # every suite run is bounded


def env():
    return dict(os.environ, PYTHONPATH=REPO, PADDLEOCR_ROOT=PADDLEOCR_ROOT, PYTHONUNBUFFERED="1",
                FLAGS_call_stack_level="0")


def data_overrides(data, kind):
    train, val = os.path.join(data, f"{kind}_train"), os.path.join(data, f"{kind}_val")
    opts = [f"Train.dataset.data_dir={train}/", f"Train.dataset.label_file_list=['{train}/labels.txt']",
            f"Eval.dataset.data_dir={val}/", f"Eval.dataset.label_file_list=['{val}/labels.txt']"]
    if kind == "rec":
        opts.append(f"Global.character_dict_path={DIGITS_DICT}")
    return opts


def run(cmd, cwd, timeout=TIMEOUT):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env())
    return done.returncode, done.stdout + done.stderr


def ocr_train(cfg, out, data, kind, extra=(), cwd=None, launcher=True):
    opts = [f"Global.save_model_dir={out}/"] + data_overrides(data, kind) + list(extra)
    if launcher:
        cmd = [sys.executable, "-m", "ema_callback.cli", "ocr-train", "-c", cfg, "-o", *opts]
    else:
        cmd = tool_command(os.path.join(PADDLEOCR_ROOT, "tools", "train.py")) + ["-c", cfg, "-o", *opts]
    return run(cmd, cwd or out.rsplit("/", 1)[0])


def paddleocr_tool(tool, cfg, data, kind, opts, cwd):
    cmd = (tool_command(os.path.join(PADDLEOCR_ROOT, "tools", tool))
           + ["-c", cfg, "-o", *data_overrides(data, kind), *opts])
    return run(cmd, cwd)


def logged_metrics(log, prefix):
    """Every 'cur metric, k: v, ...' (prefix='cur metric') line of a PaddleOCR log as dicts."""
    rows = []
    for line in log.splitlines():
        m = re.search(prefix + r", (.*)$", line)
        if m:
            rows.append({k: float(v) for k, v in re.findall(r"(\w[\w.]*): ([-\d.e]+)", m.group(1))})
    return rows


def assert_eval_reproduces_best(cfg, data, kind, out, cwd, log, keys):
    """PaddleOCR's own tools/eval.py on ``out/best_accuracy`` gives exactly the best metric the training logged."""
    best = logged_metrics(log, "best metric")[-1]
    rc, eval_log = paddleocr_tool("eval.py", cfg, data, kind, [f"Global.checkpoints={out}/best_accuracy"], cwd)
    assert rc == 0, eval_log[-3000:]
    reproduced = {k: float(v) for k, v in re.findall(r"(\w+):([-\d.e]+)", eval_log) if k in keys}
    assert all(reproduced[k] == best[k] for k in keys), (reproduced, best)
