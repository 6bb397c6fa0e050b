"""BatchNorm statistics recomputed for the EMA weights (recompute_bn) and Switch EMA (switch_every), on real layers."""
import logging

import numpy as np
import paddle
import pytest
from conftest import make_net
from fit_helpers import loaders, make_model, weights
from reference import batch_statistics_mean

from ema_callback import EMACallback
from ema_callback.config.schema import EMAConfig, EMAConfigError
from ema_callback.core.bn_recompute import batchnorm_layers
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.files.state_file import read_state


def reference_statistics(net, ema_weights, batches):
    """numpy: the mean batch statistics of each BatchNorm input, with the EMA weights in a copy of the network."""
    return batch_statistics_mean(make_net(), ema_weights, batches)


def test_recompute_bn_gives_the_cumulative_batch_statistics_of_the_ema_weights_and_restores_raw_exactly():
    train, evald = loaders()
    model = make_model()
    cb = EMACallback(decay=0.9, schedule="constant", recompute_bn=4, final_weights="raw")
    model.fit(train, evald, epochs=2, verbose=0, callbacks=[cb])
    ema, net = cb.ema, model.network
    batches = list(ema.features["recompute_bn"].recorder.batches)
    assert len(batches) == 4 and ema.features["recompute_bn"].used == 4
    raw_before = weights(net)
    ema_weights = ema.ema_state_dict(net)  # averaged statistics (buffers: average), before recomputation
    expected = reference_statistics(net, ema_weights, batches)
    with ema.swapped(net):
        recomputed = {name: (layer._mean.numpy(), layer._variance.numpy())
                      for name, layer in net.named_sublayers() if layer in batchnorm_layers(net)}
        params = {k: v.numpy() for k, v in net.state_dict().items() if "_mean" not in k and "_variance" not in k}
    assert set(recomputed) == set(expected) == {"1", "4"}
    for name, (mean, var) in recomputed.items():
        np.testing.assert_allclose(mean, expected[name][0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(var, expected[name][1], rtol=1e-5, atol=1e-5)
        assert not np.allclose(mean, ema_weights[f"{name}._mean"], atol=1e-3)  # not the averaged statistics
    assert all(np.array_equal(params[k], ema_weights[k]) for k in params)  # the other weights are the EMA's
    after = weights(net)
    assert all(after[k].tobytes() == raw_before[k].tobytes() for k in after)  # raw weights + statistics, bit for bit


def test_recompute_bn_leaves_training_bit_identical_and_the_saved_state_says_so(tmp_path):
    train, evald = loaders()
    plain = make_model()
    plain.fit(train, evald, epochs=2, verbose=0)
    model = make_model()
    cb = EMACallback(decay=0.9, recompute_bn=3, buffers="skip", final_weights="raw")
    model.fit(train, evald, epochs=2, verbose=0, callbacks=[cb], save_dir=str(tmp_path))
    a, b = weights(plain.network), weights(model.network)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)  # the optimizer and data order are untouched
    model.save(str(tmp_path / "after"))
    assert read_state(str(tmp_path / "after.pdema"))["recompute_bn_batches"] == 3


def test_recompute_bn_without_batchnorm_is_refused():
    layer = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.ReLU(), paddle.nn.Linear(4, 2))
    with pytest.raises(EMAConfigError, match=r"^EMA.recompute_bn: Sequential has no BatchNorm layer, so there are no "
                                             "statistics to recompute; remove recompute_bn$"):
        ExponentialMovingAverage(layer, EMAConfig(recompute_bn=8))


# ---------------------------------------------------------------- Switch EMA
def test_switch_puts_the_ema_weights_in_bit_for_bit_and_keeps_the_optimizer_moments(caplog):
    paddle.seed(0)
    net = make_net()
    opt = paddle.optimizer.Adam(learning_rate=0.01, parameters=net.parameters())
    ema = ExponentialMovingAverage(net, EMAConfig(decay=0.8, schedule="constant", switch_every=5), optimizer=opt)
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        for step in range(1, 11):
            x = paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32"))
            y = paddle.to_tensor(rng.integers(0, 3, size=(4, 1)).astype("int64"))
            paddle.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.clear_grad()
            if step == 5:
                moments = {k: {n: t.numpy().copy() for n, t in acc.items()} for k, acc in opt._accumulators.items()}
                before = weights(net)
            ema.step()
            if step == 5:
                after, averaged = weights(net), ema.averaged_numpy()
                assert all(after[k].tobytes() == averaged[k].tobytes() for k in after)  # fp32, bit for bit
                assert any(not np.array_equal(after[k], before[k]) for k in after)
                moved = {k: {n: t.numpy() for n, t in acc.items()} for k, acc in opt._accumulators.items()}
                assert all(moved[k][n].tobytes() == moments[k][n].tobytes() for k in moments for n in moments[k])
    assert ema.features["switch"].count == 2
    lines = [r.getMessage() for r in caplog.records if "EMA: switch" in r.getMessage()]
    assert lines[0].startswith("EMA: switch 1 at optimizer step 5: the weights take the EMA weights (relative drift "
                               "before ||ema-w||/||w|| = ") and len(lines) == 2


def test_switch_with_gradient_accumulation_and_exact_resume_across_a_switch(tmp_path):
    train, _ = loaders()
    guard = paddle.utils.unique_name.guard
    with guard():
        straight = make_model()
        full = EMACallback(decay=0.9, switch_every=5, final_weights="raw")
        straight.fit(train, epochs=4, verbose=0, callbacks=[full], accumulate_grad_batches=2)
    with guard():
        first = make_model()
        first.fit(train, epochs=2, verbose=0, save_dir=str(tmp_path), accumulate_grad_batches=2,
                  callbacks=[EMACallback(decay=0.9, switch_every=5)])
    with guard():
        second = make_model(seed=4)
        second.load(str(tmp_path / "1"))
        resumed = EMACallback(decay=0.9, switch_every=5, save_dir=str(tmp_path), final_weights="raw")
        second.fit(train, epochs=2, verbose=0, callbacks=[resumed], accumulate_grad_batches=2)
    # 12 batches per epoch, accumulate 2: 6 optimizer updates per epoch, 24 in all; switches at 5, 10, 15, 20
    assert full.ema.num_steps == resumed.ema.num_steps == 24
    assert full.ema.features["switch"].count == resumed.ema.features["switch"].count == 4
    assert read_state(str(tmp_path / "1.pdema"))["num_switches"] == 2
    a, b = weights(straight.network), weights(second.network)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_switch_every_epochs_and_bad_periods():
    train, _ = loaders()
    model = make_model()
    cb = EMACallback(decay=0.9, switch_every_epochs=0.5, final_weights="raw")  # the old spelling of '0.5 epochs'
    model.fit(train, epochs=2, verbose=0, callbacks=[cb])
    assert cb.ema.features["switch"].period == 6 and cb.ema.features["switch"].count == 4  # 12 steps per epoch
    with pytest.raises(EMAConfigError, match=r"^EMA\.switch_every_epochs: give the period one way"):
        EMAConfig.from_block({"switch_every": 5, "switch_every_epochs": 1})
    with pytest.raises(EMAConfigError, match=r"^EMA\.switch_every: expected a whole number of optimizer steps"):
        EMAConfig.from_block({"switch_every": -1})
