"""Model.save over an existing checkpoint set, stopped by SIGKILL right after each of its file operations in turn, in
forked copies of one process (test_kill.py checks every copy).

argv: WORK. WORK/run holds the first set (``final``, written by fit with EMA); WORK/old is a copy of it; for k = 1, 2,
... WORK/kill-<k> starts as a copy of it and a forked child saves the next set there (one more epoch of training
later), killed after its k-th file operation; the first k that is not killed is the complete save (WORK/kill-<k> is
the new set). WORK/kills.json lists the k and whether each was killed.
"""
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import kill_points  # noqa: E402
import paddle  # noqa: E402
from fit_helpers import loaders, make_model  # noqa: E402

from ema_callback import EMACallback  # noqa: E402

work = sys.argv[1]
run, old = os.path.join(work, "run"), os.path.join(work, "old")
train, _ = loaders()
with paddle.utils.unique_name.guard():
    model = make_model()
    callback = EMACallback(decay=0.9, save_dir=run)
    model.fit(train, epochs=1, verbose=0, save_dir=run, callbacks=[callback])
    shutil.copytree(run, old)
    model.fit(train, epochs=1, verbose=0, callbacks=[callback])  # the next set's weights and EMA
kills = []
for k in range(1, 200):
    target = os.path.join(work, f"kill-{k:03d}")
    shutil.copytree(old, target)
    pid = os.fork()
    if pid == 0:
        try:
            kill_points.arm(k)
            model.save(os.path.join(target, "final"))
            kill_points.disarm()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    kills.append({"k": k, "killed": os.WIFSIGNALED(status), "folder": target})
    if not os.WIFSIGNALED(status):
        break
with open(os.path.join(work, "kills.json"), "w") as handle:
    json.dump(kills, handle)
