"""PaddleNLP's real ``Trainer`` with ``EMATrainerCallback``: a randomly initialised UIE on a small ErnieConfig, trained
on the synthetic span task of ``examples/uie_ema.py`` on CPU (nothing is downloaded). The EMA is checked against an
independent numpy EMA over the weights recorded after every optimizer step."""
import json
import os
import sys
import tempfile

import numpy as np
import pytest
from conftest import HAS_PADDLENLP, NO_PADDLENLP, import_paddlenlp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PPNLP_HOME", os.path.join(tempfile.gettempdir(), "ema_callback_ppnlp"))  # nothing in the repo
pytestmark = pytest.mark.skipif(not HAS_PADDLENLP, reason=NO_PADDLENLP)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "examples"))

D = 0.9  # the EMA's decay per optimizer step in these tests (schedule: constant)




def _imports():
    import_paddlenlp()  # Hugging Face's datasets, not tests/datasets.py (conftest); at the first test, not collection
    import paddle  # noqa: F401
    import uie_ema
    from paddlenlp.trainer import TrainerCallback

    from ema_callback.integrations.paddlenlp_trainer import EMATrainerCallback

    return uie_ema, TrainerCallback, EMATrainerCallback


def _params(model):
    """Float parameters and buffers by state-dict name, numpy copies."""
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if np.issubdtype(v.numpy().dtype, np.floating)}


def _recorder():
    """A TrainerCallback keeping the weights at train begin and after every optimizer step."""
    _, TrainerCallback, _ = _imports()

    class Recorder(TrainerCallback):
        def __init__(self):
            self.start, self.after = None, []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start = _params(model)

        def on_optimizer_end(self, args, state, control, model=None, **kwargs):
            self.after.append(_params(model))

    return Recorder()


def numpy_ema(start, after, d=D):
    """ema_0 = w_0; ema_t = d ema_{t-1} + (1 - d) w_t (float64), after each of ``after``."""
    ema = {k: v.astype(np.float64) for k, v in start.items()}
    out = []
    for w in after:
        ema = {k: d * ema[k] + (1.0 - d) * w[k].astype(np.float64) for k in ema}
        out.append(ema)
    return out


def _close(a, b, tol=2e-6):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64), rtol=tol, atol=tol,
                                   err_msg=k)


def _equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _load(path):
    import paddle

    return {k: np.asarray(v) for k, v in paddle.load(path, return_numpy=True).items()
            if np.issubdtype(np.asarray(v).dtype, np.floating)}


def _evals(trainer):
    return [h for h in trainer.state.log_history if "eval_loss" in h]


def test_enable_false_is_bit_identical_to_the_trainer_without_the_callback(tmp_path):
    uie_ema, _, EMATrainerCallback = _imports()
    plain = uie_ema.make_trainer(str(tmp_path / "plain"), max_steps=20, eval_steps=10, save_steps=10)
    plain.train()
    off = uie_ema.make_trainer(str(tmp_path / "off"), max_steps=20, eval_steps=10, save_steps=10,
                               callbacks=[EMATrainerCallback(decay=D, enable=False)])
    off.train()
    _equal(_params(plain.model), _params(off.model))
    assert [h.get("eval_loss") for h in _evals(plain)] == [h.get("eval_loss") for h in _evals(off)]
    for step in (10, 20):
        _equal(_load(str(tmp_path / "plain" / f"checkpoint-{step}" / "model_state.pdparams")),
               _load(str(tmp_path / "off" / f"checkpoint-{step}" / "model_state.pdparams")))
        assert not os.path.exists(tmp_path / "off" / f"checkpoint-{step}" / "model_state.pdema")


def test_evaluation_and_checkpoints_hold_the_ema_with_raw_metrics_beside(tmp_path):
    """The numpy EMA of the recorded weights is what checkpoint-N holds and what the Trainer evaluated; the raw
    metrics are logged beside; the .pdema holds the raw weights; after train() the model holds the EMA."""
    import paddle

    uie_ema, _, EMATrainerCallback = _imports()
    rec = _recorder()
    ema = EMATrainerCallback(decay=D, schedule="constant", eval_raw=True)
    out = tmp_path / "run"
    trainer = uie_ema.make_trainer(str(out), max_steps=30, eval_steps=15, save_steps=15, callbacks=[rec, ema])
    trainer.train()
    assert len(rec.after) == 30 and ema.ema.num_updates == 30
    reference = numpy_ema(rec.start, rec.after)
    evals = _evals(trainer)
    assert [h["step"] for h in evals] == [15, 30]
    for h in evals:
        step = h["step"]
        ckpt = out / f"checkpoint-{step}"
        _close(_load(str(ckpt / "model_state.pdparams")), reference[step - 1])
        from ema_callback.files.state_file import read_state

        state = read_state(str(ckpt / "model_state.pdema"))
        _equal({k: v for k, v in state["raw_weights"].items() if k in rec.after[step - 1]}, rec.after[step - 1])
        assert {"eval_loss_raw", "eval_f1_raw", "ema_drift"} <= set(h)
        # the Trainer's own eval_loss is the EMA's: a model given the reference EMA weights gives the same loss
        probe = uie_ema.tiny_uie(1)
        probe.set_state_dict({k: paddle.to_tensor(v.astype(np.float32)) for k, v in reference[step - 1].items()})
        check = uie_ema.make_trainer(str(tmp_path / "probe"), model=probe)
        assert check.evaluate()["eval_loss"] == pytest.approx(h["eval_loss"], rel=1e-4)
        raw = uie_ema.tiny_uie(1)
        raw.set_state_dict({k: paddle.to_tensor(v) for k, v in rec.after[step - 1].items()})
        assert uie_ema.make_trainer(str(tmp_path / "probe"), model=raw).evaluate()["eval_loss"] == \
            pytest.approx(h["eval_loss_raw"], rel=1e-4)
        assert abs(h["eval_loss"] - h["eval_loss_raw"]) > 1e-6
    # after train(): the EMA in the model, the raw weights in <output_dir>/model_state.pdema
    _close(_params(trainer.model), reference[-1])
    metrics = trainer.evaluate()  # a direct call: EMA metrics, raw beside
    assert metrics["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert metrics["eval_loss_raw"] == pytest.approx(evals[-1]["eval_loss_raw"], rel=1e-6)
    _close(_params(trainer.model), reference[-1])
    from ema_callback.files.state_file import read_state

    final = read_state(str(out / "model_state.pdema"))
    _equal({k: v for k, v in final["raw_weights"].items() if k in rec.after[-1]}, rec.after[-1])
    trainer.save_model()
    _close(_load(str(out / "model_state.pdparams")), reference[-1])
    table = json.load(open(out / "ema_candidates.json"))
    assert {row["candidate"] for row in table["candidates"]} == {ema.ema.labels[0], "raw"}


def test_resume_from_checkpoint_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """Resumed from checkpoint-20 (whose .pdparams hold EMA weights), a run ends on the raw weights and the EMA of the
    uninterrupted run, bit for bit. The 40 steps are one epoch: PaddleNLP 2.8's single-process resume draws a later
    epoch's shuffle from the freshly seeded generator, so its own resume across an epoch is not the same run."""
    import paddle

    uie_ema, _, EMATrainerCallback = _imports()
    with paddle.utils.unique_name.guard():  # parameter and optimizer-state names as in a new process
        whole = uie_ema.make_trainer(str(tmp_path / "whole"), max_steps=40, eval_steps=20, save_steps=20, n_train=640,
                                     callbacks=[EMATrainerCallback(decay=D, schedule="constant")])
        whole.train()
    resumed_cb = EMATrainerCallback(decay=D, schedule="constant")
    with paddle.utils.unique_name.guard():
        resumed = uie_ema.make_trainer(str(tmp_path / "resumed"), max_steps=40, eval_steps=20, save_steps=20,
                                       n_train=640, callbacks=[resumed_cb])
        resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-20"))
    assert resumed_cb.ema.num_steps == 40 and resumed_cb.ema.num_updates == 40
    from ema_callback.files.state_file import read_state

    a = read_state(str(tmp_path / "whole" / "model_state.pdema"))
    b = read_state(str(tmp_path / "resumed" / "model_state.pdema"))
    _equal(a["raw_weights"], b["raw_weights"])  # the raw weights trained on: the resume put them back
    _equal(_params(whole.model), _params(resumed.model))  # the EMA weights after train()
    _equal(_load(str(tmp_path / "whole" / "checkpoint-40" / "model_state.pdparams")),
           _load(str(tmp_path / "resumed" / "checkpoint-40" / "model_state.pdparams")))
    assert _evals(whole)[-1]["eval_loss"] == _evals(resumed)[-1]["eval_loss"]
    # EMA off, resumed from the same checkpoint (its .pdparams hold EMA weights): it trains on from the raw weights in
    # its .pdema, so it ends on the uninterrupted EMA run's raw weights
    with paddle.utils.unique_name.guard():
        off = uie_ema.make_trainer(str(tmp_path / "off"), max_steps=40, eval_steps=20, save_steps=20, n_train=640,
                                   callbacks=[EMATrainerCallback(decay=D, enable=False)])
        off.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-20"))
    _equal({k: v for k, v in a["raw_weights"].items() if k in _params(off.model)}, _params(off.model))
    assert not os.path.exists(tmp_path / "off" / "checkpoint-40" / "model_state.pdema")


def test_load_best_model_at_end_loads_the_best_evaluated_ema_weights(tmp_path):
    """The best checkpoint is chosen by the EMA's metric (the one the Trainer evaluated), and the model after train()
    holds that checkpoint's .pdparams, which are the EMA of that step (numpy reference), not the final EMA."""
    uie_ema, _, EMATrainerCallback = _imports()
    rec = _recorder()
    trainer = uie_ema.make_trainer(str(tmp_path / "best"), max_steps=60, eval_steps=10, save_steps=10,
                                   learning_rate=2e-2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                   callbacks=[rec, EMATrainerCallback(decay=D, schedule="constant", eval_raw=True)])
    trainer.train()
    evals = _evals(trainer)
    best = min(evals, key=lambda h: h["eval_loss"])
    assert trainer.state.best_metric == best["eval_loss"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    reference = numpy_ema(rec.start, rec.after)
    _close(_params(trainer.model), reference[best["step"] - 1])
    _equal(_params(trainer.model), _load(os.path.join(trainer.state.best_model_checkpoint, "model_state.pdparams")))
    if best["step"] != 60:
        assert any(np.abs(reference[-1][k] - reference[best["step"] - 1][k]).max() > 1e-5 for k in reference[-1])


def test_gradient_accumulation_one_ema_update_per_optimizer_step(tmp_path):
    uie_ema, _, EMATrainerCallback = _imports()
    rec = _recorder()
    cb = EMATrainerCallback(decay=D, schedule="constant")
    trainer = uie_ema.make_trainer(str(tmp_path / "acc"), max_steps=6, eval_steps=6, save_steps=6,
                                   per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                   callbacks=[rec, cb])
    trainer.train()
    assert trainer.state.global_step == 6 and len(rec.after) == 6
    assert cb.ema.num_steps == 6 and cb.ema.num_updates == 6
    assert cb.batch.global_batch == 16
    _close(_params(trainer.model), numpy_ema(rec.start, rec.after)[-1])


def test_several_emas_are_evaluated_and_unsupported_options_are_refused(tmp_path):
    from ema_callback.config.schema import EMAConfigError

    uie_ema, _, EMATrainerCallback = _imports()
    cb = EMATrainerCallback(decays=[0.9, 0.99], schedule="constant", eval_raw=True)
    trainer = uie_ema.make_trainer(str(tmp_path / "several"), max_steps=20, eval_steps=10, save_steps=20,
                                   callbacks=[cb])
    trainer.train()
    first, second = cb.ema.labels[:2]
    for h in _evals(trainer):
        assert {"eval_loss_raw", f"eval_loss_{first}", f"eval_loss_{second}"} <= set(h)
        assert h["eval_loss"] == h[f"eval_loss_{first}"] != h[f"eval_loss_{second}"]
    assert os.path.isfile(tmp_path / "several" / "ema_candidates.json")
    with pytest.raises(EMAConfigError, match="recompute_bn"):
        EMATrainerCallback(decay=0.9, recompute_bn=4)


@pytest.mark.distributed
@pytest.mark.xdist_group("launch")  # 2-process launches one at a time
def test_two_rank_trainer_has_identical_emas_on_both_ranks(tmp_path):
    """``paddle.distributed.launch --nproc_per_node 2`` on CPU: both ranks hold the same EMAs (every shadow, bit for
    bit), the same raw weights and metrics, the global batch counts both ranks, and the primary EMA is the numpy EMA
    of the weights each rank recorded; checkpoint-N holds the .pdema (written by rank 0)."""
    import subprocess

    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), os.path.join(HERE, "dist_nlp_script.py"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    logs = "".join(open(os.path.join(tmp_path, "log", f)).read()[-2000:] for f in os.listdir(tmp_path / "log"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["num_steps"] == r1["num_steps"] == r0["num_updates"] == 10
    assert r0["global_batch"] == r1["global_batch"] == 16  # 8 per device x 2 ranks
    assert r0["shadow"] == r1["shadow"] and r0["others"] == r1["others"] and len(r0["others"]) == 1
    assert r0["held"] == r1["held"] and r0["raw"] == r1["raw"] and r0["held"] != r0["raw"]
    assert r0["numpy_error"] < 2e-6 and r1["numpy_error"] < 2e-6
    assert r0["evals"] == r1["evals"] and all("eval_loss_raw" in e and "eval_loss_ema0.99" in e for e in r0["evals"])
    assert {"model_state.pdparams", "model_state.pdema"} <= set(r0["files"])


def test_length_auto_picks_at_the_end_through_the_trainers_evaluation(tmp_path):
    """No length stated: length auto. The candidates are evaluated at the end with the Trainer's evaluation; the model
    ends on the pick, whose metric is what ema_auto.json records for it; with load_best_model_at_end it is refused."""
    from ema_callback.config.schema import EMAConfigError

    uie_ema, _, EMATrainerCallback = _imports()
    cb = EMATrainerCallback(eval_raw=True)
    assert cb.config.auto
    trainer = uie_ema.make_trainer(str(tmp_path / "auto"), max_steps=60, eval_steps=20, save_steps=60,
                                   learning_rate=1e-2, metric_for_best_model="eval_loss", callbacks=[cb])
    trainer.train()
    record = json.load(open(tmp_path / "auto" / "ema_auto.json"))
    pick = cb.auto.decision.label
    assert len(cb.auto.evaluated) >= 4 and "raw" in cb.auto.evaluated
    assert record["label"] == pick
    assert pick == "raw" or cb.ema.applied_label == pick
    # what the model holds now scores what the pick scored (the loss, lower is better)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(cb.auto.evaluated[pick].value, rel=1e-5)
    # a length rebuilt from the snapshots in the model (what a pick other than the default leaves there):
    # trainer.evaluate() scores it as length auto did, with the raw weights beside, and leaves it in the model
    other = next(label for label in cb.auto.evaluated if label.startswith("sigma"))
    network = cb.ema.model
    if cb.ema.applied:
        cb.ema.restore(network)
    cb.ema.apply_values(network, cb.auto.values(other, network), other)
    before = {k: v.numpy().copy() for k, v in network.state_dict().items()}
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(cb.auto.evaluated[other].value, rel=1e-5)
    assert metrics["eval_loss_raw"] == pytest.approx(cb.auto.evaluated["raw"].value, rel=1e-5)
    assert cb.ema.applied_label == other
    assert all(np.array_equal(before[k], v.numpy()) for k, v in network.state_dict().items())
    with pytest.raises(EMAConfigError, match="load_best_model_at_end"):
        uie_ema.make_trainer(str(tmp_path / "both"), max_steps=4, eval_steps=2, save_steps=2,
                             load_best_model_at_end=True, metric_for_best_model="eval_loss",
                             callbacks=[EMATrainerCallback()]).train()


def test_select_best_checkpoints_hold_the_candidate_whose_metric_they_report(tmp_path):
    """select: best with a very long EMA (decay 0.999 over 80 steps: mostly the initial weights) and eval_raw: once the
    raw weights beat it by more than the noise they are selected; each checkpoint holds the selected candidate's
    weights (raw as recorded, or the numpy EMA) and the plain eval_loss is that candidate's."""
    uie_ema, _, EMATrainerCallback = _imports()
    rec = _recorder()
    cb = EMATrainerCallback(decay=0.999, schedule="constant", eval_raw=True, select="best")
    trainer = uie_ema.make_trainer(str(tmp_path / "best"), max_steps=80, eval_steps=5, save_steps=5,
                                   learning_rate=1e-2, metric_for_best_model="eval_loss", callbacks=[rec, cb])
    trainer.train()
    label = cb.ema.labels[0]
    reference = numpy_ema(rec.start, rec.after, d=0.999)
    selected = []
    for h in _evals(trainer):
        step = h["step"]
        held = _load(str(tmp_path / "best" / f"checkpoint-{step}" / "model_state.pdparams"))
        if h["eval_loss"] == h["eval_loss_raw"] != h[f"eval_loss_{label}"]:
            selected.append("raw")
            _equal(held, rec.after[step - 1])
        else:
            assert h["eval_loss"] == h[f"eval_loss_{label}"]
            selected.append(label)
            _close(held, reference[step - 1])
    assert "raw" in selected and selected[0] == label  # the first evaluations have no noise measure: the primary
    assert [r["selected"] for r in cb.board.history] == selected


def test_options_that_cannot_act_are_refused_in_one_line(tmp_path):
    """A dict of eval datasets with eval_raw, and length auto without eval data, fail when train() starts."""
    from ema_callback.config.schema import EMAConfigError

    uie_ema, _, EMATrainerCallback = _imports()
    from paddlenlp.datasets import MapDataset
    trainer = uie_ema.make_trainer(str(tmp_path / "dict"), max_steps=2, eval_steps=2, save_steps=2,
                                   callbacks=[EMATrainerCallback(decay=0.9, eval_raw=True)])
    trainer.eval_dataset = {"a": MapDataset(uie_ema.make_examples(8, 1)), "b": MapDataset(uie_ema.make_examples(8, 2))}
    with pytest.raises(EMAConfigError, match="dict of eval datasets"):
        trainer.train()
    trainer = uie_ema.make_trainer(str(tmp_path / "noeval"), max_steps=2, evaluation_strategy="no", save_steps=2,
                                   callbacks=[EMATrainerCallback()])
    trainer.eval_dataset = None
    with pytest.raises(EMAConfigError, match="eval_dataset"):
        trainer.train()
    trainer = uie_ema.make_trainer(str(tmp_path / "unified"), max_steps=2, eval_steps=2, save_steps=2,
                                   unified_checkpoint=True, callbacks=[EMATrainerCallback(decay=0.9)])
    with pytest.raises(EMAConfigError, match="unified_checkpoint"):
        trainer.train()


@pytest.mark.slow
def test_uie_example_runs_and_saves_the_ema_with_the_raw_weights_beside(tmp_path):
    import subprocess

    import paddle

    repo = os.path.dirname(HERE)
    done = subprocess.run([sys.executable, os.path.join(repo, "examples", "uie_ema.py"), "--steps", "50", "--out",
                           str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=repo))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"eval_f1", "eval_f1_raw"} <= set(printed)
    from ema_callback.files.state_file import read_state

    state = read_state(str(tmp_path / "out" / "model_state.pdema"))
    saved = paddle.load(str(tmp_path / "out" / "model_state.pdparams"), return_numpy=True)
    assert state["num_updates"] == 50 and set(state["raw_weights"]) <= set(saved)
    assert any(not np.array_equal(saved[k], state["raw_weights"][k]) for k in state["raw_weights"])


def test_before_eval_start_step_the_raw_weights_are_evaluated_and_saved(tmp_path):
    uie_ema, _, EMATrainerCallback = _imports()
    rec = _recorder()
    cb = EMATrainerCallback(decay=D, schedule="constant", eval_raw=True, eval_start_step=10)
    trainer = uie_ema.make_trainer(str(tmp_path / "start"), max_steps=10, eval_steps=5, save_steps=5,
                                   callbacks=[rec, cb])
    trainer.train()
    early, late = _evals(trainer)
    assert early["eval_loss"] == early["eval_loss_raw"] and "ema_drift" not in early
    _equal(_load(str(tmp_path / "start" / "checkpoint-5" / "model_state.pdparams")), rec.after[4])
    assert late["eval_loss"] != late["eval_loss_raw"] and "ema_drift" in late
    _close(_load(str(tmp_path / "start" / "checkpoint-10" / "model_state.pdparams")),
           numpy_ema(rec.start, rec.after)[-1])


def test_save_as_raw_keeps_the_raw_weights_in_the_checkpoint_and_the_ema_beside(tmp_path):
    uie_ema, _, EMATrainerCallback = _imports()
    rec = _recorder()
    cb = EMATrainerCallback(decay=D, schedule="constant", eval_raw=True, save_as="raw")
    trainer = uie_ema.make_trainer(str(tmp_path / "raw"), max_steps=10, eval_steps=5, save_steps=5,
                                   callbacks=[rec, cb])
    trainer.train()
    reference = numpy_ema(rec.start, rec.after)
    for h in _evals(trainer):
        step, ckpt = h["step"], tmp_path / "raw" / f"checkpoint-{h['step']}"
        _equal(_load(str(ckpt / "model_state.pdparams")), rec.after[step - 1])
        _close(_load(str(ckpt / "model_state.ema.pdparams")), reference[step - 1])
        assert h["eval_loss"] != h["eval_loss_raw"]  # the evaluation is still the EMA's, the raw beside
