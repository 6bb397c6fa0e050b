"""EMACallback with real paddle.Model.fit runs."""
import logging
import os

import numpy as np
import paddle
import pytest
from conftest import make_net
from fit_helpers import loaders, make_model, weights

from ema_callback import EMACallback
from ema_callback.config.schema import EMAConfigError
from ema_callback.files.state_file import read_state


class Recorder(paddle.callbacks.Callback):
    """Records what every on_eval_end sees: logs and the network weights."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_eval_end(self, logs=None):
        self.seen.append((dict(logs), weights(self.model.network)))


def manual_accuracy(state, data):
    model = make_model(seed=9)
    model.network.set_state_dict(state)
    return model.evaluate(data, verbose=0)["acc"]


@pytest.mark.parametrize("accumulate", [1, 3, 5])
def test_step_count_equals_optimizer_updates(accumulate):
    train, evald = loaders()  # 12 batches an epoch
    model = make_model()
    counted = []

    class Count(paddle.callbacks.Callback):
        def on_train_begin(self, logs=None):
            opt = self.model._optimizer
            original = opt._apply_optimize
            def counting(*a, **k):
                counted.append(1)
                return original(*a, **k)
            opt._apply_optimize = counting

    cb = EMACallback(decay=0.9, final_weights="raw")
    model.fit(train, epochs=2, verbose=0, callbacks=[Count(), cb], accumulate_grad_batches=accumulate)
    per_epoch = -(-12 // accumulate)  # every k batches and at the epoch's last batch
    assert cb.ema.num_steps == len(counted) == 2 * per_epoch
    assert cb.ema.num_updates == 2 * per_epoch


def test_eval_metric_comes_from_ema_weights(tmp_path):
    train, evald = loaders()
    model = make_model()
    rec = Recorder()
    cb = EMACallback(decay=0.8, schedule="constant", eval_raw=True, final_weights="raw")
    model.fit(train, evald, epochs=2, verbose=0, callbacks=[cb, rec])
    logs, seen_weights = rec.seen[-1]
    path = str(tmp_path / "ema.pdparams")
    cb.ema.export(path, model.network)
    exported = paddle.load(path)
    assert logs["acc"] == manual_accuracy(exported, evald)
    assert logs["acc_raw"] == manual_accuracy(weights(model.network), evald)
    for k, v in exported.items():
        np.testing.assert_array_equal(seen_weights[k], v.numpy())
    assert "loss_raw" in logs and (logs["acc"] != logs["acc_raw"] or logs["loss"] != logs["loss_raw"])


def test_final_raw_weights_equal_a_run_without_the_callback():
    train, evald = loaders()
    plain = make_model()
    plain.fit(train, evald, epochs=2, verbose=0, accumulate_grad_batches=2)
    with_ema = make_model()
    with_ema.fit(train, evald, epochs=2, verbose=0, accumulate_grad_batches=2,
                 callbacks=[EMACallback(decay=0.9, eval_raw=True, final_weights="raw")])
    a, b = weights(plain.network), weights(with_ema.network)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    disabled = make_model()
    disabled.fit(train, evald, epochs=2, verbose=0, accumulate_grad_batches=2,
                 callbacks=[EMACallback(enable=False, decay=0.9)])
    c = weights(disabled.network)
    assert all(a[k].tobytes() == c[k].tobytes() for k in a)


def test_final_ema_weights_stay_for_save_and_evaluate(tmp_path):
    train, evald = loaders()
    model = make_model()
    cb = EMACallback(decay=0.8)
    model.fit(train, evald, epochs=1, verbose=0, callbacks=[cb])
    ema_weights = cb.ema.ema_state_dict(model.network)
    now = weights(model.network)
    assert all(np.array_equal(now[k], ema_weights[k]) for k in now)
    assert model.evaluate(evald, verbose=0, callbacks=[cb])["acc"] == manual_accuracy(ema_weights, evald)
    model.save(str(tmp_path / "after"))
    saved = paddle.load(str(tmp_path / "after.pdparams"))
    assert all(np.array_equal(saved[k].numpy(), ema_weights[k]) for k in ema_weights)
    state = read_state(str(tmp_path / "after.pdema"))
    raw = cb.raw_state_dict()
    assert all(np.array_equal(state["raw_weights"][k], raw[k]) for k in raw)


@pytest.mark.parametrize("order", ["early_first", "ema_first"])
def test_early_stopping_best_model_holds_the_weights_that_produced_its_metric(tmp_path, order):
    train, evald = loaders()
    model = make_model()
    cb = EMACallback(decay=0.7, schedule="constant")
    early = paddle.callbacks.EarlyStopping(monitor="loss", mode="min", patience=10, save_best_model=True)
    rec = Recorder()
    callbacks = [early, cb, rec] if order == "early_first" else [rec, cb, early]
    model.fit(train, evald, epochs=3, verbose=0, callbacks=callbacks, save_dir=str(tmp_path))
    best = paddle.load(str(tmp_path / "best_model.pdparams"))
    # the evaluation that set EarlyStopping's best value is the one whose weights were saved
    logs, seen = [r for r in rec.seen if r[0]["loss"][0] == early.best_value][-1]
    assert all(np.array_equal(best[k].numpy(), seen[k]) for k in seen)
    assert manual_accuracy(best, evald) == logs["acc"]
    raw_at_end = EMACallback.raw_state_dict(cb)
    assert any(not np.array_equal(best[k].numpy(), raw_at_end[k]) for k in raw_at_end)
    assert os.path.exists(tmp_path / "best_model.pdema")
    # ModelCheckpoint's epoch files, saved before evaluation, hold the raw weights
    epoch1 = paddle.load(str(tmp_path / "1.pdparams"))
    state1 = read_state(str(tmp_path / "1.pdema"))
    assert all(np.array_equal(epoch1[k].numpy(), state1["raw_weights"][k]) for k in state1["raw_weights"])


def test_resume_continues_exactly(tmp_path):
    train, evald = loaders()
    guard = paddle.utils.unique_name.guard  # optimizer accumulators get the same names in every run
    with guard():
        straight = make_model()
        full = EMACallback(decay=0.9, final_weights="raw")
        straight.fit(train, epochs=4, verbose=0, callbacks=[full])
    with guard():
        first = make_model()
        first.fit(train, epochs=2, verbose=0, save_dir=str(tmp_path), callbacks=[EMACallback(decay=0.9)])
    with guard():
        second = make_model(seed=4)
        second.load(str(tmp_path / "1"))
        resumed = EMACallback(decay=0.9, save_dir=str(tmp_path), final_weights="raw")  # resume="auto"
        second.fit(train, epochs=2, verbose=0, callbacks=[resumed])
    assert resumed.ema.num_steps == full.ema.num_steps == 48
    a, b = full.ema.state_dict()["shadow"], resumed.ema.state_dict()["shadow"]
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    ra, rb = weights(straight.network), weights(second.network)
    assert all(ra[k].tobytes() == rb[k].tobytes() for k in ra)
    # from final (EMA weights in final.pdparams), explicit resume puts the raw weights back
    with guard():
        third = make_model(seed=5)
        third.load(str(tmp_path / "final"))
        explicit = EMACallback(decay=0.9, resume=str(tmp_path / "final"), final_weights="raw")
        third.fit(train, epochs=2, verbose=0, callbacks=[explicit])
    c = explicit.ema.state_dict()["shadow"]
    assert all(a[k].tobytes() == c[k].tobytes() for k in a)
    rc = weights(third.network)
    assert all(ra[k].tobytes() == rc[k].tobytes() for k in ra)


def test_eval_start_step_uses_raw_weights_and_says_so_once(caplog):
    train, evald = loaders()
    model = make_model()
    rec = Recorder()
    cb = EMACallback(decay=0.8, eval_start_step=1000, eval_raw=True, final_weights="raw")
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        model.fit(train, evald, epochs=2, verbose=0, callbacks=[cb, rec])
    assert sum("eval_start_step" in r.message for r in caplog.records) == 1
    logs, seen = rec.seen[-1]
    raw = weights(model.network)
    assert all(np.array_equal(seen[k], raw[k]) for k in raw)
    assert logs["acc"] == logs["acc_raw"] == manual_accuracy(raw, evald)


def test_num_iters_eval_freq_and_visualdl_see_both_metric_sets(tmp_path):
    train, evald = loaders()
    model = make_model()
    seen_names = []

    class Names(paddle.callbacks.Callback):
        def on_eval_begin(self, logs=None):
            self.names = logs["metrics"]

        def on_eval_end(self, logs=None):
            seen_names.append(sorted(k for k in self.names if k in logs))

    class Steps(paddle.callbacks.Callback):
        count = 0

        def on_train_batch_end(self, step, logs=None):
            Steps.count += 1

    plain = make_model()
    plain.fit(train, evald, epochs=3, eval_freq=2, num_iters=30, verbose=0, callbacks=[Steps()])
    cb = EMACallback(decay=0.8, eval_raw=True, final_weights="raw")
    model.fit(train, evald, epochs=3, eval_freq=2, num_iters=30, verbose=0, callbacks=[Names(), cb])
    # Model.fit's num_iters also counts evaluation batches; the extra raw evaluation must not
    assert cb.ema.num_steps == Steps.count == 27
    a, b = weights(plain.network), cb.raw_state_dict()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert seen_names == [["acc", "acc_raw", "ema_drift", "loss", "loss_raw"]] * 2


def test_static_graph_model_gets_a_clear_error():
    paddle.enable_static()
    try:
        net = paddle.nn.Linear(4, 2)
        model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 4], "float32", "x")],
                             labels=[paddle.static.InputSpec([None, 1], "int64", "y")])
        model.prepare(paddle.optimizer.SGD(learning_rate=0.1, parameters=net.parameters()),
                      paddle.nn.CrossEntropyLoss())
        data = [(np.ones(4, "float32"), np.array([1], "int64"))] * 4
        with pytest.raises(RuntimeError, match="dynamic-graph mode"):
            model.fit(data, batch_size=2, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9)])
    finally:
        paddle.disable_static()


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(EMAConfigError, match=r"^EMA\.decay: must be < 1"):
        EMACallback(decay=1.0)
    with pytest.raises(EMAConfigError, match=r"^EMA\.decya: unknown key, did you mean 'decay'\?"):
        EMACallback(decya=0.9)
    with pytest.raises(EMAConfigError, match="final_weights"):
        EMACallback(final_weights="best")


def test_visualdl_records_both_metric_sets(tmp_path):
    visualdl = pytest.importorskip("visualdl")
    train, evald = loaders()
    model = make_model()
    log_dir = str(tmp_path / "vdl")
    model.fit(train, evald, epochs=2, verbose=0,
              callbacks=[paddle.callbacks.VisualDL(log_dir), EMACallback(decay=0.8, eval_raw=True)])
    files = [os.path.join(log_dir, f) for f in os.listdir(log_dir)]
    reader = visualdl.LogReader(file_path=files[0])
    tags = reader.get_tags()["scalar"]
    assert {"eval/acc", "eval/acc_raw", "eval/loss", "eval/loss_raw", "eval/ema_drift"} <= set(tags)
    drift = [r.value for r in reader.get_data("scalar", "eval/ema_drift")]
    assert len(drift) == 2 and all(0 < d < 1 for d in drift)
    ema_acc = [r.value for r in reader.get_data("scalar", "eval/acc")]
    raw_acc = [r.value for r in reader.get_data("scalar", "eval/acc_raw")]
    assert len(ema_acc) == len(raw_acc) == 2


def test_a_fit_that_raises_leaves_the_optimizers_methods_as_they_were():
    train, _ = loaders()
    model = make_model()
    opt = model._optimizer

    class Fails(paddle.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            if step == 3:
                assert "step" not in vars(opt) and "minimize" not in vars(opt)  # between batches: unwrapped
                raise RuntimeError("a callback failed")

    cb = EMACallback(decay=0.9)
    with pytest.raises(RuntimeError, match="a callback failed"):
        model.fit(train, epochs=1, verbose=0, callbacks=[cb, Fails()])
    assert "step" not in vars(opt) and "minimize" not in vars(opt)
    assert type(opt).step is getattr(opt.step, "__func__", None) and type(opt).minimize is opt.minimize.__func__
    assert cb.ema.num_steps == 4  # the updates of batches 0-3 were counted before the failure


# ---------------------------------------------------------------- issue 19: start-time errors, the default monitor
def test_posthoc_snapshots_go_beside_fits_save_dir_and_without_a_folder_fit_fails_before_training(tmp_path):
    train, evald = loaders()
    model = make_model()
    cb = EMACallback(decay=0.9, posthoc={"snapshot_every": 4})
    model.fit(train, evald, epochs=1, verbose=0, callbacks=[cb], save_dir=str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "posthoc")) == [f"phema-{s:09d}.safetensors" for s in (4, 8, 12)]
    model = make_model()
    before = weights(model.network)
    with pytest.raises(EMAConfigError) as err:
        model.fit(train, evald, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9, posthoc={"snapshot_every": 4})])
    assert str(err.value) == ("EMA.posthoc.dir: no folder for the snapshots; pass model.fit(save_dir=...) or "
                              "EMACallback(save_dir=...), or set EMA.posthoc.dir")
    after = weights(model.network)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # not one optimizer step was taken


def test_a_monitor_fit_does_not_report_fails_at_the_start():
    train, evald = loaders()
    model = make_model()
    before = weights(model.network)
    with pytest.raises(EMAConfigError, match=r"^EMACallback\(monitor='accuracy'\): not among the metrics fit reports "
                                             r"\(loss, acc\)$"):
        model.fit(train, evald, epochs=1, verbose=0,
                  callbacks=[EMACallback(decay=0.9, eval_raw=True, select="best", monitor="accuracy")])
    assert all(np.array_equal(before[k], v) for k, v in weights(model.network).items())


def test_the_default_monitor_is_the_first_prepared_metric_else_the_mean_loss():
    train, evald = loaders(batch_size=8, n_eval=48)
    model = make_model()
    cb = EMACallback(decay=0.9, eval_raw=True, select="best")
    model.fit(train, evald, epochs=1, verbose=0, callbacks=[cb])
    assert cb.monitor == "acc" and cb.board.key == "acc" and cb.higher_is_better
    # no metric in model.prepare: the mean loss over the evaluation (hapi's own is the last batch's)
    with paddle.utils.unique_name.guard():
        net = make_net(0)
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Momentum(0.05, parameters=net.parameters()), paddle.nn.CrossEntropyLoss())
    cb = EMACallback(decay=0.9, schedule="constant")
    model.fit(train, evald, epochs=1, verbose=0, callbacks=[cb])
    assert cb.monitor == "loss" and not cb.higher_is_better
    net.eval()
    losses, sizes = [], []
    with paddle.no_grad():  # the final EMA weights are in the network: what the last evaluation measured
        for x, y in evald:
            losses.append(float(paddle.nn.functional.cross_entropy(net(x), y)))
            sizes.append(x.shape[0])
    mean = float(np.average(losses, weights=sizes))
    recorded = cb.board.history[-1]["results"]["ema"]["loss"]
    assert recorded == pytest.approx(mean, rel=1e-5)
    assert abs(losses[-1] - mean) > 1e-3  # the last batch's loss is another number


# ---------------------------------------------------------------- issue 25
def test_two_ema_callbacks_in_one_fit_are_refused_before_any_step():
    """The second used to take over the first's hooks: the first stayed silent and later logged 'evaluate() before
    any fit'. Now fit stops at its start, pointing at the list forms, and leaves the model as it was."""
    train, evald = loaders()
    model = make_model()
    before = weights(model.network)
    with pytest.raises(EMAConfigError) as err:
        model.fit(train, evald, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9), EMACallback(decay=0.99)])
    assert str(err.value) == ("EMACallback: two in one Model.fit; one EMACallback keeps several EMAs in one pass and "
                              "compares them: EMACallback(decays=[0.9, 0.99]) or EMACallback(half_life_images=[...])")
    assert all(np.array_equal(before[k], v) for k, v in weights(model.network).items())
    assert "train_batch" not in vars(model)  # the first one's hook is undone
    cb = EMACallback(decays=[0.9, 0.99])
    model.fit(train, evald, epochs=1, verbose=0, callbacks=[cb])  # what it says to do runs both
    assert cb.ema.num_updates == 12 and cb.ema.labels == ["ema0.9", "ema0.99"]
