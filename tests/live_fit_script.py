"""A Model.fit run with EMA into a folder, paused after its first step until a file appears (test_resume_paths.py
starts a second run into the same folder meanwhile)."""
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import paddle  # noqa: E402
from fit_helpers import loaders, make_model  # noqa: E402

from ema_callback import EMACallback  # noqa: E402

folder, started, go = sys.argv[1:4]


class Pause(paddle.callbacks.Callback):
    def on_train_batch_end(self, step, logs=None):
        if step == 0:
            open(started, "w").close()
            deadline = time.time() + 120
            while not os.path.exists(go) and time.time() < deadline:
                time.sleep(0.02)


train, _ = loaders()
make_model().fit(train, epochs=1, verbose=0, save_dir=folder, callbacks=[EMACallback(decay=0.9), Pause()])
print("finished", flush=True)
