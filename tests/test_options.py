"""Issue 27.4: every option of the EMA: block and of EMACallback either acts or is refused at start-up in one line;
old spellings keep working with one deprecation line."""
import logging
import os

import numpy as np
import paddle
import pytest

from ema_callback import EMACallback
from ema_callback.config.deprecated import forget
from ema_callback.config.schema import EMAConfig, EMAConfigError, layered
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.core.horizon import BatchInfo, snapshot_period, switch_period
from ema_callback.files.state_file import read_state

from conftest import make_net
from fit_helpers import loaders, make_model, weights


@pytest.fixture(autouse=True)
def _every_deprecation_said_again():
    forget()
    yield
    forget()


def one_line_error(block, start):
    with pytest.raises(EMAConfigError) as err:
        EMAConfig.from_block(block)
    text = str(err.value)
    assert text.startswith(start) and "\n" not in text, text
    return text


def deprecations(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("EMA: deprecated: ")]


# ---------------------------------------------------------------- backend, not update_path
@pytest.mark.parametrize("make", [lambda **kw: EMACallback(decay=0.9, **kw),
                                  lambda **kw: ExponentialMovingAverage(paddle.nn.Linear(2, 2), EMAConfig(decay=0.9),
                                                                        **kw)], ids=["EMACallback", "engine"])
def test_update_path_is_the_old_name_of_backend(make, caplog):
    where = "EMACallback" if make(backend="numpy").__class__ is EMACallback else "ExponentialMovingAverage"
    with caplog.at_level(logging.WARNING, logger="ema_callback"):
        assert make(update_path="reference").backend == "reference"
        assert make(update_path="reference").backend == "reference"
    assert deprecations(caplog) == [f"EMA: deprecated: {where}(update_path=...): read as backend='reference' (its "
                                    "new name)"]  # once
    with pytest.raises(EMAConfigError, match=rf"^{where}\(update_path='numpy', backend='paddle'\): one option given "
                                             "twice; update_path is the old name of backend: give backend only$"):
        make(update_path="numpy", backend="paddle")
    with pytest.raises(EMAConfigError, match=rf"^{where}\(backend='torch'\): expected one of auto, numpy, paddle, "
                                             "reference$"):
        make(backend="torch")


# ---------------------------------------------------------------- save_as: raw in Model.fit
def test_save_as_raw_in_model_fit_keeps_the_pdparams_raw_and_writes_the_ema_beside(tmp_path):
    train, evald = loaders()
    model = make_model()
    cb = EMACallback(decay=0.8, schedule="constant", save_as="raw")
    model.fit(train, evald, epochs=2, verbose=0, save_dir=str(tmp_path), callbacks=[cb])
    raw, held = cb.raw_state_dict(), weights(model.network)  # after fit the network holds the EMA weights
    assert cb.ema.applied and any(not np.array_equal(raw[k], held[k]) for k in raw)
    for prefix in ("final", "deploy"):  # ModelCheckpoint's final save and a user's model.save after fit
        if prefix == "deploy":
            model.save(str(tmp_path / prefix))
        pdparams = paddle.load(str(tmp_path / f"{prefix}.pdparams"))
        beside = paddle.load(str(tmp_path / f"{prefix}.ema.pdparams"))
        assert all(np.array_equal(pdparams[k].numpy(), raw[k]) for k in raw), prefix
        assert all(np.array_equal(beside[k].numpy(), held[k]) for k in held), prefix
        state = read_state(str(tmp_path / f"{prefix}.pdema"))
        assert state["config"]["save_as"] == "raw" and state["pdparams_hold"] == "raw"
    after = weights(model.network)  # the save put the EMA weights back
    assert all(np.array_equal(after[k], held[k]) for k in held)
    # an epoch checkpoint (written with the raw weights in the network) also gets its EMA beside it
    epoch = paddle.load(str(tmp_path / "0.ema.pdparams"))
    assert set(epoch) == set(raw)


def test_save_as_raw_resumes_exactly(tmp_path):
    train, evald = loaders()
    guard = paddle.utils.unique_name.guard
    with guard():
        straight = make_model()
        full = EMACallback(decay=0.8, schedule="constant", final_weights="raw")
        straight.fit(train, epochs=2, verbose=0, callbacks=[full])
    with guard():
        first = make_model()
        first.fit(train, epochs=1, verbose=0, save_dir=str(tmp_path),
                  callbacks=[EMACallback(decay=0.8, schedule="constant", save_as="raw")])
    with guard():
        second = make_model(seed=4)
        second.load(str(tmp_path / "final"))  # the raw weights (save_as: raw): the run continues from them
        resumed = EMACallback(decay=0.8, schedule="constant", save_as="raw", final_weights="raw")
        second.fit(train, epochs=1, verbose=0, callbacks=[resumed])
    a, b = weights(straight.network), weights(second.network)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    ea, eb = full.ema.ema_state_dict(straight.network), resumed.ema.ema_state_dict(second.network)
    assert all(np.array_equal(ea[k], eb[k]) for k in ea)


# ---------------------------------------------------------------- include/exclude patterns that match nothing
@pytest.mark.parametrize("key", ["include", "exclude"])
def test_an_include_or_exclude_pattern_that_matches_no_tensor_is_refused(key):
    net = make_net()
    with pytest.raises(EMAConfigError, match=rf"^EMA.{key}: 'head_conv' matches no tensor of the model \(names "
                                             r"like '0.weight'\); fix or remove it$"):
        ExponentialMovingAverage(net, EMAConfig.from_block({"decay": 0.9, key: ["^1[.]", "head_conv"]}))
    ExponentialMovingAverage(net, EMAConfig.from_block({"decay": 0.9, key: ["^1[.]"]}))  # matches the BatchNorm
