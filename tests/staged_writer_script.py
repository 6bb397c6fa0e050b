"""A writer that stages a checkpoint set and waits before publishing it (test_checkpoint_set.py runs it in another
PID namespace, so its PID means nothing to the test's process)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ema_callback.files.checkpoint_set import StagedWrite  # noqa: E402

folder, go = sys.argv[1], sys.argv[2]
with StagedWrite(folder) as stage:
    for name in ("x.pdparams", "x.pdopt", "x.pdema"):
        with open(stage.path(name), "wb") as handle:
            handle.write(name.encode() * 100)
    print(os.getpid(), stage.tmp, flush=True)
    deadline = time.time() + 60
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.02)
    stage.publish(last=("x.pdema",))
print("published", flush=True)
