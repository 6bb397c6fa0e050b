"""File faults: a full disk and a read-only folder give a clear error and leave the existing file as it was."""
import os
import subprocess

import numpy as np
import paddle
import pytest
from conftest import make_net

from ema_callback import EMAConfig
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.files.checkpoint_io import EMAFileError


def big_model():
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(256, 512), paddle.nn.Linear(512, 256))  # ~1 MiB of weights


def test_full_disk_keeps_the_previous_file_and_leaves_no_partial(small_disk):
    path = str(small_disk / "state.pdema")
    small = ExponentialMovingAverage(make_net(), EMAConfig(decay=0.9))
    small.save(path)
    before = open(path, "rb").read()
    big = ExponentialMovingAverage(big_model(), EMAConfig(decay=0.9))
    with pytest.raises(EMAFileError) as err:
        big.save(path)
    message = str(err.value)
    assert message.startswith(path) and "No space left on device" in message and "\n" not in message
    assert open(path, "rb").read() == before
    assert os.listdir(small_disk) == ["state.pdema"]  # the temporary file is gone
    ExponentialMovingAverage(make_net(), EMAConfig(decay=0.9)).load(path)  # and the old one still loads


def test_read_only_folder_is_a_clear_error(small_disk):
    path = str(small_disk / "state.pdema")
    ema = ExponentialMovingAverage(make_net(), EMAConfig(decay=0.9))
    ema.save(path)
    before = open(path, "rb").read()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    ema.step()
    with pytest.raises(EMAFileError) as err:
        ema.save(path)
    assert err.value.args[0].startswith(path) and "Read-only file system" in str(err.value)
    assert open(path, "rb").read() == before
    with pytest.raises(EMAFileError, match="does not exist"):
        ema.save(str(small_disk / "missing" / "x.pdema"))


def test_export_into_a_directory_path_is_refused(tmp_path):
    ema = ExponentialMovingAverage(make_net(), EMAConfig(decay=0.9))
    (tmp_path / "ema.pdparams").mkdir()
    with pytest.raises(EMAFileError, match="is a directory"):
        ema.export(str(tmp_path / "ema.pdparams"), make_net())
    assert np.isfinite(ema.averaged_numpy()["0.weight"]).all()
