"""The files a run writes: modes, loading without running code, each tensor once per set, and resume rules."""
import logging
import os
import pickle
import stat

import numpy as np
import paddle
import pytest
from conftest import RunsCode, make_net, train_steps
from fit_helpers import loaders, make_model, weights

from ema_callback import EMACallback, EMAConfig
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.files.checkpoint_io import EMAFileError, atomic_save, checked_load
from ema_callback.files.state_file import read_state


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_open_would_give_them(tmp_path, umask_022):
    train, _ = loaders()
    model = make_model()
    model.fit(train, epochs=1, verbose=0, save_dir=str(tmp_path), callbacks=[EMACallback(decay=0.9)])
    for name in ("0.pdema", "final.pdema", "final.pdparams"):
        assert mode(tmp_path / name) == 0o644, name
    atomic_save({"a": np.zeros(2)}, str(tmp_path / "x.ema.pdparams"))
    assert mode(tmp_path / "x.ema.pdparams") == 0o644
    os.umask(0o077)
    atomic_save({"a": np.zeros(2)}, str(tmp_path / "private.pdema"))
    assert mode(tmp_path / "private.pdema") == 0o600



def test_a_crafted_pdema_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "0.pdema"
    path.write_bytes(pickle.dumps({"format": "ema-callback/2", "shadow": RunsCode(marker)}))
    with pytest.raises(EMAFileError) as info:
        checked_load(str(path))
    assert str(info.value) == (f"{path}: refused to load: it names the global posix.system, which a file of weights "
                               "never needs (loading it would run code); nothing of it was executed")
    # the auto-resume of EMACallback reads every .pdema in save_dir: the crafted one is skipped, nothing runs
    train, _ = loaders()
    model = make_model()
    model.fit(train, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9, save_dir=str(tmp_path))])
    assert not marker.exists()


def test_every_file_the_runs_write_loads_like_paddle_load(tmp_path):
    train, evald = loaders()
    model = make_model()
    model.fit(train, evald, epochs=2, verbose=0, save_dir=str(tmp_path), callbacks=[EMACallback(decay=0.9)])
    nested = {"t": paddle.to_tensor(np.arange(4, dtype="float32")), "list": [paddle.ones([2], "int64"), 3.5, "s"],
              "np": np.float16(2.5), "bf16": paddle.ones([3], "bfloat16")}
    paddle.save(nested, str(tmp_path / "nested.pdparams"))
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith((".pdparams", ".pdema", ".pdopt")))
    assert {"final.pdparams", "final.pdema", "final.pdopt", "nested.pdparams"} <= set(files)
    for name in files:
        ours, theirs = checked_load(str(tmp_path / name)), paddle.load(str(tmp_path / name), return_numpy=True)
        assert _same(ours, theirs), name


def _same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.asarray(b).dtype == a.dtype and np.asarray(b).tobytes() == a.tobytes()
    return a == b


def test_a_checkpoint_set_holds_each_tensor_once_and_resumes_exactly(tmp_path):
    train, evald = loaders()
    model = make_model()
    cb = EMACallback(decay=0.9)
    model.fit(train, evald, epochs=2, verbose=0, save_dir=str(tmp_path), callbacks=[cb])
    averaged = cb.ema.store.nbytes
    params = os.path.getsize(tmp_path / "final.pdparams")
    # during fit the .pdparams hold raw weights (the .pdema keeps the shadow), after fit EMA weights (the .pdema
    # keeps the raw weights): either way the set grows by one copy of the averaged weights plus counters
    for name in ("1", "final"):
        size = os.path.getsize(tmp_path / f"{name}.pdema")
        assert averaged <= size <= averaged + 16384, (name, size, averaged, params)
    state = read_state(str(tmp_path / "final.pdema"))
    np.testing.assert_array_equal(state["raw_weights"]["0.weight"], cb.raw_state_dict()["0.weight"])
    assert all(state["shadow"][k].tobytes() == v.tobytes() for k, v in cb.ema.state_dict()["shadow"].items())


@pytest.mark.parametrize("settings,stored", [
    (dict(decay=0.9), False),  # the .pdparams hold the shadow bit for bit: referenced
    (dict(decay=0.9, storage_dtype="float16"), False),  # float16 values are exact in float32 .pdparams
    (dict(decay=0.9, bias_correction=True), True),  # .pdparams hold shadow/(1-prod d): the shadow is stored
])
def test_what_can_be_referenced_is_and_the_rest_is_stored(tmp_path, settings, stored):
    model = make_net()
    ema = ExponentialMovingAverage(model, EMAConfig.from_kwargs(schedule="constant", **settings))
    for _ in train_steps(model, 5):
        ema.step()
    held = ema.ema_state_dict(model)  # what a suite's .pdparams hold with save_as: ema
    paddle.save(held, str(tmp_path / "c.pdparams"))
    ema.save(str(tmp_path / "c.pdema"), companions={".pdparams": held})
    raw_file = checked_load(str(tmp_path / "c.pdema"))
    assert bool(raw_file["shadow"]) == stored
    fresh = ExponentialMovingAverage(make_net(seed=3), EMAConfig.from_kwargs(schedule="constant", **settings))
    fresh.load(str(tmp_path / "c.pdema"))
    assert fresh.fingerprint() == ema.fingerprint() and fresh.num_updates == ema.num_updates == 5


def test_a_pdema_whose_pdparams_were_overwritten_is_refused(tmp_path):
    model = make_net()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9))
    held = ema.ema_state_dict(model)
    paddle.save(held, str(tmp_path / "latest.pdparams"))
    ema.save(str(tmp_path / "latest.pdema"), companions={".pdparams": held})
    train_steps(model, 2)
    paddle.save(model.state_dict(), str(tmp_path / "latest.pdparams"))  # a later run without EMA
    before = ema.fingerprint()
    with pytest.raises(EMAFileError) as info:
        ema.load(str(tmp_path / "latest.pdema"))
    assert "latest.pdparams was written after this EMA state" in str(info.value) and "\n" not in str(info.value)
    assert ema.fingerprint() == before


def test_model_fit_resume_with_the_ema_off_trains_on_from_the_raw_weights(tmp_path, caplog):
    """Model.load(final) loads EMA weights (final_weights='ema'); with EMACallback(enable=False) fit continues
    from the raw weights in final.pdema, exactly like a run that keeps the EMA (raw training ignores the EMA)."""
    train, _ = loaders()
    guard = paddle.utils.unique_name.guard
    with guard():
        first = make_model()
        first.fit(train, epochs=1, verbose=0, save_dir=str(tmp_path), callbacks=[EMACallback(decay=0.9)])
    assert not np.array_equal(weights(first.network)["0.weight"],
                              read_state(str(tmp_path / "final.pdema"))["raw_weights"]["0.weight"])
    with guard():
        kept = make_model(seed=4)
        kept.load(str(tmp_path / "final"))
        kept.fit(train, epochs=1, verbose=0,
                 callbacks=[EMACallback(decay=0.9, save_dir=str(tmp_path), final_weights="raw")])
    with guard(), caplog.at_level(logging.INFO, logger="ema_callback"):
        dropped = make_model(seed=5)
        dropped.load(str(tmp_path / "final"))
        dropped.fit(train, epochs=1, verbose=0, callbacks=[EMACallback(enable=False, save_dir=str(tmp_path))])
    a, b = weights(kept.network), weights(dropped.network)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    lines = [r.getMessage() for r in caplog.records]
    assert "EMA: off for this run (EMACallback enable=False)" in lines
    assert any("training continues from the raw weights in" in m and "final.pdema" in m for m in lines), lines


def test_save_as_raw_with_a_selected_candidate_says_what_each_file_holds(tmp_path):
    """Issue 19.10: under save_as: raw the .pdparams hold the raw weights; the .pdema said `pdparams_hold: <winner>`.
    Now it says raw, and .ema.pdparams holds the selected EMA (recorded as ema_pdparams_hold)."""
    import paddle
    from conftest import make_net, train_steps

    from ema_callback.config.schema import EMAConfig
    from ema_callback.core.engine import ExponentialMovingAverage
    from ema_callback.files.checkpoint_io import checked_load
    from ema_callback.files.state_file import read_state
    from ema_callback.integrations.checkpoints import numpy_state, save_ema_state

    net = make_net()
    ema = ExponentialMovingAverage(net, EMAConfig(decays=[0.5, 0.9], schedule="constant"))
    for state in train_steps(make_net(1), 3):
        net.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        ema.step()
    raw = numpy_state(net)
    atomic_save(raw, str(tmp_path / "best.pdparams"))  # the suite's own file (save_as: raw: the raw weights)
    save_ema_state(ema, [str(tmp_path / "best")], net, raw, raw, "raw", candidate="ema0.9")
    state = read_state(str(tmp_path / "best.pdema"))
    assert state["pdparams_hold"] == "raw" and state["ema_pdparams_hold"] == "ema0.9"
    beside = checked_load(str(tmp_path / "best.ema.pdparams"))
    expected = ema.ema_state_dict(net, "ema0.9")
    assert all(np.array_equal(beside[k], expected[k]) for k in expected)
    assert not all(np.array_equal(beside[k], ema.ema_state_dict(net, 0)[k]) for k in expected)


def test_a_pdema_written_before_the_restructure_still_loads(tmp_path):
    """tests/data/stop17.pdema was written by the code of stop 17 (commit 2705a9f; two EMAs, two post-hoc profiles,
    a switch, 10 steps): the restructured engine (features in their own modules) reads it to the same state."""
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    paddle.seed(0)
    with paddle.utils.unique_name.guard():
        net = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.BatchNorm1D(3), paddle.nn.Linear(3, 2))
    ema = ExponentialMovingAverage(net, EMAConfig(decays=[0.9, 0.99], schedule="threshold", switch_every=7,
                                                  posthoc={"sigma_rels": [0.05, 0.1], "snapshot_every": 100,
                                                           "dir": str(tmp_path)}))
    ema.load(os.path.join(data, "stop17.pdema"))
    expected = np.load(os.path.join(data, "stop17_expected.npz"))
    assert (ema.num_steps, ema.num_updates, ema.features["switch"].count) == (10, 10, 1)
    assert ema.features["posthoc"].run_id == "legacy"  # its snapshots (none here) would continue as that run's
    for j in range(ema.num_shadows):
        for name, value in ema.averaged_numpy(j).items():
            assert value.tobytes() == expected[f"{j}:{name}"].tobytes(), (j, name)
    assert ema.fingerprint() == bytes(expected["fingerprint"]).decode()
