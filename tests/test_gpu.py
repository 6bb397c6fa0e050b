"""Checks that need a GPU (skipped without one; `bash benchmarks/gpu_check.sh` runs them where one is)."""
import os

import numpy as np
import paddle
import pytest
from conftest import make_net, needs_paddleocr
from ocr_helpers import REC_CFG, assert_eval_reproduces_best, ocr_train
from test_device_path import host_reads_forbidden

from ema_callback import EMAConfig
from ema_callback.core.engine import ExponentialMovingAverage

pytestmark = pytest.mark.gpu


def test_the_gpu_update_reads_nothing_back_and_matches_the_host_path():
    paddle.set_device("gpu")
    model = make_net()
    on_device = ExponentialMovingAverage(model, EMAConfig(decay=0.99))
    on_host = ExponentialMovingAverage(model, EMAConfig(decay=0.99, device="cpu"))
    assert on_device.deferred and on_device.store.flat.place.is_gpu_place() and not on_host.deferred
    opt = paddle.optimizer.Momentum(learning_rate=0.05, parameters=model.parameters())
    rng = np.random.default_rng(0)
    for _ in range(20):
        loss = model(paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32"))).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        with host_reads_forbidden():
            on_device.step()
        on_host.step()
    a, b = on_host.averaged_numpy(), on_device.averaged_numpy()
    assert on_device.num_updates == on_host.num_updates == 20
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def amp_o2_setup():
    """The Conv-BN net on the GPU under AMP O2 (float16 weights, fp32 master weights in AdamW), with a GradScaler."""
    paddle.set_device("gpu")
    model = make_net()
    opt = paddle.optimizer.AdamW(learning_rate=0.01, parameters=model.parameters(), multi_precision=True)
    model, opt = paddle.amp.decorate(models=model, optimizers=opt, level="O2", dtype="float16")
    return model, opt, paddle.amp.GradScaler(init_loss_scaling=1024)


def amp_o2_step(model, opt, scaler, ema, rng):
    """One AMP O2 optimizer step through the GradScaler, then the EMA step with its found_inf flag."""
    with paddle.amp.auto_cast(level="O2"):
        loss = model(paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32"))).mean()
    scaler.scale(loss).backward()
    scaler.minimize(opt, loss)
    opt.clear_grad()
    ema.step(found_inf=opt._get_auxiliary_var("found_inf"))


def test_amp_o2_shadow_is_float32_from_the_master_weights():
    model, opt, scaler = amp_o2_setup()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9, schedule="constant"), optimizer=opt)
    masters = opt._master_weights
    assert masters and ema.store.flat.dtype == paddle.float32
    expected = {e.name: masters[e.tensor.name].numpy().astype(np.float64) for e in ema._averaged
                if e.tensor.name in masters}
    rng = np.random.default_rng(0)
    for _ in range(5):
        amp_o2_step(model, opt, scaler, ema, rng)
        for e in ema._averaged:
            if e.name in expected:
                expected[e.name] = 0.9 * expected[e.name] + 0.1 * masters[e.tensor.name].numpy()
    got = ema.averaged_numpy()
    assert max(float(np.abs(got[k] - expected[k]).max()) for k in expected) <= 1e-5


def test_switch_under_amp_o2_sets_the_master_weights_too():
    """Switch EMA on the device path under AMP O2: after the switch the fp32 master weights equal the EMA weights
    bit for bit and the float16 weights are their rounding (else the next step would overwrite the switch)."""
    model, opt, scaler = amp_o2_setup()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9, schedule="constant", switch_every=3), optimizer=opt)
    assert ema.deferred
    rng = np.random.default_rng(0)
    for _ in range(3):
        amp_o2_step(model, opt, scaler, ema, rng)
    assert ema.features["switch"].count == 1
    averaged, masters = ema.averaged_numpy(), opt._master_weights
    checked = 0
    for e in ema._averaged:
        master = masters.get(e.tensor.name)
        if master is not None:
            assert master.numpy().tobytes() == averaged[e.name].astype(np.float32).tobytes()
            assert e.tensor.numpy().tobytes() == averaged[e.name].astype(np.float16).tobytes()
            checked += 1
    assert checked > 0


@needs_paddleocr
def test_paddleocr_tiny_recognizer_on_the_gpu(tmp_path):
    from ema_callback.demo.text_lines import write_rec_dataset

    data = str(tmp_path / "data")
    write_rec_dataset(os.path.join(data, "rec_train"), 64, seed=1, min_len=1, max_len=3)
    write_rec_dataset(os.path.join(data, "rec_val"), 16, seed=2, min_len=1, max_len=3)
    out = tmp_path / "rec"
    rc, log = ocr_train(REC_CFG, str(out), data, "rec", ["Global.use_gpu=true", "Global.epoch_num=2",
                                                         "Global.eval_batch_step=[0,4]"])
    assert rc == 0, log[-3000:]
    assert_eval_reproduces_best(REC_CFG, data, "rec", out, str(tmp_path), log, ("acc", "norm_edit_dis"))
