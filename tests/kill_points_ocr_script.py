"""ema-callback ocr-train whose first save of ``latest`` and of ``best_accuracy`` over an existing set is stopped by
SIGKILL right after each of its file operations in turn, in forked copies of the process (test_kill.py checks every
copy); the run itself then saves and goes on.

argv: WORK, then ocr-train's arguments. For each prefix: WORK/<prefix>-old is the output folder just before the
save, WORK/<prefix>-<k> a copy of it in which a forked child made the save and was killed after its k-th file
operation; the first k not killed is the complete save. WORK/kills.json lists them.
"""
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import kill_points  # noqa: E402

from ema_callback import cli  # noqa: E402
from ema_callback.integrations import paddleocr  # noqa: E402

work, argv = sys.argv[1], sys.argv[2:]
original = paddleocr.PaddleOCRHooks._save_model
kills, done = [], set()


def save_model(self, model, optimizer, model_path, logger_, config, is_best=False, prefix="ppocr", **kwargs):
    existing = os.path.isfile(os.path.join(model_path, prefix + ".pdema"))
    if prefix in ("latest", "best_accuracy") and prefix not in done and existing:
        done.add(prefix)
        shutil.copytree(model_path, os.path.join(work, f"{prefix}-old"), symlinks=True)
        for k in range(1, 300):
            target = os.path.join(work, f"{prefix}-{k:03d}")
            shutil.copytree(model_path, target, symlinks=True)
            pid = os.fork()
            if pid == 0:
                try:
                    kill_points.arm(k)
                    original(self, model, optimizer, target, logger_, config, is_best=is_best, prefix=prefix,
                             **kwargs)
                    kill_points.disarm()
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            kills.append({"prefix": prefix, "k": k, "killed": os.WIFSIGNALED(status), "folder": target})
            if not os.WIFSIGNALED(status):
                break
        with open(os.path.join(work, "kills.json"), "w") as handle:
            json.dump(kills, handle)
    return original(self, model, optimizer, model_path, logger_, config, is_best=is_best, prefix=prefix, **kwargs)


paddleocr.PaddleOCRHooks._save_model = save_model
sys.exit(cli.main(["ocr-train", *argv]))
