"""EMA in paddle.Model.fit: the first way in. Runs in a few seconds on a CPU.

    python examples/model_fit_ema.py
"""
import numpy as np
import paddle

from ema_callback import EMACallback


class Blobs(paddle.io.Dataset):
    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, 3, size=n).astype("int64")
        centres = np.random.default_rng(0).normal(size=(3, 16)).astype("float32")
        self.x = (centres[self.y] + rng.normal(size=(n, 16))).astype("float32")

    def __getitem__(self, i):
        return self.x[i], self.y[i:i + 1]

    def __len__(self):
        return len(self.y)


net = paddle.nn.Sequential(paddle.nn.Linear(16, 32), paddle.nn.BatchNorm1D(32), paddle.nn.ReLU(),
                           paddle.nn.Linear(32, 3))
model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 16], "float32", "x")],
                     labels=[paddle.static.InputSpec([None, 1], "int64", "y")])
model.prepare(paddle.optimizer.Adam(learning_rate=0.01, parameters=net.parameters()),
              paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())

ema = EMACallback(decay=0.99, eval_raw=True)  # or EMACallback.from_config("short_run"): a preset, by name
model.fit(Blobs(512, 1), Blobs(256, 2), batch_size=32, epochs=3, verbose=1, save_dir="output/model_fit_ema",
          callbacks=[ema])
# After fit the network holds the EMA weights (final_weights="ema"): evaluate/save/predict use them.
print(model.evaluate(Blobs(256, 2), batch_size=64, verbose=0))
model.save("output/model_fit_ema/exported")  # .pdparams = EMA weights, .pdema = EMA state + raw weights
