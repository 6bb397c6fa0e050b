"""Issue 27.4: every option of the EMA: block and of EMACallback either acts or is refused at start-up in one line;
old spellings keep working with one deprecation line."""
import logging
import os

import numpy as np
import paddle
import pytest
from conftest import make_net
from fit_helpers import loaders, make_model, weights

from ema_callback import EMACallback
from ema_callback.config.deprecated import forget
from ema_callback.config.period import parse_period
from ema_callback.config.schema import EMAConfig, EMAConfigError, layered
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.core.horizon import BatchInfo, snapshot_period, switch_period
from ema_callback.files.state_file import read_state


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


# ---------------------------------------------------------------- bias_correction: false under schedule: auto
def test_explicit_bias_correction_false_under_schedule_auto_is_acted_on():
    stated = EMAConfig.from_block({"half_life_images": 1000, "bias_correction": False})
    assert (stated.effective_schedule, stated.effective_bias_correction) == ("threshold", False)
    unset = EMAConfig.from_block({"half_life_images": 1000})
    assert (unset.effective_schedule, unset.effective_bias_correction) == ("constant", True)
    layer = paddle.nn.Linear(3, 2)
    start = {k: v.numpy().copy() for k, v in layer.state_dict().items()}
    ema = ExponentialMovingAverage(layer, stated, batch=BatchInfo(8))
    for p in layer.parameters():
        p.set_value(p.numpy() + 1.0)
    ema.step()
    averaged = ema.ema_state_dict(layer)
    for k in start:  # threshold warm-up: the first update has d = min(d, 1/10); bias correction would give w
        np.testing.assert_allclose(averaged[k], 0.1 * start[k] + 0.9 * (start[k] + 1.0), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- schedule parameters belong to their schedule
SCHEDULE_PARAMETERS = [
    ({"tau": 500}, "EMA.tau: a parameter of schedule: exponential, which this block does not use (schedule: auto)"),
    ({"schedule": "power", "tau": 5}, "EMA.tau: a parameter of schedule: exponential"),
    ({"schedule": "exponential", "power": 0.75}, "EMA.power: a parameter of schedule: power, which this block does "
                                                 "not use (schedule: exponential); set schedule: power or remove"),
    ({"schedule": "threshold", "min_decay": 0.5}, "EMA.min_decay: a parameter of schedule: power"),
    ({"schedule": "constant", "inv_gamma": 2}, "EMA.inv_gamma: a parameter of schedule: power"),
    ({"half_life_images": 100, "inv_gamma": 2}, "EMA.inv_gamma: a parameter of schedule: power"),
]


@pytest.mark.parametrize("block,message", SCHEDULE_PARAMETERS, ids=[str(b) for b, _ in SCHEDULE_PARAMETERS])
def test_a_schedule_parameter_without_its_schedule_is_refused(block, message):
    one_line_error(block, message)


def test_schedule_parameters_with_their_schedule_and_across_layers():
    cfg = EMAConfig.from_block({"schedule": "power", "inv_gamma": 2, "power": 0.75, "min_decay": 0.1})
    assert (cfg.inv_gamma, cfg.power, cfg.min_decay) == (2.0, 0.75, 0.1)
    assert EMAConfig.from_block({"schedule": "exponential", "tau": 500}).tau == 500.0
    assert "tau" not in EMAConfig().to_block() and EMAConfig.from_block(cfg.to_block()) == cfg
    # a higher layer's schedule brings its own parameters: the lower layer's tau goes with its schedule
    lower = {"decay": 0.99, "schedule": "exponential", "tau": 500}
    merged = EMAConfig.from_block(layered(lower, {"schedule": "power"}))
    assert merged.schedule == "power" and merged.tau == 2000.0
    assert EMAConfig.from_block(dict(cfg.to_block(), decay=0.99)).replace(schedule="constant").to_block().keys() \
        .isdisjoint({"inv_gamma", "power", "min_decay"})
    # checkpoints written before: every key was saved, tau under schedule auto too
    old = dict(EMAConfig().to_block(), tau=2000.0, inv_gamma=1.0, power=2 / 3, min_decay=0.0, bias_correction=False,
               switch_every=0, switch_every_epochs=0.0)
    assert EMAConfig.from_saved(old).schedule == "auto"
    assert EMAConfig.from_saved(dict(old, select="best", eval_all=False)).select == "primary"


def test_ready_blocks_and_shipped_configs_still_load():
    """Every EMA: section the repository ships (ready blocks, the tiny suite configs) passes the new checks."""
    import glob

    from ema_callback.config.files import read_yaml, resolve_block

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(repo, "configs", "**", "*.yml"), recursive=True)) + \
        sorted(glob.glob(os.path.join(repo, "tests", "*.yml")))
    loaded = [p for p in paths if isinstance(read_yaml(p), dict) and "EMA" in read_yaml(p)]
    assert len(loaded) >= 10
    for path in loaded:
        assert resolve_block(read_yaml(path)).enable


# ---------------------------------------------------------------- one period type for "steps or epochs"
@pytest.mark.parametrize("value,canonical", [(500, 500), ("500", 500), ("500 steps", 500), ({"steps": 500}, 500),
                                             (2.0, 2), ("0.5 epochs", "0.5 epochs"), ("1 epoch", "1 epochs"),
                                             ({"epochs": 0.5}, "0.5 epochs"), ({"epochs": "2"}, "2 epochs"),
                                             (0, None), (None, None)])
def test_a_period_in_steps_or_epochs(value, canonical):
    assert parse_period(value, "EMA.switch_every") == canonical
    assert EMAConfig.from_block({"switch_every": value}).switch_every == canonical
    if canonical is not None:
        posthoc = EMAConfig.from_block({"posthoc": {"snapshot_every": value}}).posthoc
        assert posthoc["snapshot_every"] == canonical
        steps = 6 if canonical == "0.5 epochs" else 24 if canonical == "2 epochs" else 12 \
            if canonical == "1 epochs" else canonical
        assert switch_period(EMAConfig(switch_every=canonical), BatchInfo(8, steps_per_epoch=12)) == steps
        assert snapshot_period(posthoc, BatchInfo(8, steps_per_epoch=12)) == steps


@pytest.mark.parametrize("value", [-1, 2.5, "soon", "3 weeks", {"weeks": 1}, {"steps": 1, "epochs": 1}, True,
                                   float("inf")])
def test_a_bad_period_is_refused_naming_the_key(value):
    one_line_error({"switch_every": value}, "EMA.switch_every: ")
    one_line_error({"posthoc": {"snapshot_every": value}}, "EMA.posthoc.snapshot_every: ")


def test_zero_or_no_period_means_not_given_everywhere():
    assert EMAConfig.from_block({"switch_every": 0}).switch_every is None  # Switch EMA off
    assert switch_period(EMAConfig.from_block({})) == 0
    for posthoc in ({"snapshot_every": 0}, {}, {"snapshot_every": None}):  # post-hoc EMA asks for its period
        one_line_error({"posthoc": posthoc}, "EMA.posthoc.snapshot_every: give how often snapshots are taken: a "
                                             "number of optimizer steps (2000) or of epochs ('1 epochs')")
    with pytest.raises(EMAConfigError, match=r"^EMA.switch_every: 0.5 epochs needs the number of optimizer steps "
                                             "per epoch, which is unknown here"):
        switch_period(EMAConfig.from_block({"switch_every": "0.5 epochs"}), BatchInfo(8))


def test_the_old_epoch_keys_still_work_with_one_deprecation_line(caplog):
    with caplog.at_level(logging.WARNING, logger="ema_callback"):
        for _ in range(2):
            assert EMAConfig.from_block({"switch_every_epochs": 0.5}).switch_every == "0.5 epochs"
            assert EMAConfig.from_block({"posthoc": {"snapshot_every_epochs": 2}}).posthoc["snapshot_every"] == \
                "2 epochs"
        assert EMAConfig.from_block({"switch_every_epochs": 0, "posthoc": {"snapshot_every": 5,
                                                                           "snapshot_every_epochs": 0.0}}) \
            .switch_every is None  # an old 0 meant "not given", as 0 does
    assert deprecations(caplog) == [
        "EMA: deprecated: EMA.switch_every_epochs: read as EMA.switch_every: '0.5 epochs' (one key takes optimizer "
        "steps or epochs)",
        "EMA: deprecated: EMA.posthoc.snapshot_every_epochs: read as EMA.posthoc.snapshot_every: '2 epochs' (one key "
        "takes optimizer steps or epochs)"]
    one_line_error({"switch_every": 5, "switch_every_epochs": 1}, "EMA.switch_every_epochs: give the period one way, "
                                                                  "not both switch_every and switch_every_epochs")
    one_line_error({"posthoc": {"snapshot_every": 5, "snapshot_every_epochs": 1}},
                   "EMA.posthoc.snapshot_every_epochs: give the period one way")


def test_switch_every_in_epochs_in_a_real_fit():
    train, _ = loaders()  # 12 batches an epoch
    model = make_model()
    cb = EMACallback(decay=0.9, switch_every="0.5 epochs", final_weights="raw")
    model.fit(train, epochs=2, verbose=0, callbacks=[cb])
    assert cb.ema.features["switch"].period == 6 and cb.ema.features["switch"].count == 4


# ---------------------------------------------------------------- keys that act on several candidates need them
def test_select_best_with_one_candidate_is_refused():
    one_line_error({"decay": 0.99, "select": "best"}, "EMA.select: best chooses among several candidates and this "
                                                     "block has one")
    one_line_error({"select": "best"}, "EMA.select: best chooses among several candidates")
    assert EMAConfig.from_block({"decays": [0.9, 0.99], "select": "best"}).select == "best"
    assert EMAConfig.from_block({"decay": 0.99, "eval_raw": True, "select": "best"}).select == "best"
    assert EMAConfig.from_block({"half_life_images": [100, 200], "select": "best"}).select == "best"


def test_eval_all_false_with_one_ema_is_refused():
    one_line_error({"decay": 0.99, "eval_all": False}, "EMA.eval_all: false leaves out the other EMAs of a list, and "
                                                      "this block has one EMA")
    assert EMAConfig.from_block({"decays": [0.9, 0.99], "eval_all": False}).eval_all is False


# ---------------------------------------------------------------- a period between EMA updates
@pytest.mark.parametrize("block,key", [({"switch_every": 5}, "EMA.switch_every"),
                                       ({"posthoc": {"snapshot_every": 5, "dir": "unused"}},
                                        "EMA.posthoc.snapshot_every")])
def test_a_period_that_misses_the_ema_updates_is_refused(block, key):
    """A switch or snapshot runs after an EMA update: every 5 steps with update_every 2 ran every 10 steps; with
    start_step 1 (updates at odd steps) a period of 4 never ran."""
    net = make_net()
    with pytest.raises(EMAConfigError, match=rf"^{key}: every 5 optimizer steps, but the EMA updates only at steps "
                                             r"2, 4, \.\.\. \(start_step 0, update_every 2\), so it would run only "
                                             r"where both meet; give a multiple of update_every \(2\)$"):
        ExponentialMovingAverage(net, EMAConfig.from_block(dict(block, decay=0.9, update_every=2)))
    four = {k: (4 if k == "switch_every" else dict(v, snapshot_every=4)) for k, v in block.items()}
    with pytest.raises(EMAConfigError, match=r"give a multiple of update_every \(2\), and a start_step that is one "
                                             r"\(now 1\)$"):
        ExponentialMovingAverage(net, EMAConfig.from_block(dict(four, decay=0.9, update_every=2, start_step=1)))
    ExponentialMovingAverage(net, EMAConfig.from_block(dict(four, decay=0.9, update_every=2, start_step=2)))


def test_an_epoch_period_is_a_whole_number_of_ema_updates():
    cfg = EMAConfig.from_block({"switch_every": "0.5 epochs", "update_every": 4})
    assert switch_period(cfg, BatchInfo(8, steps_per_epoch=12)) == 8  # 6 steps rounded to 2 updates of 4
    assert switch_period(cfg, BatchInfo(8, steps_per_epoch=2)) == 4  # at least one update
    assert snapshot_period({"snapshot_every": "0.5 epochs"}, BatchInfo(8, steps_per_epoch=12), 4) == 8


def test_a_half_precision_shadow_on_the_numpy_store_is_refused_naming_both():
    with pytest.raises(EMAConfigError, match=r"^EMA.storage_dtype: float16 with backend='numpy', which stores float32 "
                                             r"only; use backend 'auto' or 'paddle', or storage_dtype float32$"):
        ExponentialMovingAverage(make_net(), EMAConfig(decay=0.9, storage_dtype="float16"), backend="numpy")
