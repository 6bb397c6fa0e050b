"""Small real Model.fit set-ups shared by the callback tests and the 2-rank script."""
import numpy as np
import paddle
from conftest import make_net


class Blobs(paddle.io.Dataset):
    """A 3-class image set: each class is a noisy colour pattern (learnable in a few dozen steps)."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, 3, size=n).astype("int64")
        centres = np.random.default_rng(123).normal(size=(3, 3, 8, 8)).astype("float32")
        self.x = (centres[self.y] + 1.5 * rng.normal(size=(n, 3, 8, 8))).astype("float32")

    def __getitem__(self, i):
        return self.x[i], self.y[i:i + 1]

    def __len__(self):
        return len(self.y)


def make_model(seed=0, lr=0.05, amp_configs=None, metrics=True):
    with paddle.utils.unique_name.guard():  # same parameter names in every model: optimizer states load
        net = make_net(seed)
    model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "y")])
    opt = paddle.optimizer.Momentum(learning_rate=lr, parameters=net.parameters())
    model.prepare(opt, paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy() if metrics else None,
                  amp_configs=amp_configs)
    return model


def loaders(batch_size=8, n_train=96, n_eval=48):
    train = paddle.io.DataLoader(Blobs(n_train, 1), batch_size=batch_size, shuffle=False)
    evald = paddle.io.DataLoader(Blobs(n_eval, 2), batch_size=16, shuffle=False)
    return train, evald


def weights(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}
