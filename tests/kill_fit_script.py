"""A Model.fit run with EMA that writes a checkpoint set every epoch; test_kill.py SIGKILLs it at random."""
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import paddle  # noqa: E402
from fit_helpers import Blobs  # noqa: E402

from ema_callback import EMACallback  # noqa: E402

EPOCHS = 40
POSTHOC = {"sigma_rels": [0.05, 0.10], "snapshot_every": 40, "snapshot_dtype": "float16"}  # 8 of 320 steps


def build():
    """~400k parameters, so that every checkpoint file takes a while to write."""
    with paddle.utils.unique_name.guard():
        paddle.seed(0)
        net = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(192, 2048), paddle.nn.ReLU(),
                                   paddle.nn.Linear(2048, 3))
        model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")],
                             labels=[paddle.static.InputSpec([None, 1], "int64", "y")])
        model.prepare(paddle.optimizer.Momentum(learning_rate=0.01, parameters=net.parameters()),
                      paddle.nn.CrossEntropyLoss())
    return model


def data():
    return paddle.io.DataLoader(Blobs(64, 1), batch_size=8, shuffle=False)


def fit(model, callback, epochs, save_dir=None):
    with paddle.utils.unique_name.guard():
        model.fit(data(), epochs=epochs, verbose=0, save_dir=save_dir, callbacks=[callback])


if __name__ == "__main__":
    fit(build(), EMACallback(decay=0.9, final_weights="raw", posthoc=POSTHOC, save_dir=sys.argv[1]), EPOCHS,
        save_dir=sys.argv[1])
