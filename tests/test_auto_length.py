"""length: auto (issue 26): a block or callback that states no length tracks post-hoc profiles beside a default
EMA, picks the length at the end through the run's own evaluation with the one honest rule, and saves the pick."""
import json
import logging
import os

import numpy as np
import paddle
import pytest
from fit_helpers import Blobs, loaders, make_model, weights

from ema_callback import EMACallback, EMAConfig
from ema_callback.errors import EMAConfigError
from ema_callback.files.state_file import read_state
from ema_callback.integrations.auto_length import COARSE, REFINE, half_life_steps

guard = paddle.utils.unique_name.guard


def fit_auto(tmp_path, lr=0.05, epochs=4, eval_data=True, **kwargs):
    train, evald = loaders(n_train=96)
    with guard():
        model = make_model(lr=lr)
        callback = EMACallback(**kwargs)
        model.fit(train, evald if eval_data else None, epochs=epochs, verbose=0, save_dir=str(tmp_path),
                  callbacks=[callback])
    return model, callback


def test_no_length_stated_is_length_auto_and_an_explicit_length_is_not():
    assert EMACallback().config.auto and EMACallback(eval_raw=True).config.auto
    assert EMACallback({"eval_raw": True}).config.auto and EMACallback(length="auto").config.auto
    assert not EMACallback(decay=0.99).config.auto and not EMACallback(half_life_images=100).config.auto
    assert not EMACallback(EMAConfig()).config.auto  # an EMAConfig is taken as it is (decay 0.9999)
    with pytest.raises(EMAConfigError, match=r"give the EMA length one way .* not both decay and length"):
        EMACallback(decay=0.99, length="auto")


def test_the_pick_is_evaluated_through_fit_and_saved_as_the_model(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        model, callback = fit_auto(tmp_path)
    auto = callback.auto
    lines = [r.getMessage() for r in caplog.records]
    steps = 4 * 12
    start = next(line for line in lines if "length auto:" in line and "the default length" in line)
    assert f"half-life {half_life_steps(steps) * 8:,.0f} images ({half_life_steps(steps):,.1f} of the run's 48" in start
    assert "post-hoc profiles sigma_rel 0.05, 0.15 updated every 8 EMA updates, 3 snapshots" in start  # 16, 32, 48
    # the candidates: raw, the default, the coarse grid, at most REFINE more; each evaluated once, with units
    assert len(auto.evaluated) <= 2 + len(COARSE) + REFINE <= 10
    assert all(e.units is not None and e.units[:, 1].sum() == 48 for e in auto.evaluated.values())
    decision = auto.decision
    table = json.load(open(tmp_path / "ema_auto.json"))
    assert table["label"] == decision.label and table["metric"] == "acc" and os.path.exists(tmp_path / "ema_auto.png")
    picked = next(line for line in lines if line.startswith("EMA: length auto picked"))
    assert decision.reason in picked and "over the default" in picked
    # the pick is the model: the network, final.pdparams, and the .pdema says so
    held = "raw" if decision.label == "raw" else decision.label
    final = paddle.load(str(tmp_path / "final.pdparams"), return_numpy=True)
    live = weights(model.network)
    assert all(np.asarray(final[k]).tobytes() == live[k].tobytes() for k in live)
    assert decision.label in ("raw", auto.default), decision  # a rebuilt length: the next test
    expected = callback.ema.averaged_numpy(0) if held != "raw" else callback.raw_state_dict()
    assert expected and all(live[k].tobytes() == np.asarray(expected[k]).astype(live[k].dtype).tobytes()
                            for k in expected)
    state = read_state(str(tmp_path / "final.pdema"))
    assert state.get("pdparams_hold") == held
    # the evaluation reproduces the logged metric of the pick
    assert float(np.ravel(model.evaluate(loaders()[1], verbose=0)["acc"])[0]) == pytest.approx(
        auto.evaluated[decision.label].value)


def test_a_rebuilt_length_picked_is_what_fit_ends_on_and_saves(tmp_path, monkeypatch, caplog):
    """The pick forced to a length rebuilt from the snapshots (sigma_rel 0.2, neither raw nor the default): the
    network after fit, final.pdparams and the .pdema's pdparams_hold are that reconstruction, read back from the
    run's own snapshot folder; the raw weights stay in the .pdema; the end line names the pick."""
    from ema_callback.integrations import auto_length
    from ema_callback.posthoc.snapshots import PostHocEMA

    real = auto_length.decide

    def forced(evaluated, default, *args, **kwargs):
        decision = real(evaluated, default, *args, **kwargs)
        decision.label, decision.value = "sigma0.2", evaluated["sigma0.2"].value
        return decision

    monkeypatch.setattr(auto_length, "decide", forced)
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        model, callback = fit_auto(tmp_path, eval_raw=True)
    expected = PostHocEMA(str(tmp_path / "posthoc")).reconstruct(0.2)
    live = weights(model.network)
    final = paddle.load(str(tmp_path / "final.pdparams"), return_numpy=True)
    assert set(expected) <= set(live) and any(k.endswith("weight") for k in expected)
    for k, v in expected.items():
        assert live[k].tobytes() == np.asarray(v).astype(live[k].dtype).tobytes(), k
        assert np.asarray(final[k]).tobytes() == live[k].tobytes(), k
    state = read_state(str(tmp_path / "final.pdema"))
    assert state["pdparams_hold"] == "sigma0.2"
    raw = callback.raw_state_dict()
    assert any(not np.array_equal(raw[k], live[k]) for k in expected)  # the pick is not the raw weights
    assert any("after fit the network holds sigma0.2 (length auto's pick" in r.getMessage() for r in caplog.records)


def test_a_run_with_no_ema_update_keeps_the_raw_weights_and_saves_them(tmp_path, caplog):
    """start_step beyond the run: no EMA update, so nothing to compare; fit ends on the raw weights, writes
    final.pdparams and says why (it crashed rebuilding a length from a snapshot of time 0)."""
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        model, callback = fit_auto(tmp_path, start_step=1000)
    assert callback.auto.decision.label == "raw" and not callback.auto.evaluated
    final = paddle.load(str(tmp_path / "final.pdparams"), return_numpy=True)
    live = weights(model.network)
    assert all(np.asarray(final[k]).tobytes() == live[k].tobytes() for k in live)
    assert any("length auto: no EMA update happened in this run" in r.getMessage() for r in caplog.records)


def test_a_converged_model_keeps_the_default_and_says_why(tmp_path, caplog):
    """lr 0: the weights never move, so every length is the same weights: the default is kept."""
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        _, callback = fit_auto(tmp_path, lr=0.0)
    decision = callback.auto.decision
    assert decision.label == callback.auto.default and decision.gain == 0.0
    assert decision.reason.startswith("no candidate is better than the default")
    assert any("length auto picked half-life" in r.getMessage() and "(sigma_rel 0.1, the default)" in r.getMessage()
               for r in caplog.records)


def test_without_evaluation_data_the_default_is_kept_in_one_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        model, callback = fit_auto(tmp_path, eval_data=False)
    assert any("fit had no eval_data, so nothing can be compared: the default length" in r.getMessage()
               for r in caplog.records)
    assert callback.ema.applied_label == callback.auto.default


def test_length_auto_on_a_stream_of_unknown_length_fails_before_anything_is_written(tmp_path):
    class Stream(paddle.io.IterableDataset):
        def __iter__(self):
            blobs = Blobs(32, 1)
            return (blobs[i] for i in range(len(blobs)))

    with guard():
        model = make_model()
    with pytest.raises(EMAConfigError, match=r"^EMA\.length: auto needs the number of optimizer steps"):
        model.fit(paddle.io.DataLoader(Stream(), batch_size=8), epochs=1, verbose=0, save_dir=str(tmp_path / "run"),
                  callbacks=[EMACallback()])
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == []


def test_a_resumed_auto_run_sizes_itself_by_the_whole_run_and_continues_exactly(tmp_path):
    """Killed after 2 of 4 epochs and resumed for the other 2: the same default length, the same snapshots and the
    same EMA as the run that was never stopped (what a post-hoc series already does)."""
    from ema_callback.posthoc.snapshots import load_snapshots

    train, evald = loaders(n_train=96)
    with guard():
        straight = make_model()
        full = EMACallback(final_weights="raw", save_dir=str(tmp_path / "straight"))
        straight.fit(train, evald, epochs=4, verbose=0, callbacks=[full])
    class StopAfterTwoEpochs(paddle.callbacks.Callback):  # a run of 4 epochs that stops after 2 (a kill)
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    with guard():
        make_model().fit(train, evald, epochs=4, verbose=0, save_dir=str(tmp_path / "run"),
                         callbacks=[EMACallback(), StopAfterTwoEpochs()])
    with guard():
        again = make_model(seed=4)
        again.load(str(tmp_path / "run" / "1"))
        resumed = EMACallback(final_weights="raw", save_dir=str(tmp_path / "run"))
        again.fit(train, evald, epochs=2, verbose=0, callbacks=[resumed])
    assert resumed.auto.plan.total_steps == full.auto.plan.total_steps == 48
    a, b = full.ema.state_dict(), resumed.ema.state_dict()
    assert a["num_steps"] == b["num_steps"] == 48 and all(a["shadow"][k].tobytes() == b["shadow"][k].tobytes()
                                                          for k in a["shadow"])
    snaps = [load_snapshots(str(tmp_path / f / "posthoc")) for f in ("straight", "run")]
    # the same series, and one more: the stopped run picked its length at its end (step 24) from a snapshot there
    assert [s.step for s in snaps[1]] == sorted([s.step for s in snaps[0]] + [24])
    resumed_series = {s.step: s for s in snaps[1]}
    assert all(x.profile(j).tobytes() == resumed_series[x.step].profile(j).tobytes() for x in snaps[0] for j in (0, 1))
    assert resumed.auto.decision.label == full.auto.decision.label


class _StopAfterEpoch(paddle.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True


def test_a_resumed_run_continues_the_plan_it_started_with(tmp_path, caplog):
    """A run of 4 epochs stopped after 2, resumed with fit(epochs=4) (the full count, not the 2 left): the default
    length, the profiles' gap and the snapshot period stay those of the run's start (its shadows were built with
    them), and one line says what this fit's own count would have given; it changed them silently before."""
    train, evald = loaders(n_train=96)
    with guard():
        first = EMACallback()
        make_model().fit(train, evald, epochs=4, verbose=0, save_dir=str(tmp_path),
                         callbacks=[first, _StopAfterEpoch(1)])
    with guard():
        model = make_model(seed=4)
        model.load(str(tmp_path / "1"))
        again = EMACallback(save_dir=str(tmp_path))
        with caplog.at_level(logging.INFO, logger="ema_callback"):
            model.fit(train, evald, epochs=4, verbose=0, callbacks=[again])
    assert again.ema.num_steps == 24 + 48
    assert again.ema.config.half_life_images == first.ema.config.half_life_images
    keys = ("sigma_rels", "update_every", "snapshot_every")
    assert {k: again.ema.config.posthoc[k] for k in keys} == {k: first.ema.config.posthoc[k] for k in keys}
    assert any("the resumed run's plan continues" in r.getMessage() and "this fit's own count (72 steps)" in
               r.getMessage() for r in caplog.records)


def test_a_posthoc_period_in_epochs_is_whole_ema_updates_under_length_auto(tmp_path):
    """A block's own posthoc: with length auto and update_every 2: a snapshot period of '1 epochs' (25 steps) is
    rounded to whole EMA updates (24), as without length auto, not refused as a period that misses the updates."""
    from ema_callback import BatchInfo
    from ema_callback.integrations.auto_length import resolve

    config = EMAConfig.from_block({"length": "auto", "update_every": 2, "posthoc": {
        "sigma_rels": [0.05, 0.15], "snapshot_every": "1 epochs", "update_every": 8}})
    batch = BatchInfo(8, steps_per_epoch=25, total_steps=2000, dataset_size=200)
    engine_config, plan = resolve(config, batch, str(tmp_path))
    assert engine_config.posthoc["snapshot_every"] == 24 and plan is not None
