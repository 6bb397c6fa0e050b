"""The device (non-numpy) update path, forced on the CPU: no host synchronisation and a bounded allocation
budget per update, and the same numbers as the numpy path."""
import contextlib

import numpy as np
import paddle
import pytest
from conftest import make_net, train_steps

from ema_callback import EMAConfig
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.paddle_compat import CPU_CAST_ROUNDS_TO_NEAREST

HOST_READS = ("item", "numpy", "tolist", "__bool__", "__float__", "__int__", "__index__", "__array__")


@contextlib.contextmanager
def host_reads_forbidden():
    """Every way a tensor reaches the host (``.item()``, ``.numpy()``, ``bool(t)``, ...) raises inside."""
    saved = {name: getattr(paddle.Tensor, name) for name in HOST_READS if hasattr(paddle.Tensor, name)}

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} during EMA.step()")
        return read

    for name in saved:
        setattr(paddle.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(paddle.Tensor, name, method)


def poisoned(model, states, index):
    state = dict(states[index])
    state["4.weight"] = state["4.weight"].copy()
    state["4.weight"].flat[5] = np.nan
    return state


CONFIGS = [
    dict(schedule="threshold", decay=0.99),
    dict(schedule="exponential", decay=0.995, tau=30.0, update_every=3),
    dict(schedule="power", decay=0.999, power=0.75, min_decay=0.1, start_step=5),
    dict(schedule="constant", decay=0.98, bias_correction=True),
    dict(schedule="constant", decay=0.97, buffers="copy"),
    dict(schedule="threshold", decay=0.99, nan_guard=False),
    dict(schedule="power", decays=[0.999, 0.99, 0.9], power=0.75, bias_correction=True),
]


@pytest.mark.parametrize("settings", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_a_device_update_makes_no_host_read_and_matches_the_numpy_path(trajectory, settings):
    init, states = trajectory
    runs = {}
    for backend in ("numpy", "paddle"):
        model = make_net()
        model.set_state_dict(init)
        model.register_buffer("seen", paddle.to_tensor(np.array([0], dtype="int64")))  # a copied integer tensor
        ema = ExponentialMovingAverage(model, EMAConfig.from_kwargs(**settings), backend=backend)
        assert ema.deferred is (backend == "paddle")
        for i in range(40):
            model.set_state_dict(poisoned(model, states, i) if i == 20 and settings.get("nan_guard", True)
                                 else states[i])
            model.seen.set_value(np.array([i], dtype="int64"))
            if backend == "paddle":
                with host_reads_forbidden():
                    ema.step(found_inf=paddle.to_tensor(False))  # an AMP step the GradScaler let through
            else:
                ema.step()
        runs[backend] = ema
    host, device = runs["numpy"], runs["paddle"]
    nan_skips = 1 if settings.get("nan_guard", True) else 0
    assert device.num_skipped == host.num_skipped == nan_skips
    assert device.num_updates == host.num_updates and device.last_decay == pytest.approx(host.last_decay, rel=1e-12)
    assert device.decay_product == pytest.approx(host.decay_product, rel=1e-12)
    a, b = host.averaged_numpy(), device.averaged_numpy()
    assert set(a) == set(b) and a["seen"].tolist() == b["seen"].tolist() and b["seen"] >= 36
    # the device path rounds as one fused lerp (t + d*(s - t)), the numpy path as s + (1-d)*(w - s): 1e-6 relative
    for j in range(host.num_shadows):  # every EMA of several
        a, b = host.averaged_numpy(j), device.averaged_numpy(j)
        worst = max(float((np.abs(a[k] - b[k]) / np.maximum(1.0, np.abs(a[k]))).max()) for k in a)
        assert worst <= 1e-6, (j, worst)
    assert device.decay_products == pytest.approx(host.decay_products, rel=1e-12)


def test_a_skipped_device_update_leaves_the_shadow_bit_identical(trajectory):
    init, states = trajectory
    model = make_net()
    model.set_state_dict(init)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9, schedule="constant", bias_correction=True),
                                   backend="paddle")
    model.set_state_dict(poisoned(model, states, 0))
    with host_reads_forbidden():
        ema.step()  # the first update, poisoned: it must not zero the shadow (bias correction's reset)
    before = ema.state_dict()["shadow"]
    assert ema.num_updates == 0 and ema.num_skipped == 1
    model.set_state_dict(states[1])
    with host_reads_forbidden():
        ema.step(found_inf=paddle.to_tensor(True))  # a step the GradScaler skipped
    after = ema.state_dict()["shadow"]
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    assert (ema.num_updates, ema.num_skipped, ema.num_steps) == (0, 2, 2)
    with host_reads_forbidden():
        ema.step()
    assert ema.num_updates == 1 and ema.decay_product == pytest.approx(0.9)


class AllocationCounter:
    """Counts the Paddle ops an update runs whose output is a new allocation of at least ``numel`` elements."""

    def __init__(self, numel):
        self.numel = numel
        self.allocations = []

    @contextlib.contextmanager
    def counting(self):
        ops = paddle._C_ops
        saved = {name: getattr(ops, name) for name in dir(ops) if not name.startswith("__")
                 and callable(getattr(ops, name))}

        def wrap(name, op):
            def counted(*args, **kwargs):
                inputs = {t.data_ptr() for t in _tensors(args) if t._is_initialized()}
                out = op(*args, **kwargs)
                for t in _tensors(out if isinstance(out, (list, tuple)) else [out]):
                    if t._is_initialized() and int(np.prod(t.shape)) >= self.numel and t.data_ptr() not in inputs:
                        self.allocations.append((name, str(t.dtype)))
                return out
            return counted

        for name, op in saved.items():
            setattr(ops, name, wrap(name, op))
        try:
            yield self
        finally:
            for name, op in saved.items():
                setattr(ops, name, op)


def _tensors(items):
    for item in items:
        if isinstance(item, paddle.Tensor):
            yield item
        elif isinstance(item, (list, tuple)):
            yield from _tensors(item)


@pytest.mark.parametrize("storage,budget", [
    ("float32", {"concat": "paddle.float32", "isfinite": "paddle.bool"}),
    ("float16", {"concat": "paddle.float32", "isfinite": "paddle.bool", "cast": None}),
])
def test_an_update_allocates_within_its_budget(storage, budget):
    """float32 storage: one float32 gather and one bool NaN/Inf mask per update, everything else in place."""
    if storage == "float16" and not CPU_CAST_ROUNDS_TO_NEAREST:
        pytest.skip("Paddle 2.6's CPU cast rounds through numpy (a host copy) for float16 storage")
    model = make_net()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.99, storage_dtype=storage), backend="paddle")
    train_steps(model, 2)
    ema.step()  # warm-up: first-call set-up is not an update's cost
    counter = AllocationCounter(ema.store.numel)
    with counter.counting(), host_reads_forbidden():
        ema.step()
    names = [name for name, _ in counter.allocations]
    assert names.count("concat") == 1 and names.count("isfinite") == 1, counter.allocations
    if storage == "float32":
        assert len(counter.allocations) == 2, counter.allocations  # the gather and the mask, nothing else
    else:  # the float32 view of the shadow and the rounded cast back: two more
        assert len(counter.allocations) == 4 and names.count("cast") == 2, counter.allocations
