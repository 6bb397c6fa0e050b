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
