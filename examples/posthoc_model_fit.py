"""Post-hoc EMA with ``paddle.Model.fit``: choose the EMA length after training, with your own evaluation.

    python examples/posthoc_model_fit.py

Trains a small Conv-BN classifier with ``EMACallback(posthoc=...)`` (two tracked power-function profiles,
sigma_rel 0.05 and 0.10, a snapshot every 10 optimizer steps into ``output/posthoc_fit/posthoc``), then
reconstructs sigma_rel 0.02..0.25 from the snapshots with ``PostHocEMA`` and evaluates each with
``Model.evaluate``; prints the table and exports the best as ``output/posthoc_fit/best.pdparams``.
"""
import os
import sys

import numpy as np
import paddle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ema_callback import EMACallback  # noqa: E402
from ema_callback.posthoc.snapshots import PostHocEMA  # noqa: E402


class Blobs(paddle.io.Dataset):
    """Three noisy colour patterns, 3x8x8."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, 3, size=n).astype("int64")
        centres = np.random.default_rng(123).normal(size=(3, 3, 8, 8)).astype("float32")
        self.x = (centres[self.y] + 2.0 * rng.normal(size=(n, 3, 8, 8))).astype("float32")

    def __getitem__(self, i):
        return self.x[i], self.y[i:i + 1]

    def __len__(self):
        return len(self.y)


def main():
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
                               paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(8, 3))
    model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.Momentum(learning_rate=0.05, parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    out = os.path.join("output", "posthoc_fit")
    evald = paddle.io.DataLoader(Blobs(96, 2), batch_size=32)
    ema = EMACallback(decay=0.99, save_dir=out, posthoc={"sigma_rels": [0.05, 0.10], "snapshot_every": 10})
    model.fit(paddle.io.DataLoader(Blobs(256, 1), batch_size=16, shuffle=False), evald, epochs=4, verbose=0,
              callbacks=[ema])
    post = PostHocEMA(os.path.join(out, "posthoc"))
    print(post.disk_use())
    rows = post.sweep(model.network, lambda _: float(model.evaluate(evald, verbose=0)["acc"]),
                      [round(0.01 * i, 2) for i in range(2, 26, 2)])
    print("| sigma_rel | val acc |\n|---|---|")
    for row in rows:
        print(f"| {row['sigma_rel']:.2f} | {row['metric']:.4f} |")
    best = max(rows, key=lambda r: r["metric"])
    post.export(best["sigma_rel"], os.path.join(out, "best.pdparams"))
    print(f"best sigma_rel {best['sigma_rel']:.2f} (val acc {best['metric']:.4f}) -> {out}/best.pdparams")


if __name__ == "__main__":
    main()
