"""The engine against an independent numpy reference, and its safety properties."""
import os

import numpy as np
import paddle
import pytest
from conftest import make_net, snapshot, train_steps
from reference import reference_decay, reference_ema

from ema_callback import EMAConfig
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.core.run_report import log_before_eval
from ema_callback.core.schedules import decay_at
from ema_callback.files.checkpoint_io import EMAFileError
from ema_callback.files.state_file import with_digest

BN_STATS = ("1._mean", "1._variance", "4._mean", "4._variance")


def replay(model, states, ema):
    for state in states:
        model.set_state_dict(state)
        ema.step()


def run_engine(trajectory, steps=240, backend="auto", **kwargs):
    init, states = trajectory
    model = make_net()
    model.set_state_dict(init)
    ema = ExponentialMovingAverage(model, EMAConfig.from_kwargs(**kwargs), backend=backend)
    replay(model, states[:steps], ema)
    return model, ema


def roles(ema, role):
    return [e.name for e in ema.entries if e.role == role]


@pytest.mark.parametrize("schedule", ["constant", "threshold", "exponential", "power"])
def test_schedules_match_formulas(schedule):
    args = dict(tau=50.0, inv_gamma=2.0, power=0.75, min_decay=0.05)
    for t in range(0, 3000, 7):
        assert decay_at(t, schedule, 0.999, **args) == pytest.approx(
            reference_decay(schedule, t, 0.999, **args), abs=1e-12)


CASES = [
    dict(schedule="constant", decay=0.97),
    dict(schedule="threshold", decay=0.99),
    dict(schedule="exponential", decay=0.995, tau=30.0),
    dict(schedule="power", decay=0.999, inv_gamma=1.0, power=0.75, min_decay=0.1),
    dict(schedule="constant", decay=0.95, start_step=37),
    dict(schedule="threshold", decay=0.99, update_every=3),
    dict(schedule="power", decay=0.99, update_every=4, start_step=10),
    dict(schedule="constant", decay=0.98, bias_correction=True),
    dict(schedule="threshold", decay=0.995, bias_correction=True, update_every=2, start_step=5),
    dict(schedule="constant", decay=0.97, buffers="copy"),
    dict(schedule="constant", decay=0.97, buffers="skip"),
    dict(schedule="exponential", decay=0.99, tau=20.0, buffers="copy", update_every=5),
    dict(schedule="threshold", decay=0.99, nan_guard=False),
]


@pytest.mark.parametrize("path", ["auto", "paddle", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_average_matches_numpy_reference(trajectory, case, path):
    model, ema = run_engine(trajectory, backend=path, **case)
    init, states = trajectory
    schedule_args = {k: case[k] for k in ("tau", "inv_gamma", "power", "min_decay") if k in case}
    expected = reference_ema(init, states, roles(ema, "average"), roles(ema, "copy"), schedule=case["schedule"],
                             decay=case["decay"], start_step=case.get("start_step", 0),
                             update_every=case.get("update_every", 1),
                             bias_correction=case.get("bias_correction", False), **schedule_args)
    got = ema.averaged_numpy()
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    # buffer policies: the BatchNorm statistics are where they should be
    policy = case.get("buffers", "average")
    for name in BN_STATS:
        assert ema.entries[[e.name for e in ema.entries].index(name)].role == \
            {"average": "average", "copy": "copy", "skip": "follow"}[policy]
    applied = ema.ema_state_dict(model)
    for name in BN_STATS:
        if policy == "skip":
            np.testing.assert_array_equal(applied[name], states[-1][name])
        elif policy == "copy":
            last_update = max(s for s in range(1, 241) if ema.will_update_at(s))
            np.testing.assert_array_equal(applied[name], states[last_update - 1][name])


def test_update_every_keeps_the_horizon(trajectory):
    """d^k every k steps averages over the same number of steps as d every step."""
    _, every1 = run_engine(trajectory, schedule="constant", decay=0.98)
    _, every4 = run_engine(trajectory, schedule="constant", decay=0.98, update_every=4)
    a, b = every1.averaged_numpy(), every4.averaged_numpy()
    init, states = trajectory
    last = states[-1]
    for name in ("0.weight", "8.weight"):
        gap1 = np.abs(a[name] - last[name]).mean()
        gap4 = np.abs(b[name] - last[name]).mean()
        assert 0.5 < gap4 / gap1 < 2.0  # a peer that uses d (not d^k) lags ~k times further behind
    assert every4.num_updates == 60 and every1.num_updates == 240


def test_fast_path_tracks_live_training():
    """The zero-copy views follow the optimizer's in-place updates (no replay through set_state_dict)."""
    model = make_net()
    init = snapshot(model)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9, schedule="constant"))
    assert type(ema.store).__name__ == "NumpyStore"
    opt = paddle.optimizer.Momentum(learning_rate=0.05, parameters=model.parameters())
    rng = np.random.default_rng(1)
    states = []
    for _ in range(30):
        x = paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32"))
        model(x).mean().backward()
        opt.step()
        opt.clear_grad()
        ema.step()
        states.append(snapshot(model))
    expected = reference_ema(init, states, roles(ema, "average"), [], decay=0.9)
    for name, value in expected.items():
        np.testing.assert_allclose(ema.averaged_numpy()[name], value, atol=1e-6)


def test_restore_is_bit_exact(trajectory):
    model, ema = run_engine(trajectory, steps=50, decay=0.9)
    before = snapshot(model)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    flags = {k: v.stop_gradient for k, v in model.state_dict().items()}
    with ema.swapped(model):
        inside = snapshot(model)
        assert any(not np.array_equal(inside[k], before[k]) for k in before)
        np.testing.assert_allclose(inside["0.weight"], ema.averaged_numpy()["0.weight"], atol=0)
    after = snapshot(model)
    for k in before:
        assert after[k].tobytes() == before[k].tobytes(), k
        assert model.state_dict()[k].data_ptr() == ptrs[k]
        assert model.state_dict()[k].stop_gradient == flags[k]


def test_update_never_changes_weights_or_stop_gradient(trajectory):
    init, states = trajectory
    model = make_net()
    model.set_state_dict(init)
    model[8].bias.stop_gradient = True  # a frozen parameter stays frozen; a trainable one stays trainable
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9, exclude=[r"^0\."]))
    for state in states[:20]:
        model.set_state_dict(state)
        before = snapshot(model)
        ema.step()
        after = snapshot(model)
        assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    flags = {k: v.stop_gradient for k, v in model.state_dict().items()}
    assert flags["0.weight"] is False and flags["8.bias"] is True and flags["1._mean"] is True
    with ema.swapped(model):
        pass
    assert {k: v.stop_gradient for k, v in model.state_dict().items()} == flags


@pytest.mark.parametrize("path", ["auto", "paddle", "reference"])
def test_nan_step_is_skipped(trajectory, path, caplog):
    model, ema = run_engine(trajectory, steps=30, backend=path, decay=0.9)
    shadow = ema.state_dict()["shadow"]
    counters = (ema.num_updates, ema.decay_product)
    poisoned = dict(trajectory[1][30])
    poisoned["4.weight"] = poisoned["4.weight"].copy()
    poisoned["4.weight"].flat[3] = np.nan
    model.set_state_dict(poisoned)
    skipped = None if path == "paddle" else False  # the device path decides on the device and returns None
    with caplog.at_level("WARNING", logger="ema_callback"):
        assert ema.step() is skipped
        poisoned["8.bias"] = np.full_like(poisoned["8.bias"], np.inf)
        model.set_state_dict(poisoned)
        assert ema.step() is skipped
        assert ema.num_skipped == 2 and ema.num_skipped == 2
    assert sum("NaN/Inf" in r.message for r in caplog.records) == 1  # logged once, counted always
    assert (ema.num_updates, ema.decay_product) == counters
    after = ema.state_dict()["shadow"]
    assert all(after[k].tobytes() == shadow[k].tobytes() for k in shadow)
    model.set_state_dict(trajectory[1][31])
    assert ema.step() is (None if path == "paddle" else True) and ema.num_updates == counters[0] + 1
    assert np.isfinite(ema.averaged_numpy()["4.weight"]).all()


def test_without_nan_guard_a_nan_step_poisons_only_its_positions(trajectory):
    """nan_guard: false trades the exact skip for one less read of the weights (documented)."""
    model, ema = run_engine(trajectory, steps=30, decay=0.9, nan_guard=False)
    poisoned = dict(trajectory[1][30])
    poisoned["4.weight"] = poisoned["4.weight"].copy()
    poisoned["4.weight"].flat[3] = np.nan
    model.set_state_dict(poisoned)
    assert ema.step() is True and ema.num_skipped == 0
    values = ema.averaged_numpy()["4.weight"]
    assert np.isnan(values.flat[3]) and np.isfinite(np.delete(values.reshape(-1), 3)).all()


def test_shadow_has_no_grad_node(trajectory):
    for path in ("auto", "paddle", "reference"):
        model, ema = run_engine(trajectory, steps=5, backend=path, decay=0.9)
        values = ema.store.tensor_values()
        store = ema.store
        values += [t for group in getattr(store, "tensors_of", []) for t in group] or (
            [store.flat] if isinstance(store.flat, paddle.Tensor) else [])
        assert values and all(v.stop_gradient for v in values)
        # a backward pass through the model never reaches the shadow
        out = model(paddle.randn([2, 3, 8, 8])).sum()
        out.backward()
        assert all(v.grad is None for v in values)
        model.clear_gradients()


def test_state_round_trip_is_bit_exact(trajectory, tmp_path):
    init, states = trajectory
    cfg = EMAConfig(decay=0.99, schedule="threshold", update_every=2, bias_correction=True, buffers="copy")
    model, straight = run_engine(trajectory, **cfg.to_block())

    model = make_net()
    model.set_state_dict(init)
    first = ExponentialMovingAverage(model, cfg)
    replay(model, states[:101], first)
    first.save(str(tmp_path / "half.pdema"))
    fresh_model = make_net(seed=5)
    fresh_model.set_state_dict(states[100])
    second = ExponentialMovingAverage(fresh_model, cfg)
    second.load(str(tmp_path / "half.pdema"))
    replay(fresh_model, states[101:], second)
    a, b = straight.state_dict(), second.state_dict()
    assert ((a["num_steps"], a["num_updates"], a["decay_product"])
            == (b["num_steps"], b["num_updates"], b["decay_product"]))
    for k in a["shadow"]:
        assert a["shadow"][k].tobytes() == b["shadow"][k].tobytes(), k
    for k in a["copies"]:
        assert a["copies"][k].tobytes() == b["copies"][k].tobytes(), k


def test_mismatched_pdema_lists_keys_and_touches_nothing(trajectory, tmp_path):
    model, ema = run_engine(trajectory, steps=10, decay=0.9)
    path = str(tmp_path / "m.pdema")
    ema.save(path)
    state = paddle.load(path, return_numpy=True)
    wrong = dict(state, shadow=dict(state["shadow"]))
    del wrong["shadow"]["0.weight"]
    wrong["shadow"]["head.extra"] = np.zeros(3, np.float32)
    wrong["shadow"]["8.weight"] = np.zeros((2, 2), np.float32)
    paddle.save(with_digest(wrong), path)  # digest renewed: the model check itself refuses it
    before_model, before_ema = snapshot(model), ema.state_dict()
    with pytest.raises(EMAFileError) as err:
        ema.load(path)
    msg = str(err.value)
    assert "\n" not in msg and path in msg
    assert "missing 0.weight" in msg and "unexpected head.extra" in msg and "8.weight [2, 2]!=[8, 3]" in msg
    after = ema.state_dict()
    assert all(after["shadow"][k].tobytes() == before_ema["shadow"][k].tobytes() for k in after["shadow"])
    assert all(snapshot(model)[k].tobytes() == v.tobytes() for k, v in before_model.items())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "directory", "missing", "not-ema"])
def test_bad_pdema_file_names_the_file(trajectory, tmp_path, damage):
    model, ema = run_engine(trajectory, steps=10, decay=0.9)
    path = str(tmp_path / "bad.pdema")
    ema.save(path)
    data = open(path, "rb").read()
    if damage == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(os.urandom(len(data)))
    elif damage == "empty":
        open(path, "wb").close()
    elif damage == "directory":
        os.remove(path)
        os.mkdir(path)
    elif damage == "missing":
        os.remove(path)
    else:
        paddle.save(snapshot(model), path)
    before = ema.state_dict()
    with pytest.raises(EMAFileError) as err:
        ema.load(path)
    assert path in str(err.value) and "\n" not in str(err.value)
    assert ema.state_dict()["num_updates"] == before["num_updates"]


def test_export_is_a_plain_pdparams(trajectory, tmp_path):
    model, ema = run_engine(trajectory, steps=40, decay=0.9, exclude=["^8\\.bias$"])
    path = str(tmp_path / "ema.pdparams")
    ema.export(path, model)
    other = make_net(seed=3)
    other.set_state_dict(paddle.load(path))
    expected = ema.averaged_numpy()
    for k, v in snapshot(other).items():
        want = expected.get(k, snapshot(model)[k])  # excluded: the live value
        np.testing.assert_array_equal(v, want.astype(v.dtype), err_msg=k)
    with ema.swapped(model):
        inside = snapshot(model)
    assert all(np.array_equal(inside[k], v) for k, v in snapshot(other).items())


def test_include_averages_only_matching_tensors(trajectory):
    model, ema = run_engine(trajectory, steps=30, decay=0.9, include=[r"^8\."])
    assert roles(ema, "average") == ["8.weight", "8.bias"]
    applied = ema.ema_state_dict(model)
    np.testing.assert_array_equal(applied["0.weight"], trajectory[1][29]["0.weight"])
    assert not np.array_equal(applied["8.weight"], trajectory[1][29]["8.weight"])


def test_integer_tensors_are_copied_not_averaged():
    model = make_net()
    model.register_buffer("seen", paddle.to_tensor(np.array([3], dtype="int64")))
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.5, schedule="constant"))
    model.seen.set_value(np.array([7], dtype="int64"))
    ema.step()
    assert [e.role for e in ema.entries if e.name == "seen"] == ["copy"]
    assert ema.averaged_numpy()["seen"].tolist() == [7]


def round_to_nearest(values, dtype):
    """numpy's float32 -> float16/bfloat16 round-to-nearest-even, back in float32 (independent of Paddle)."""
    values = np.asarray(values, np.float32)
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_cast_rounds_to_nearest_on_every_paddle(dtype):
    # Paddle 2.6's CPU cast truncates toward zero; the store must round like numpy on 2.6 and 3.x alike
    from ema_callback.paddle_compat import cast_rounded

    values = np.random.default_rng(0).normal(size=20000).astype(np.float32)
    got = cast_rounded(paddle.to_tensor(values), dtype).astype("float32").numpy()
    assert np.array_equal(got, round_to_nearest(values, dtype))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_storage_halves_memory_and_loses_precision(trajectory, dtype):
    _, full = run_engine(trajectory, decay=0.9999, schedule="constant")
    _, half = run_engine(trajectory, decay=0.9999, schedule="constant", storage_dtype=dtype)
    assert half.store.nbytes * 2 == full.store.nbytes
    init, states = trajectory
    ref = reference_ema(init, states, roles(full, "average"), [], decay=0.9999)
    err_full = max(np.abs(full.averaged_numpy()[k] - ref[k]).max() for k in ref)
    err_half = max(np.abs(half.averaged_numpy()[k] - ref[k]).max() for k in ref)
    # the documented loss: increments (1-d)*(w-ema) below half an ulp are rounded away, so the average stalls
    assert err_full <= 2e-6 and err_half > 100 * err_full
    start = round_to_nearest(init["8.weight"], dtype)
    stalled = half.averaged_numpy()["8.weight"] == start  # all but the smallest-magnitude weights
    assert stalled.mean() >= 0.9 and not (full.averaged_numpy()["8.weight"] == init["8.weight"]).any()


@pytest.mark.gpu
def test_device_cpu_keeps_the_shadow_of_gpu_weights_in_host_memory():
    model = make_net()
    model.to("gpu")
    on_host = ExponentialMovingAverage(model, EMAConfig(decay=0.9, device="cpu"))
    beside = ExponentialMovingAverage(model, EMAConfig(decay=0.9))
    assert type(on_host.store).__name__ == "NumpyStore"  # host memory, fed by one device-to-host copy a step
    assert type(beside.store).__name__ == "PaddleStore" and beside.store.flat.place.is_gpu_place()
    train_steps(model, 3)
    on_host.step()
    beside.step()
    for name, value in beside.averaged_numpy().items():
        np.testing.assert_allclose(on_host.averaged_numpy()[name], value, rtol=1e-6, atol=1e-7)


def test_static_graph_is_refused():
    model = make_net()
    paddle.enable_static()
    try:
        with pytest.raises(RuntimeError, match="dynamic-graph"):
            ExponentialMovingAverage(model)
    finally:
        paddle.disable_static()


def test_strided_buffer_swaps_and_restores_bit_exactly():
    """A transposed (non-contiguous) buffer, like PP-OCRv4's positional encoding, goes through the host views."""
    model = make_net()
    base = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 5)).astype("float32"))
    model.register_buffer("pe", base.T)  # a strided view of base's memory
    assert not model.pe.is_contiguous()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.5, schedule="constant"))
    before = model.pe.numpy().copy()
    base.scale_(3.0)  # in place: the strided buffer now holds 3x its values, still strided
    assert not model.pe.is_contiguous()
    raw = model.pe.numpy().copy()
    np.testing.assert_allclose(raw, 3 * before, rtol=1e-6)
    ema.step()  # must read the current values, not a copy taken at construction
    with ema.swapped(model):
        np.testing.assert_allclose(model.pe.numpy(), 0.5 * before + 0.5 * raw, atol=1e-6)
        assert not model.pe.is_contiguous()
    assert model.pe.numpy().tobytes() == raw.tobytes()


def test_silent_failures_are_said_out_loud(trajectory, caplog):
    init, states = trajectory
    model = make_net()
    model.set_state_dict(init)
    never = ExponentialMovingAverage(model, EMAConfig(decay=0.9, start_step=1000))
    frozen = ExponentialMovingAverage(model, EMAConfig(decay=0.9, include=["^8\\.bias$"]))
    with caplog.at_level("INFO", logger="ema_callback"):
        for _ in range(120):  # weights that never change: the EMA averages nothing
            never.step()
            frozen.step()
        log_before_eval(never)
        drift = log_before_eval(frozen)
    text = caplog.text
    assert "before the first EMA update" in text and "start_step 1000" in text
    assert drift == 0.0 and "after 120 updates the EMA equals the raw weights" in text
    assert "relative drift" in text


def test_update_count_past_int32_saves_loads_and_keeps_counting(trajectory, tmp_path):
    model, ema = run_engine(trajectory, steps=3, decay=0.9, schedule="threshold")
    ema.num_steps = ema.num_updates = 2**31 + 5  # a Python int: no int32 wrap
    ema.step()
    path = str(tmp_path / "big.pdema")
    ema.save(path)
    other = ExponentialMovingAverage(model, EMAConfig(decay=0.9, schedule="threshold"))
    other.load(path)
    assert other.num_steps == other.num_updates == 2**31 + 6
    assert other.decay_for_next_update() == 0.9  # threshold's warm-up long over


@pytest.mark.parametrize("schedule", ["constant", "threshold", "exponential", "power"])
def test_schedules_at_their_extremes_stay_in_range(schedule):
    for decay in (1e-12, 0.5, 1 - 1e-12):
        for t in (0, 1, 10**6, 10**15, 2**63):
            d = decay_at(t, schedule, decay, tau=1e-9 if t % 2 else 1e9, inv_gamma=1e-9, power=50.0, min_decay=0.0)
            assert 0.0 <= d <= decay and d == d, (schedule, decay, t, d)


def test_update_path_is_still_accepted_as_the_backends_former_name():
    model = make_net()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9), update_path="reference")
    assert ema.backend == "reference" and type(ema.store).__name__ == "ReferenceStore"
    assert type(ExponentialMovingAverage(model, EMAConfig(decay=0.9), backend="paddle").store).__name__ == "PaddleStore"


def test_the_model_argument_is_checked_not_ignored():
    from ema_callback.errors import EMAError

    model, other = make_net(), make_net(seed=1)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9))
    for call in (ema.apply_to, ema.drift):
        with pytest.raises(EMAError, match="not the model this EMA was built for"):
            call(other)
    with ema.swapped(model):
        pass
    assert not ema.applied
