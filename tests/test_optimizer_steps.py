"""Counting real optimizer updates: step(), minimize(), and steps the AMP GradScaler skips."""
import numpy as np
import paddle
import pytest
from conftest import make_net, snapshot

from ema_callback.integrations.optimizer_steps import OptimizerStepCounter


@pytest.mark.parametrize("optimizer", ["Adam", "Momentum", "AdamW"])
def test_found_inf_steps_are_not_updates(optimizer):
    """What GradScaler.minimize/step do under AMP: pass found_inf to the optimizer, whose kernel skips."""
    model = make_net()
    opt = getattr(paddle.optimizer, optimizer)(learning_rate=0.01, parameters=model.parameters())
    counter = OptimizerStepCounter(opt)
    rng = np.random.default_rng(0)
    for i in range(6):
        loss = model(paddle.to_tensor(rng.normal(size=(2, 3, 8, 8)).astype("float32"))).mean()
        loss.backward()
        skip = i in (2, 3)
        before = snapshot(model)
        opt._set_auxiliary_var("found_inf", paddle.to_tensor(skip))
        opt.step() if i % 2 else opt.minimize(loss)
        opt.clear_grad()
        changed = any(not np.array_equal(before[k], v) for k, v in snapshot(model).items() if "_mean" not in k
                      and "_variance" not in k)
        assert changed is not skip  # the kernel really skipped exactly when found_inf was set
    assert (counter.total, counter.skipped, counter.pop(), counter.pop()) == (4, 2, 4, 0)
    counter.close()
    assert "step" not in vars(opt) and "minimize" not in vars(opt)


def test_minimize_calling_step_counts_once():
    model = make_net()
    opt = paddle.optimizer.SGD(learning_rate=0.01, parameters=model.parameters())
    calls = []
    counter = OptimizerStepCounter(opt, on_update=lambda: calls.append(1))
    inner = opt.minimize

    def minimize_via_step(loss):  # a wrapper (e.g. a suite's) whose minimize calls step
        return opt.step()
    opt.minimize = counter._wrap(minimize_via_step)
    loss = model(paddle.randn([2, 3, 8, 8])).mean()
    loss.backward()
    opt.minimize(loss)
    assert counter.total == 1 and calls == [1]
    del inner
