"""Long run (make soak): thousands of updates and hundreds of swaps, no memory growth, raw weights untouched."""
import os

import numpy as np
import paddle
import pytest
from conftest import make_net, snapshot

from ema_callback import EMAConfig
from ema_callback.core.engine import ExponentialMovingAverage


def rss_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.soak
def test_soak_thousands_of_updates_and_swaps():
    def run(with_ema, steps=4000, swap_every=10):
        paddle.seed(0)
        model = make_net()
        opt = paddle.optimizer.Momentum(learning_rate=0.01, parameters=model.parameters())
        ema = ExponentialMovingAverage(model, EMAConfig(decay=0.999, update_every=2)) if with_ema else None
        rng = np.random.default_rng(0)
        x = paddle.to_tensor(rng.normal(size=(8, 3, 8, 8)).astype("float32"))
        memory = []
        for step in range(1, steps + 1):
            (model(x) ** 2).mean().backward()  # bounded: the run stays finite
            opt.step()
            opt.clear_grad()
            if ema is not None:
                ema.step()
                if step % swap_every == 0:
                    with ema.swapped(model):
                        model.eval()
                        model(x)
                        model.train()
            if step % 500 == 0:
                memory.append(rss_mib())
        return snapshot(model), memory, ema

    plain, _, _ = run(False)
    raw, memory, ema = run(True)
    assert ema.num_steps == 4000 and ema.num_updates == 2000 and ema.num_skipped == 0
    assert all(plain[k].tobytes() == raw[k].tobytes() for k in plain)  # 400 swaps, no drift of raw weights
    growth = memory[-1] - memory[1]  # after warm-up
    assert growth < 20, memory  # MiB: flat within allocator noise
