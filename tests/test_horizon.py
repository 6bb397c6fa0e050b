"""The EMA length in the user's units (decay_batch_size, half-lives) and several EMAs in one pass."""
import json
import logging
import os

import numpy as np
import paddle
import pytest
from conftest import make_net, snapshot
from fit_helpers import Blobs, loaders, make_model

from ema_callback import EMACallback
from ema_callback.config.schema import EMAConfig, EMAConfigError
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.core.horizon import BatchInfo
from ema_callback.core.run_report import describe_length, realized
from ema_callback.files.state_file import read_state


class RawWeights(paddle.callbacks.Callback):
    """The network's (raw) weights after every optimizer step of a fit (accumulate 1: one per batch)."""

    def __init__(self):
        super().__init__()
        self.states = []

    def on_train_batch_end(self, step, logs=None):
        self.states.append({k: v.numpy().copy() for k, v in self.model.network.state_dict().items()})


def run_engine(trajectory, steps=60, backend="auto", batch=None, **kw):
    init, states = trajectory
    model = make_net()
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in init.items()})
    ema = ExponentialMovingAverage(model, EMAConfig.from_kwargs(**kw), backend=backend, batch=batch)
    for state in states[:steps]:
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        ema.step()
    return model, ema


# ---------------------------------------------------------------- the scaling rule and half-lives
def test_decay_batch_size_follows_the_scaling_rule_in_a_real_fit():
    """A run with global batch B and decay_batch_size 4B equals the same run with decay d**0.25 stated directly."""
    results = []
    for kw in ({"decay": 0.99, "decay_batch_size": 32}, {"decay": 0.99 ** 0.25}):
        train, evald = loaders(batch_size=8)
        model = make_model()
        cb = EMACallback(schedule="constant", final_weights="raw", **kw)
        model.fit(train, evald, epochs=2, verbose=0, callbacks=[cb])
        assert cb.ema.batch.global_batch == 8 and cb.ema.num_updates == 24  # measured at the first batch
        results.append(cb.ema.averaged_numpy())
    assert all(np.allclose(results[0][k], results[1][k], rtol=0, atol=1e-6) for k in results[0])
    assert any(not np.array_equal(results[0][k], snapshot(make_net())[k]) for k in results[0])


@pytest.mark.parametrize("update_every", [1, 2])
def test_half_life_images_halves_an_impulse_after_that_many_images(update_every):
    """Weights 1 when the EMA starts, 0 afterwards: after H images (H/B optimizer steps) the EMA is 0.5."""
    layer = paddle.nn.Linear(4, 4)
    for p in layer.parameters():
        p.set_value(np.ones(p.shape, "float32"))
    batch = BatchInfo(per_device=16, world=2, accumulate=1)  # B = 32
    ema = ExponentialMovingAverage(layer, EMAConfig.from_kwargs(half_life_images=3200, schedule="constant",
                                                                update_every=update_every), batch=batch)
    assert ema.decays[0] == pytest.approx(0.5 ** (32 / 3200), rel=1e-15)
    for p in layer.parameters():
        p.set_value(np.zeros(p.shape, "float32"))
    for _ in range(3200 // 32):  # 100 optimizer steps of 32 images
        ema.step()
    values = ema.averaged_numpy()
    assert all(np.allclose(v, 0.5, rtol=0, atol=1e-6) for v in values.values())
    assert ema.num_updates == 100 // update_every


def test_half_life_epochs_uses_the_dataset_size_and_the_start_line_says_it(caplog):
    train, evald = loaders(batch_size=8, n_train=96)
    model = make_model()
    cb = EMACallback(half_life_epochs=2, schedule="constant")
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        model.fit(train, evald, epochs=1, verbose=0, callbacks=[cb])
    assert cb.ema.batch.dataset_size == 96 and cb.ema.decays[0] == pytest.approx(0.5 ** (8 / 192), rel=1e-15)
    line = next(r.getMessage() for r in caplog.records if "global batch" in r.getMessage())
    assert "global batch 8 (8 x 1 rank x 1), half-life 2 epochs x 96 images -> decay 0.97153194" in line
    assert "(half-life 24 steps = 192 images)" in line


def test_start_line_for_a_decay_tuned_for_another_batch():
    layer = paddle.nn.Linear(2, 2)
    ema = ExponentialMovingAverage(layer, EMAConfig.from_kwargs(decay=0.9999, decay_batch_size=256),
                                   batch=BatchInfo(32))
    assert describe_length(ema) == ("global batch 32 (32 x 1 rank x 1), decay 0.9999 tuned for 256 -> "
                                     "0.9999^0.125 = 0.9999875 per optimizer step (half-life 55,449 steps = "
                                     "1,774,368 images); schedule auto -> constant with bias correction: this length "
                                     "holds from the first update")
    assert ema.decays[0] == pytest.approx(0.9999 ** 0.125, rel=1e-15)
    state = ema.state_dict()
    assert state["batch"]["global_batch"] == 32 and state["decays"] == [pytest.approx(0.9999 ** 0.125)]


# ---------------------------------------------------------------- several EMAs in one pass
@pytest.mark.parametrize("backend", ["numpy", "numpy-two-threads", "paddle", "reference"])
def test_each_shadow_equals_a_single_ema_run_with_its_decay(trajectory, backend, monkeypatch):
    from ema_callback.core import storage

    if backend == "numpy-two-threads":  # the worker thread shares the blocks of the weights, as for 1M+ elements
        monkeypatch.setattr(storage, "PARALLEL_MIN", 0)
        backend = "numpy"
    decays = [0.9, 0.99, 0.999]
    _, several = run_engine(trajectory, backend=backend, decays=decays, schedule="threshold")
    assert several.labels == ["ema0.9", "ema0.99", "ema0.999"]
    for j, d in enumerate(decays):
        _, single = run_engine(trajectory, backend=backend, decay=d, schedule="threshold")
        a, b = several.averaged_numpy(j), single.averaged_numpy()
        assert all(np.array_equal(a[k], b[k]) for k in b), (backend, d)  # the same arithmetic: bit for bit
        assert several.decay_products[j] == single.decay_product
    assert several.fingerprint() != run_engine(trajectory, backend=backend, decay=0.9)[1].fingerprint()
    if storage.PARALLEL_MIN == 0:
        assert storage._WORKER is not None  # the second thread did update shadow 1


def test_a_single_decay_list_is_exactly_todays_single_ema(trajectory):
    _, listed = run_engine(trajectory, decays=[0.99])
    _, plain = run_engine(trajectory, decay=0.99)
    assert listed.fingerprint() == plain.fingerprint() and listed.labels == plain.labels == ["ema"]
    assert set(listed.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("backend", ["numpy", "paddle"])
def test_one_pass_gathers_the_weights_once_whatever_the_number_of_emas(trajectory, backend, monkeypatch):
    """Each update gathers (reads) the sources once: counted on the store's one read of the weights."""
    from ema_callback.core import storage

    reads = []
    name = "_pairs" if backend == "numpy" else "_gather"
    cls = storage.NumpyStore if backend == "numpy" else storage.PaddleStore
    original = getattr(cls, name)

    def counted(self, sources):
        reads.append(len(sources))
        return original(self, sources)

    monkeypatch.setattr(cls, name, counted)
    for k in (1, 4):
        reads.clear()
        _, ema = run_engine(trajectory, steps=10, backend=backend, decays=[0.9, 0.99, 0.995, 0.999][:k])
        assert len(reads) == 10 + 1, (k, reads)  # 10 updates + the copy at construction


def test_several_emas_survive_save_and_load_exactly(trajectory, tmp_path):
    _, ema = run_engine(trajectory, steps=30, half_life_images=[100, 1000], batch=BatchInfo(4))
    ema.save(str(tmp_path / "a.pdema"))
    _, again = run_engine(trajectory, steps=1, half_life_images=[100, 1000], batch=BatchInfo(4))
    again.load(str(tmp_path / "a.pdema"))
    assert again.fingerprint() == ema.fingerprint() and again.decay_products == ema.decay_products
    _, other = run_engine(trajectory, steps=1, decay=0.9)
    with pytest.raises(EMAConfigError, match=r"^EMA\.decay: .* holds 2 EMA\(s\) \(ema_hl100img, ema_hl1000img\) "
                                             r"and 0 post-hoc profile\(s\); this run asks for 1 EMA\(s\) \(ema\) and 0 "
                                             r"post-hoc profile\(s\); resume with the same EMAs and "
                                             r"EMA.posthoc.sigma_rels$"):
        other.load(str(tmp_path / "a.pdema"))
    _, profiled = run_engine(trajectory, steps=1, half_life_images=[100, 1000], batch=BatchInfo(4),
                             posthoc={"sigma_rels": [0.05], "snapshot_every": 100, "dir": str(tmp_path)})
    with pytest.raises(EMAConfigError, match=r"holds 2 EMA\(s\) \(ema_hl100img, ema_hl1000img\) and 0 post-hoc "
                                             r"profile\(s\); this run asks for 2 EMA\(s\) \(ema_hl100img, "
                                             r"ema_hl1000img\) and 1 post-hoc profile\(s\) \(phema0.05\)"):
        profiled.load(str(tmp_path / "a.pdema"))


# ---------------------------------------------------------------- evaluation and select: best in Model.fit
def test_fit_logs_every_candidate_and_writes_the_table(tmp_path):
    train, evald = loaders()
    model = make_model()
    cb = EMACallback(decays=[0.9, 0.5], schedule="constant", eval_raw=True, save_dir=str(tmp_path),
                     monitor="acc")
    seen = []

    class Recorder(paddle.callbacks.Callback):
        def on_eval_end(self, logs=None):
            seen.append(dict(logs))

    model.fit(train, evald, epochs=2, verbose=0, callbacks=[cb, Recorder()], save_dir=str(tmp_path))
    logs = seen[-1]
    for name in ("acc_ema0.9", "acc_ema0.5", "acc_raw", "loss_ema0.5", "ema_drift"):
        assert name in logs, (name, logs)
    assert logs["acc"] == logs["acc_ema0.9"]  # select: primary
    table = json.load(open(tmp_path / "ema_candidates.json"))
    assert [r["candidate"] for r in table["candidates"]] == ["ema0.9", "ema0.5", "raw"]
    assert table["metric"] == "acc" and table["recommended"] in ("ema0.9", "ema0.5", "raw")
    assert table["candidates"][2]["final"] == logs["acc_raw"]


def test_select_best_keeps_the_raw_weights_when_they_win_and_says_so(tmp_path, caplog):
    """A horizon far longer than the run: the EMA stays near the initial weights, raw is better; EarlyStopping's
    best model then holds the raw weights. Evaluated in 12 batches of 4: the one rule's paired bootstrap needs at
    least 10 units."""
    train, _ = loaders()
    evald = paddle.io.DataLoader(Blobs(48, 2), batch_size=4, shuffle=False)
    model = make_model()
    cb = EMACallback(decay=0.99999, schedule="constant", eval_raw=True, select="best", monitor="acc")
    early = paddle.callbacks.EarlyStopping(monitor="acc", mode="max", patience=10, save_best_model=True)
    raws = []

    class RawAtEval(paddle.callbacks.Callback):
        def on_eval_begin(self, logs=None):
            raws.append(cb.raw_state_dict())

    with caplog.at_level(logging.INFO, logger="ema_callback"):
        model.fit(train, evald, epochs=3, verbose=0, callbacks=[RawAtEval(), cb, early], save_dir=str(tmp_path))
    picks = [r.getMessage() for r in caplog.records if "select: best ->" in r.getMessage()]
    assert len(picks) == 3 and picks[-1].endswith("(select: best -> raw)")
    best = paddle.load(str(tmp_path / "best_model.pdparams"))
    best_eval = [i for i, h in enumerate(cb.board.history) if h["results"]["raw"]["acc"] == early.best_value][-1]
    assert all(np.array_equal(best[k].numpy(), raws[best_eval][k]) for k in raws[best_eval])
    assert read_state(str(tmp_path / "best_model.pdema"))["pdparams_hold"] == "raw"
    h = cb.board.history[best_eval]["results"]
    assert h["raw"]["acc"] > h["ema"]["acc"]
    # issue 25.8: the table goes to fit's save_dir (as the snapshots do), and the end says what fit ends on and why
    table = json.load(open(tmp_path / "ema_candidates.json"))
    assert table["recommended"] == "raw" and table["select"] == "best"
    assert caplog.records[-1].getMessage() == (
        f"EMA: after fit the network holds ema (the primary EMA: final_weights='ema'), and so will "
        f"{tmp_path / 'final.pdparams'}; the table recommends raw, which is not applied (select: best chooses what a "
        "best-model file saved at an evaluation holds, not the weights fit ends on): EMACallback(final_weights='raw') "
        "ends fit on them")
    final = paddle.load(str(tmp_path / "final.pdparams"))
    ema_weights = cb.ema.ema_state_dict(model.network)
    assert all(np.array_equal(final[k].numpy(), ema_weights[k]) for k in ema_weights)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("block,message", [
    ({"decay": 0.999, "decays": [0.99, 0.999]},
     r"^EMA\.decays: give the EMA length one way .* not both decay and decays$"),
    ({"decay": [0.99, 0.999]}, r"^EMA\.decay: expected a number; several EMAs are EMA\.decays: \[0\.99, 0\.999\]$"),
    ({"decays": []}, r"^EMA\.decays: expected a list of decays in \(0, 1\)"),
    ({"decays": [0.9, 1.0]}, r"^EMA\.decays: every decay must be > 0 and < 1, got 1\.0$"),
    ({"half_life_images": 0}, r"^EMA\.half_life_images: a half-life must be > 0, got 0$"),
    ({"half_life_epochs": [2, -1]}, r"^EMA\.half_life_epochs: a half-life must be > 0, got -1$"),
    ({"half_life_images": 100, "decay_batch_size": 64}, r"^EMA\.decay_batch_size: scales a decay"),
    ({"decays": [0.9, 0.9]}, r"^EMA\.decays: the same value twice"),
    ({"select": "better"}, r"^EMA\.select: expected one of primary, best"),
])
def test_bad_length_keys_are_one_line_errors(block, message):
    with pytest.raises(EMAConfigError, match=message):
        EMAConfig.from_block(block)


def test_unknown_dataset_size_or_batch_names_the_key():
    layer = paddle.nn.Linear(2, 2)
    with pytest.raises(EMAConfigError, match=r"^EMA\.half_life_epochs: the training set's size is unknown .* use "
                                             r"EMA\.half_life_images instead$"):
        ExponentialMovingAverage(layer, EMAConfig.from_kwargs(half_life_epochs=1), batch=BatchInfo(8))
    with pytest.raises(EMAConfigError, match=r"^EMA\.decay_batch_size: needs the run's global batch"):
        ExponentialMovingAverage(layer, EMAConfig.from_kwargs(decay_batch_size=64))


def test_a_later_layer_replaces_the_length_form():
    from ema_callback.config.files import merged_block, parse_override

    block = merged_block({"decay": 0.999, "decay_batch_size": 256}, {"half_life_images": 1000},
                         [parse_override("EMA.eval_all=false")])
    assert block == {"half_life_images": 1000, "eval_all": False}
    cfg = EMAConfig.from_block({"decay": 0.99}).replace(decays=[0.9, 0.99])
    assert cfg.decays == [0.9, 0.99] and "decay" not in cfg.to_block()


def test_half_life_epochs_on_a_stream_of_unknown_length_fails_before_anything_is_written(tmp_path):
    from fit_helpers import Blobs

    class Stream(paddle.io.IterableDataset):
        def __iter__(self):
            blobs = Blobs(32, 1)
            return (blobs[i] for i in range(len(blobs)))

    model = make_model()
    train = paddle.io.DataLoader(Stream(), batch_size=8)
    with pytest.raises(EMAConfigError, match=r"^EMA\.half_life_epochs: the training set's size is unknown here"):
        model.fit(train, epochs=1, verbose=0, save_dir=str(tmp_path / "run"),
                  callbacks=[EMACallback(half_life_epochs=1)])
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == []


# ---------------------------------------------------------------- the length stated is the length realized (19.2)
def bias_corrected_average(states, decay):
    """numpy: update i of n has weight (1-d) d^(n-i) / (1 - d^n); the starting weights none."""
    n = len(states)
    weights = [(1 - decay) * decay ** (n - 1 - i) / (1 - decay ** n) for i in range(n)]
    return {k: sum(w * s[k].astype(np.float64) for w, s in zip(weights, states)) for k in states[0]}


def test_lengths_in_the_users_units_hold_from_the_first_update():
    """Three lengths that the old default (threshold warm-up) ran on nearly the same decays for all 24 steps: each
    is now a constant decay with exact bias correction, equal to the numpy average of the raw trajectory."""
    lengths = {"half_life_images=64": ({"half_life_images": 64}, 0.5 ** (32 / 64)),
               "half_life_epochs=0.5": ({"half_life_epochs": 0.5}, 0.5 ** (32 / 128)),
               "decay 0.99 @ 8": ({"decay": 0.99, "decay_batch_size": 8}, 0.99 ** 4)}
    results, evaluations = {}, {}
    for name, (kw, decay) in lengths.items():
        train, evald = loaders(batch_size=32, n_train=256)
        model = make_model()
        raw = RawWeights()
        cb = EMACallback(final_weights="ema", **kw)
        model.fit(train, evald, epochs=3, verbose=0, callbacks=[cb, raw])
        assert cb.ema.decays[0] == pytest.approx(decay, rel=1e-12) and len(raw.states) == 24
        expected = bias_corrected_average(raw.states, decay)
        got = cb.ema.averaged_numpy()
        assert all(np.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6) for k in expected
                   if not k.endswith("_variance") and not k.endswith("_mean")), name
        assert realized(cb.ema)["weight_on_start"] == 0.0
        results[name] = got
        evaluations[name] = model.evaluate(evald, verbose=0)["acc"]
    names = list(results)
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # three lengths, three different averages
        assert any(not np.allclose(results[names[a]][k], results[names[b]][k], atol=1e-4) for k in results[names[a]])


def test_the_start_line_names_the_schedule_and_when_the_stated_decay_holds(caplog):
    train, evald = loaders(batch_size=8)
    for kw, expected in [({"decay": 0.9999}, "threshold warm-up: 0.9999 from optimizer step 89,991; until then half "
                                            "the weight is on about the last 7% of the steps"),
                         ({"decay": 0.9999, "schedule": "exponential"}, "exponential warm-up: 0.9999 from optimizer "
                                                                       "step 23,026 (within 10% of 1-d)"),
                         ({"half_life_images": 64}, "schedule auto -> constant with bias correction: this length "
                                                    "holds from the first update"),
                         ({"decay": 0.99, "schedule": "constant"}, "constant from the first update, no bias "
                                                                   "correction")]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ema_callback"):
            make_model().fit(train, evald, epochs=1, verbose=0, callbacks=[EMACallback(**kw)])
        line = next(r.getMessage() for r in caplog.records if "global batch" in r.getMessage())
        assert expected in line, line


def test_threshold_note_matches_the_simulated_profile():
    """The '7%' of the start line: under threshold after 89,990 steps, the last 7.4% (1 - 0.5^(1/9): a profile of
    about (u/n)^8) of the steps hold half the weight (numpy, independent of horizon.py)."""
    from ema_callback.core.horizon import half_weight_updates, update_decays, update_weights

    n = 89990
    t = np.arange(n, dtype=np.float64)
    d = np.minimum(0.9999, (1 + t) / (10 + t))
    after = np.concatenate([np.cumsum(np.log(d)[::-1])[::-1][1:], [0.0]])
    w = (1 - d) * np.exp(after)
    m = int(np.nonzero(np.cumsum(w[::-1]) >= 0.5)[0][0]) + 1
    assert 1 - 0.5 ** (1 / 9) - 0.001 < m / n < 1 - 0.5 ** (1 / 9) + 0.001
    ours, start = update_weights(update_decays(EMAConfig(decay=0.9999), 0.9999, n), False)
    assert half_weight_updates(ours) == m and start == pytest.approx(np.prod(d), rel=1e-9)


def test_a_length_longer_than_the_run_is_said_at_the_start_and_at_the_end(tmp_path, caplog):
    """half_life_images 100000 on 512 images: a start warning (the run's length is known in fit) and an end one;
    with an explicit constant schedule (no bias correction) the end says how much weight is still on the start."""
    train, evald = loaders(batch_size=32, n_train=512)
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        make_model().fit(train, evald, epochs=1, verbose=0,
                         callbacks=[EMACallback(half_life_images=100000, switch_every=40)])
    text = caplog.text
    assert "EMA: ema: its horizon is longer than this run (16 steps): by its end half the weight will be on the last " \
           "256 images, the EMA will average the whole run" in text
    assert "EMA.switch_every: 40 optimizer steps is longer than this run (16 steps): no switch will happen" in text
    assert "EMA: ema realized over 16 optimizer steps: half its weight on the last 256 images, 0.0% on the weights " \
           "it started from" in text
    assert "EMA: ema: its horizon is longer than the run (16 steps): half its weight is on the last 256 images, it " \
           "averaged the whole run" in text
    caplog.clear()
    model = make_model()
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        cb = EMACallback(half_life_images=100000, schedule="constant", eval_raw=True, save_dir=str(tmp_path))
        model.fit(train, evald, epochs=1, verbose=0, callbacks=[cb], save_dir=str(tmp_path))
    start = 0.5 ** (512 / 100000)
    assert realized(cb.ema)["weight_on_start"] == pytest.approx(start, rel=1e-9)
    assert f"EMA: ema: at the end of this run (16 steps) {100 * start:.0f}% of its weight will still be on the " \
           "weights it started from" in caplog.text
    assert f"EMA: ema: {100 * start:.0f}% of its weight is still on the weights it started from after 16 optimizer " \
           "steps" in caplog.text
    table = json.load(open(tmp_path / "ema_candidates.json"))
    row = next(r for r in table["candidates"] if r["candidate"] == "ema")
    assert row["weight_on_start"] == pytest.approx(start, rel=1e-9) and row["half_weight_images"] is None
    assert "half weight on last" in caplog.text and "> run" in caplog.text


# ---------------------------------------------------------------- issue 25: too long for the run, judged on what runs
RTDETR_FLAT_KEYS = {"use_ema": True, "ema_decay": 0.9999, "ema_decay_type": "exponential"}  # rtdetr_r50vd.yml's


@pytest.mark.parametrize("block", ["svtr_rec", "ppyoloe_plus_s", "default", "flat", {"decay": 0.9}],
                         ids=["svtr_rec", "ppyoloe_plus_s", "default", "rtdetr_flat_keys", "decay0.9"])
def test_a_warm_up_that_averages_the_last_steps_is_not_too_long_for_a_short_run(block):
    """6 optimizer steps: threshold and exponential warm-ups put half the weight on the last step or two, so no
    'longer than this run' warning, whatever the target decay; the same target held from the first update does
    average the whole run, and says so."""
    from ema_callback.config.files import read_block_file
    from ema_callback.core.horizon import candidates, length_warnings
    from ema_callback.integrations.paddledet import from_ppdet_flat_keys

    block = from_ppdet_flat_keys(RTDETR_FLAT_KEYS) if block == "flat" else \
        read_block_file(block) if isinstance(block, str) else block
    config = EMAConfig.from_block(block)
    batch = BatchInfo(4, total_steps=6)
    assert config.effective_schedule in ("threshold", "exponential")
    assert length_warnings(config, batch, candidates(config, batch)) == []
    held = config.replace(schedule="constant", bias_correction=True)
    warnings = length_warnings(held, batch, candidates(held, batch))
    assert len(warnings) == 1 and warnings[0].startswith("EMA: ema: its horizon is longer than this run (6 steps): by "
                                                         "its end half the weight will be on the last 12 images")


def test_the_start_and_the_end_of_a_short_threshold_run_agree_with_its_realized_line(caplog):
    """decay 0.9, threshold, 6 steps: it used to warn 'half-life 7 optimizer steps is longer than this run' at the
    start and 'it averaged the whole run' at the end while the realized line said half its weight was on the last
    8 images (one step of 8)."""
    train, evald = loaders(batch_size=8, n_train=48)
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        make_model().fit(train, evald, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9)])
    assert "EMA: ema realized over 6 optimizer steps: half its weight on the last 8 images" in caplog.text
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
