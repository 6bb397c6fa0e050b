"""PaddleClas: the ``EMA:`` section driving PaddleClas's own ``Engine`` and ``tools/train.py`` loop on our engine.

    ema-callback cls-train -c cfg.yaml [-o Key.sub=val ...] [--paddleclas-root DIR] [--ema-config BLOCK]

runs the checkout's own ``tools/train.py`` with three seams wrapped for the run (restored in ``finally``) and
nothing in the checkout edited:

* ``ppcls.engine.engine.Engine`` -> ``EMAEngine``, a subclass whose ``__init__`` puts ``ClsEMA`` where PaddleClas
  builds its ``ppcls.utils.ema.ExponentialMovingAverage`` (the name in ``ppcls.engine.engine`` is swapped for that
  one call: the model is then built, AMP-decorated, and the optimizer exists). PaddleClas's loop calls
  ``model_ema.update(model)`` after every optimizer step; ``ClsEMA.update`` steps our engine once per real update
  (a step the AMP GradScaler skipped is not one). ``EMAEngine.eval`` runs PaddleClas's own evaluation: the first
  call of an evaluation (the raw weights, PaddleClas's own) as it is; the second (PaddleClas's ``ema_module``
  evaluation) evaluates each EMA candidate in the live model (``candidate_eval``), selects one (``select``)
  and keeps the comparison (``CandidateBoard``);
* ``ppcls.utils.save_load.save_model`` -> every set PaddleClas writes is staged and published as one
  (``files.checkpoint_set``): ``<prefix>.pdparams`` hold the selected candidate (the primary EMA, float32), the
  ``.pdema`` PaddleClas's raw weights plus our state under ``ema_callback_state``; ``best_model`` holds the
  candidate the selection rule picked, written when that candidate's metric is a new best (PaddleClas's own rule,
  "the best of raw and EMA, stored as the EMA", is not used);
* ``ppcls.engine.engine.init_model`` -> with the EMA off, a resumed checkpoint of an EMA run gets its raw weights
  back from its ``.pdema`` (PaddleClas would train on from the EMA weights in its ``.pdparams``).

PaddleClas's native block is ``EMA: {decay: D}`` (a constant decay: no warm-up, no bias correction): ``decay``
keeps that meaning here unless the block states a ``schedule``. A block without a length is ``length: auto``
(ema-callback's rule; PaddleClas's ``EMA: {}`` meant 0.9999): the candidates go through PaddleClas's own evaluation
at the end and the pick is saved as ``best_model`` and ``latest``. Every other key is ema-callback's
(docs/ema-block.md); an unknown one is refused in one line. With ``EMA.enable: false`` the section is removed and
the run is PaddleClas's own without any EMA, bit for bit.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ema_callback.config.files import merged_block, read_block_file
from ema_callback.config.schema import LENGTH_KEYS, SCHEDULE_PARAMS, SECTION, EMAConfig, EMAConfigError
from ema_callback.errors import EMAError, EMAFileError
from ema_callback.integrations.auto_length import AutoPick, saved_plan
from ema_callback.integrations.auto_length import resolve as resolve_length
from ema_callback.integrations.candidate_eval import Measured, evaluate_candidates
from ema_callback.integrations.candidates import RAW, CandidateBoard
from ema_callback.integrations.checkpoints import (
    STATE_KEY,
    check_checkpoint_files,
    checkpoint_prefix,
    describe_start_weights,
    ema_file,
    is_rank0,
    lock_run,
    numpy_state,
    place_features,
    ppdet_state,
    restore_raw_weights,
    save_without_stale_state,
)
from ema_callback.integrations.evaluation import EvaluationPolicy, before_eval_start
from ema_callback.integrations.suite_adapter import (
    FinalPathLogger,
    SuiteAdapter,
    import_from_checkout,
    read_run_config,
    release_all,
    run_suite_script,
    suite_parser,
    suite_value,
)
from ema_callback.integrations.suite_checkout import PADDLECLAS, find_checkout

logger = logging.getLogger("ema_callback")

NATIVE_DECAY = 0.9999  # what PaddleClas's EMA: {} (no decay) means


# ---------------------------------------------------------------------------- configuration
def resolve_cls_config(suite: Mapping[str, Any], block_file: Optional[str], overrides) -> EMAConfig:
    """The run's ``EMAConfig`` (block file < the YAML's ``EMA:`` < ``-o EMA.*``, ``config.files.merged_block``),
    with PaddleClas's meaning of ``decay`` (constant) where no ``schedule`` is stated."""
    block = read_block_file(block_file) if block_file else {}
    merged = merged_block(block, suite.get(SECTION), overrides)
    if merged.get("enable") is False:  # validated (an unknown key is still refused), then off
        return EMAConfig.from_block(merged if any(merged.get(k) is not None for k in LENGTH_KEYS)
                                    else dict(merged, decay=NATIVE_DECAY))
    if not any(merged.get(k) is not None for k in LENGTH_KEYS):
        merged["length"] = "auto"  # ema-callback's rule for no length (PaddleClas's EMA: {} meant decay 0.9999)
    if merged.get("decay") is not None and "schedule" not in merged:
        for key, schedule in SCHEDULE_PARAMS.items():
            if merged.get(key) is not None:
                raise EMAConfigError(f"{SECTION}.{key}: a parameter of schedule: {schedule}; in cls-train a decay "
                                     "without a schedule is PaddleClas's constant decay: set schedule: "
                                     f"{schedule} or remove {key}")
        merged["schedule"] = "constant"  # PaddleClas's EMA: d * ema + (1 - d) * w from the first step
    if merged.get("eval_raw") is False:
        raise EMAConfigError(f"{SECTION}.eval_raw: false cannot act in cls-train: PaddleClas's loop evaluates the raw "
                             "weights at every evaluation, and they are compared beside the EMA; remove eval_raw")
    merged["eval_raw"] = True  # before the checks: with it, select: best has the raw weights among its candidates
    config = EMAConfig.from_block(merged)  # an unknown key: one line naming it
    if config.save_as != "ema":
        raise EMAConfigError(f"{SECTION}.save_as: cls-train keeps PaddleClas's convention (.pdparams = EMA weights, "
                             f".pdema = raw weights; save_as: ema); got {config.save_as!r}")
    return config



# ---------------------------------------------------------------------------- the object PaddleClas's Engine holds
class _EMAModule:
    """What PaddleClas's ``Engine`` holds as ``model_ema.module`` (no copy of the network): it swaps it in as
    ``engine.model`` for its EMA evaluation (``EMAEngine.eval`` then evaluates in the live network), saves its
    ``state_dict()`` as ``.pdparams`` (the wrapped ``save_model`` writes the selected weights instead) and resumes
    it with ``set_state_dict`` (our exact state from the ``.pdema``)."""

    def __init__(self, ema: "ClsEMA"):
        self._ema = ema

    def eval(self):  # PaddleClas calls ema_module.eval() after its EMA evaluation
        return self

    def train(self):
        return self

    def state_dict(self, *args, **kwargs):
        import paddle

        return {k: paddle.to_tensor(v) for k, v in self._ema.held(self._ema.board.primary).items()}

    def set_state_dict(self, state_dict, *args, **kwargs):
        self._ema.resume(state_dict)

    set_dict = set_state_dict

    def __call__(self, *args, **kwargs):
        raise EMAError("cls-train: PaddleClas ran its EMA module outside its evaluation (a train_mode or eval_mode "
                       "cls-train does not wrap); train it with PaddleClas's tools/train.py and its own EMA")


class _Held:
    """``state_dict()`` of given arrays: the ``ema`` PaddleClas's ``save_model`` writes as ``.pdparams``."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = arrays

    def state_dict(self):
        import paddle

        return {k: paddle.to_tensor(v) for k, v in self.arrays.items()}


def _suite_log(message: str) -> None:
    """One line in PaddleClas's own log (its ``train.log`` too), beside its evaluation lines."""
    try:
        from ppcls.utils import logger as ppcls_logger

        ppcls_logger.info(message)
    except ImportError:
        logger.info("%s", message)


class ClsEMA:
    """PaddleClas's ``ExponentialMovingAverage`` interface (``.module``, ``.update(model)``) over our engine."""

    def __init__(self, model, config: EMAConfig, optimizer, batch, checkpoints: Optional[str], steps_per_epoch: int,
                 save_dir: Optional[str], plan=None):
        from ema_callback.core.engine import ExponentialMovingAverage
        from ema_callback.core.run_report import log_start
        from ema_callback.core.selection import unwrap
        from ema_callback.integrations.optimizer_steps import OptimizerStepCounter

        self.engine = ExponentialMovingAverage(model, config, optimizer=optimizer, batch=batch)
        self.model = unwrap(model)
        self.config = config
        self.module = _EMAModule(self)
        self.decay = self.engine.decays[0]  # PaddleClas's attribute
        self.board = CandidateBoard(self.engine, config)
        self.policy = EvaluationPolicy(config)
        self.checkpoints = checkpoints
        self.steps_per_epoch = steps_per_epoch
        self.raw_metric: Any = None  # PaddleClas's evaluation of the raw weights, this epoch
        self.raw_units: Optional[np.ndarray] = None  # its per-sample (correct, 1) pairs, where the metric is top-1
        self.key = "metric"
        self.best: Optional[float] = None  # the selected candidate's best metric so far (this run)
        self.pending: Optional[Tuple[str, Dict[str, Any]]] = None  # a new best to write as best_model
        self.final: Optional[str] = None  # length: auto's pick, once made (what the last saves hold)
        # length: auto: PaddleClas's evaluation is collective (all_gather), so every rank evaluates the candidates
        self.auto = AutoPick(self.engine, plan, every_rank=True) if plan is not None else None
        if plan is not None:
            elements = sum(int(np.prod(e.tensor.shape)) for e in self.engine.averaged_entries)
            logger.info("EMA: %s", plan.describe(elements))
        place_features(self.engine, save_dir, only_rank0_evaluates=False)  # PaddleClas evaluates on every rank
        log_start(self.engine)
        logger.info("EMA: %s", ", ".join(f"{k}: {v}" for k, v in config.to_block().items()))
        self.counter = OptimizerStepCounter(optimizer, read_found_inf=not self.engine.deferred)

    # -------------------------------------------------------------- PaddleClas's interface
    def update(self, model=None) -> None:
        """Called by PaddleClas after every optimizer step: one EMA step per real update since the last call."""
        for found_inf in self.counter.pop_flags():
            self.engine.step(found_inf=found_inf)

    def resume(self, saved_ema_weights) -> None:
        """From PaddleClas's ``init_model`` (after it read ``<checkpoints>.pdparams`` for its EMA): our exact state from
        the ``.pdema``, else (a checkpoint of PaddleClas's own EMA) those weights as the average."""
        from ema_callback.files.checkpoint_io import checked_load
        from ema_callback.files.state_file import read_state

        source = ema_file(self.checkpoints or "")
        data = checked_load(source) if self.checkpoints and os.path.exists(source) else {}
        if isinstance(data, dict) and STATE_KEY in data:
            self.engine.set_state_dict(read_state(source, key=STATE_KEY, data=data)[STATE_KEY], source=source)
            logger.info("EMA: resumed from %s at optimizer step %d (%d updates)", source, self.engine.num_steps,
                        self.engine.num_updates)
            return
        states = checked_load(checkpoint_prefix(self.checkpoints or "") + ".pdstates") if self.checkpoints else {}
        epoch = int(states.get("epoch", 0)) if isinstance(states, dict) else 0
        values = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in saved_ema_weights.items()}
        self.engine.load_average(values, num_steps=epoch * self.steps_per_epoch)
        logger.warning("EMA: %s has no %s entry (a checkpoint of PaddleClas's own EMA): the EMA starts from the EMA "
                       "weights in its .pdparams at optimizer step %d (epoch %d)", source, STATE_KEY,
                       self.engine.num_steps, epoch)

    # -------------------------------------------------------------- weights
    def held(self, label: str) -> Dict[str, np.ndarray]:
        """The network's state dict with ``label``'s weights (float32 EMA values; raw: the live weights)."""
        if label == RAW:
            return numpy_state(self.model)
        if self.auto is not None and label not in self.engine.labels:  # a length rebuilt from the snapshots
            return self.auto.values(label, self.model)
        return self.engine.ema_state_dict(self.model, label)

    def selected_now(self) -> str:
        """What a regular checkpoint's ``.pdparams`` hold: length auto's pick once made, else the raw weights before
        ``eval_start_step``, else the primary."""
        if self.final is not None:
            return self.final
        return RAW if before_eval_start(self.engine, self.config) else self.board.primary

    # -------------------------------------------------------------- evaluation
    def evaluate(self, epoch_id: int, run_eval: Callable[[], Any]) -> Any:
        """PaddleClas's EMA evaluation: every EMA candidate (``candidate_eval``) beside the raw result PaddleClas
        just had, the selection, and a new best noted for ``best_model``; returns the primary's metric (what
        PaddleClas logs as ``best metric ema``)."""
        if self.policy.raw_weights_now(self.engine):
            self.board.winner = RAW
            self._note_best(RAW, self.raw_metric, epoch_id)
            return self.raw_metric

        def before(label: str) -> None:
            logger.info("EMA: evaluating %s", label)
            _suite_log(f"[Eval][Epoch {epoch_id}] the next evaluation is ema-callback's candidate {label} "
                       "(the one before: the raw weights)")

        metrics, per_unit = evaluate_candidates([label for label in self.board.to_evaluate() if label != RAW],
                                                lambda label: self.board.weights(label, self.model),
                                                self._measure(run_eval), before)
        results = {RAW: {self.key: self.raw_metric}, **metrics}  # PaddleClas evaluated the raw weights first
        units = {RAW: self.raw_units, **per_unit}
        winner = self.board.pick(results, self.key, units)
        self.board.record(self.engine.num_steps, results, self.key, winner)
        self._note_best(winner, results[winner][self.key], epoch_id)
        return results[self.board.primary][self.key]

    def _measure(self, run_eval: Callable[[], Any]) -> Callable[[], Measured]:
        """PaddleClas's own evaluation of the live network (``run_eval``: its main metric and per-sample units) as
        ``candidate_eval`` takes it."""
        def measure() -> Measured:
            value, units = run_eval()
            return {self.key: value}, units

        return measure

    def _note_best(self, label: str, value: Any, epoch_id: int) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return
        if self.best is None or value >= self.best:  # PaddleClas's comparison (>=: the later of equals)
            self.best = value
            self.pending = (label, {"metric": value, "epoch": epoch_id})

    def pick_length(self, run_eval: Callable[[], Any], evaluated_in_training: bool) -> Optional[Tuple[str, float]]:
        """``length: auto`` at the end (``auto_length``): each candidate through PaddleClas's own evaluation
        (``run_eval``); the accuracy is no per-sample mean here, so the uncertainty is the noise of the metric over
        nearby lengths where the metric is not top-1 accuracy (which is compared sample by sample). Returns (the pick,
        its metric), or None when nothing was compared."""
        auto = self.auto
        if not evaluated_in_training:
            logger.warning("EMA: length auto: no evaluation in this run (Global.eval_during_train: False), so nothing "
                           "can be compared: the default length (%s) is kept", auto.length_of(auto.default))
            return None

        auto.metric = self.key
        decision = auto.run(self._measure(run_eval), self.model, trend_noise=self.board.noises((auto.default, RAW)))
        if not auto.evaluated:
            return None
        self.final = decision.label
        return decision.label, auto.evaluated[decision.label].value

    def finish(self, save_dir: Optional[str]) -> None:
        logger.info("EMA: finished: %s", self.engine.summary())
        self.board.finish(save_dir, write=is_rank0())
        self.counter.close()
        self.engine.close()  # the model as it was found: no feature's hook stays on it
        if self.auto is not None:
            if is_rank0():
                self.auto.write(save_dir)
            self.auto.close()


# ---------------------------------------------------------------------------- the seams
def _make_engine_class(Engine, config: EMAConfig, resolved_block: Optional[Dict[str, Any]], checkpoints):
    import ppcls.engine.engine as engine_module
    import ppcls.utils.save_load as save_load

    class EMAEngine(Engine):
        """PaddleClas's Engine with ``ClsEMA`` as ``model_ema`` (train mode, EMA on), or with no EMA at all (EMA off:
        PaddleClas's own EMA is not built either)."""

        def __init__(self, cfg, mode="train"):
            if mode != "train":
                super().__init__(cfg, mode=mode)
                return
            if not config.enable:
                cfg.pop(SECTION, None)
                super().__init__(cfg, mode=mode)
                return
            if (cfg.get("Global") or {}).get("uniform_output_enabled"):
                raise EMAConfigError("Global.uniform_output_enabled: exports PaddleClas's EMA module during training, "
                                     "which cls-train does not build; set it to False (tools/export_model.py exports "
                                     "the EMA weights of a saved .pdparams)")
            cfg[SECTION] = dict(resolved_block or {})  # the config PaddleClas prints holds the resolved block
            original = engine_module.ExponentialMovingAverage
            engine_module.ExponentialMovingAverage = lambda model, decay=None: self._build_ema(model)
            try:
                super().__init__(cfg, mode=mode)
            finally:
                engine_module.ExponentialMovingAverage = original

        def _build_ema(self, model):
            optimizers = self.optimizer if isinstance(self.optimizer, (list, tuple)) else [self.optimizer]
            if len(optimizers) != 1:
                raise EMAConfigError(f"Optimizer: {len(optimizers)} optimizers; cls-train counts the updates of one")
            update_freq = int(self.update_freq)
            steps = self.iter_per_epoch // update_freq
            batch = _batch_info(self, update_freq, steps)
            resumed = saved_plan(ema_file(checkpoints)) if checkpoints and config.auto else None
            engine_config, plan = resolve_length(config, batch, self.output_dir, resumed=resumed)
            return ClsEMA(model, engine_config, optimizers[0], batch, checkpoints, steps, self.output_dir, plan)

        def eval(self, epoch_id=0):
            ema = getattr(self, "model_ema", None)
            if self.mode != "train" or not isinstance(ema, ClsEMA):
                return super().eval(epoch_id)
            if self.model is not ema.module:  # PaddleClas's evaluation of the raw weights (always the first)
                ema.raw_metric, ema.raw_units = self._eval_with_units(epoch_id)
                ema.key = _main_metric_name(self) or ema.key
                return ema.raw_metric
            self.model = self._ema_live_model
            try:
                return ema.evaluate(epoch_id, lambda: self._eval_with_units(epoch_id))
            finally:
                self.model = ema.module

        def _eval_with_units(self, epoch_id):
            """PaddleClas's own evaluation, with its metric watched for per-sample top-1 results (``_Top1Units``):
            (its metric, the units or None)."""
            own = getattr(self, "eval_metric_func", None)
            tap = _Top1Units(own) if own is not None and _main_metric_name(self) in (None, "top1") else None
            if tap is not None:
                self.eval_metric_func = tap
            try:
                value = Engine.eval(self, epoch_id)
            finally:
                if tap is not None:
                    self.eval_metric_func = own
            return value, tap.array(value) if tap is not None else None

        def train(self):
            ema = getattr(self, "model_ema", None)
            if isinstance(ema, ClsEMA):
                self._ema_live_model = self.model  # after paddle.DataParallel, as PaddleClas's loop uses it
            try:
                result = super().train()
                if isinstance(ema, ClsEMA) and ema.auto is not None:
                    self._save_pick(ema)
                return result
            finally:
                if isinstance(ema, ClsEMA):
                    ema.finish(self.output_dir)

        def _save_pick(self, ema: "ClsEMA") -> None:
            """length: auto's pick, evaluated by PaddleClas's own evaluation, saved as best_model and latest through
            PaddleClas's own save_model (the wrapped one: the .pdparams hold the pick)."""
            epochs = self.config["Global"]["epochs"]
            evaluated = bool(self.config["Global"]["eval_during_train"])
            picked = ema.pick_length(lambda: self._eval_with_units(epochs), evaluated)
            if picked is None:
                return
            label, value = picked
            ema.pending = (label, {"metric": value, "epoch": epochs})
            save_load.save_model(self.model, self.optimizer, {"metric": value, "epoch": epochs}, self.output_dir,
                                 ema=ema.module, model_name=self.config["Arch"]["name"], prefix="latest",
                                 loss=self.train_loss_func)
            logger.info("EMA: length auto: %s written as best_model and latest in %s", label, self.output_dir)

    return EMAEngine


class _Top1Units:
    """PaddleClas's evaluation metric, watched: each sample's (correct, 1) for top-1 accuracy, for a paired comparison
    of candidates (``honest_pick``). The metric gets every call as it came; the per-sample results come from
    ``paddle.topk`` as ``paddle.metric.accuracy`` (TopkAcc's) computes them, and are kept only if their mean is the
    metric PaddleClas returned."""

    def __init__(self, metric):
        self._metric, self.pairs = metric, []

    def __call__(self, preds, labels, *args, **kwargs):
        out = self._metric(preds, labels, *args, **kwargs)
        if self.pairs is not None:
            try:
                import paddle

                x = preds[0] if isinstance(preds, (list, tuple)) else preds
                x = x.get("logits") if isinstance(x, dict) else x
                top = paddle.topk(x, k=1)[1].reshape([-1])
                correct = (top == labels.reshape([-1]).astype(top.dtype)).numpy()
                self.pairs.extend((float(c), 1.0) for c in correct)
            except Exception:  # not a [N, classes] output with [N] labels: no per-sample units
                self.pairs = None
        return out

    def __getattr__(self, name):
        return getattr(self._metric, name)

    def array(self, metric_value) -> Optional[np.ndarray]:
        if not self.pairs:
            return None
        units = np.array(self.pairs, dtype=np.float64)
        try:
            agrees = abs(units[:, 0].sum() / units[:, 1].sum() - float(metric_value)) < 1e-5
        except (TypeError, ValueError):
            agrees = False
        return units if agrees else None


def _main_metric_name(engine) -> Optional[str]:
    """The name of the metric PaddleClas's evaluation returns (the first of ``avg_info``: ``top1`` for ``TopkAcc``)."""
    try:
        info = engine.eval_metric_func.avg_info
    except Exception:  # no metric, or one without avg_info: the key stays "metric"
        return None
    name = info.split(":", 1)[0].strip() if isinstance(info, str) and ":" in info else ""
    return name if name.isidentifier() else None


def _batch_info(engine, update_freq: int, steps_per_epoch: int):
    """Images per optimizer update: what the loader yields per step (``loader_batch``) x ranks x ``update_freq``;
    ``len(dataset)`` images an epoch; ``Global.epochs`` epochs."""
    from ema_callback.core.horizon import BatchInfo
    from ema_callback.integrations.loader_batch import suite_batch_info

    loader = engine.train_dataloader
    configured = getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or 0
    epochs = engine.config["Global"].get("epochs")
    info = suite_batch_info(loader, getattr(loader, "dataset", None), configured, epochs)
    total = steps_per_epoch * epochs if isinstance(epochs, int) else None
    return BatchInfo(info.per_device, info.world, update_freq, info.dataset_size, steps_per_epoch or None, total,
                     info.measured)


def _staged_save_model(original):
    """PaddleClas's ``save_load.save_model``, its set staged and published as one. With our EMA: ``.pdparams`` hold
    the selected candidate, ``.pdema`` PaddleClas's raw weights plus our state (fingerprinting the ``.pdparams`` and
    ``.pdopt`` beside it), ``best_model`` only when the selected candidate's metric is a new best (a new best that
    PaddleClas's own rule did not save is written at the next save of the same epoch). With the EMA off, a ``.pdema``
    of ours left by an earlier EMA run under the same name is removed with the save."""
    from ema_callback.files.checkpoint_io import atomic_save, checked_load
    from ema_callback.files.checkpoint_set import StagedWrite
    from ema_callback.files.state_file import add_file_companion, fingerprint

    module = sys.modules[original.__module__]

    def staged(stage, model_path, *args, **kwargs):
        """PaddleClas's own save into the staging folder, its log line naming the final folder."""
        own = module.logger
        module.logger = FinalPathLogger(own, stage.tmp, os.path.abspath(model_path).rstrip(os.sep))
        try:
            return original(*args[:3], stage.tmp, *args[3:], **kwargs)
        finally:
            module.logger = own

    def save_model(net, optimizer, metric_info, model_path, ema=None, model_name="", prefix="ppcls", loss=None,
                   save_student_model=False):
        kwargs = dict(model_name=model_name, loss=loss, save_student_model=save_student_model)
        adapter = ema._ema if isinstance(ema, _EMAModule) else None
        if not is_rank0():
            return original(net, optimizer, metric_info, model_path, ema=ema, prefix=prefix, **kwargs)
        if adapter is None:
            stale = _stale_state(model_path, prefix, checked_load)
            if not stale:
                return original(net, optimizer, metric_info, model_path, ema=ema, prefix=prefix, **kwargs)
            return save_without_stale_state(model_path, [prefix], stale, lambda stage: staged(
                stage, model_path, net, optimizer, metric_info, ema=ema, prefix=prefix, **kwargs))
        if prefix == "best_model":
            if adapter.pending is None:  # PaddleClas's rule saves when raw or EMA is a new best; ours did not pick one
                logger.info("EMA: best_model kept: the selected candidate's %s is not a new best (%s)", adapter.key,
                            adapter.best)
                return None
            label, metric_info = adapter.pending
            adapter.pending = None
        else:
            if adapter.pending is not None:  # a new best PaddleClas's own rule did not save
                save_model(net, optimizer, None, model_path, ema, model_name, "best_model", loss, True)
            label = adapter.selected_now()
        held = adapter.held(label)
        raw = {k: v.numpy() for k, v in net.state_dict().items()}  # what PaddleClas writes as .pdema
        if loss is not None:
            raw.update({k: v.numpy() for k, v in loss.state_dict().items()})
        with StagedWrite(model_path) as stage:
            result = staged(stage, model_path, net, optimizer, metric_info, ema=_Held(held), prefix=prefix, **kwargs)
            names = [prefix]
            if prefix == "best_model":  # PaddleClas writes its raw weights there; ours holds the pick, as best_model
                atomic_save(held, stage.path(os.path.join("best_model", "model.pdparams")))
                names.append(os.path.join("best_model", "model"))
            state = ppdet_state(adapter.engine, raw, held, pdparams_hold=label)
            state = add_file_companion(state, ".pdopt", stage.path(prefix + ".pdopt"))
            atomic_save(dict(raw, **{STATE_KEY: state}), stage.path(prefix + ".pdema"))
            sha1 = fingerprint(held)
            stage.record_sets({n: {"hold": label, "sha1": sha1} for n in names})
            stage.publish(last=(prefix + ".pdema",))
        logger.info("EMA: saved %s (%s.pdparams hold %s%s; %s)", os.path.join(model_path, prefix), prefix, label,
                    f", {adapter.key} {metric_info['metric']:.6g} at epoch {metric_info['epoch']}"
                    if prefix == "best_model" else "", adapter.engine.summary())
        return result

    return save_model


def _stale_state(model_path: str, prefix: str, checked_load) -> List[str]:
    """A ``<prefix>.pdema`` of ours (with our state) in ``model_path``: stale once the set is saved with the EMA off."""
    path = os.path.join(model_path, prefix + ".pdema")
    if not os.path.isfile(path):
        return []
    try:
        data = checked_load(path)
    except EMAFileError:
        return []
    return [prefix + ".pdema"] if isinstance(data, dict) and STATE_KEY in data else []


def _wrapped_init_model(original, config: EMAConfig):
    """PaddleClas's ``init_model``; with the EMA off, a resumed checkpoint saved with EMA trains on from its raw
    weights (its ``.pdema``), not from the EMA weights in its ``.pdparams``."""

    def init_model(cfg, net, optimizer=None, loss=None, ema=None):
        result = original(cfg, net, optimizer, loss, ema)
        checkpoints = cfg.get("checkpoints") if hasattr(cfg, "get") else None
        if ema is None and checkpoints and optimizer is not None:
            restore_raw_weights(checkpoints, net, "drop EMA.enable=false (or use -o EMA.enable=true) to continue "
                                "the EMA as well", config=config)
        return result

    return init_model


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    return suite_parser("cls-train", PADDLECLAS, overrides="override")


def resolve_root(explicit: Optional[str]) -> str:
    """The PaddleClas checkout (``suite_checkout.find_checkout``)."""
    return find_checkout(PADDLECLAS, explicit)


def _value(suite: Mapping[str, Any], overrides: List[str], section: str, key: str) -> Any:
    """``<section>.<key>`` after the ``-o`` overrides (read as PaddleClas reads them)."""
    return suite_value(suite, overrides, section, key)


# Paths PaddleClas's datasets open relative to the working directory.
_PATH_KEYS = (("DataLoader", "Train", "dataset", "image_root"), ("DataLoader", "Train", "dataset", "cls_label_path"),
              ("DataLoader", "Eval", "dataset", "image_root"), ("DataLoader", "Eval", "dataset", "cls_label_path"))


def _check_relative_paths(suite: Mapping[str, Any], overrides: List[str], root: str) -> None:
    """A dataset path of the config that does not exist from the working directory: one line naming the key (the
    evaluation set's only when PaddleClas evaluates during training)."""
    values = {".".join(keys): suite_value(suite, overrides, *keys) for keys in _PATH_KEYS}
    evaluates = _value(suite, overrides, "Global", "eval_during_train")
    for key, path in values.items():
        if ".Eval." in key and evaluates is False:
            continue
        if isinstance(path, str) and path and not os.path.exists(path):
            raise EMAConfigError(f"{key}: {path} does not exist from the working directory {os.getcwd()}"
                                 + (f"; PaddleClas opens relative paths from there: run from the folder they are "
                                    f"relative to (PaddleClas's docs: its checkout, cd {root}) or give an absolute "
                                    "path" if not os.path.isabs(path) else ""))


def _check_start_files(checkpoints: Any, pretrained: Any, ema_on: bool) -> None:
    """Every file PaddleClas's loaders will unpickle (``paddle.load``, which runs any code a file names) is read first
    by the bounded, code-free reader: the set of ``Global.checkpoints`` (``.pdparams``, ``.pdopt``, ``.pdstates``,
    ``.pdema``) and ``Global.pretrained_model``; a file that fails is refused in one line before PaddleClas starts (a
    URL is PaddleClas's to download and read)."""
    if isinstance(checkpoints, str) and checkpoints and "://" not in checkpoints:
        prefix = checkpoint_prefix(checkpoints)
        check_checkpoint_files(prefix, (".pdparams", ".pdopt", ".pdstates", ".pdema"), "Global.checkpoints")
        if ema_on and os.path.isfile(prefix + ".pdparams") and not os.path.isfile(prefix + ".pdema"):
            raise EMAFileError(f"Global.checkpoints: {prefix}.pdema is missing; PaddleClas resumes a run with an EMA "
                               "from it (the raw weights; the .pdparams hold the EMA weights): restore it, or resume "
                               "with -o EMA.enable=false")
    if isinstance(pretrained, str) and pretrained and "://" not in pretrained:
        check_checkpoint_files(checkpoint_prefix(pretrained), (".pdparams",), "Global.pretrained_model")
        describe_start_weights(pretrained, "Global.pretrained_model")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ema_callback import paddle_compat  # noqa: F401  (the supported-range check; binds zlib before the suite imports paddle)
    root = resolve_root(args.paddleclas_root)
    suite, config, wanted, suite_overrides = read_run_config(args.config, args.ema_config, args.override,
                                                             PADDLECLAS.name, resolve_cls_config)
    _check_relative_paths(suite, suite_overrides, root)
    checkpoints = _value(suite, suite_overrides, "Global", "checkpoints")
    _check_start_files(checkpoints, _value(suite, suite_overrides, "Global", "pretrained_model"), config.enable)
    save_dir = _value(suite, suite_overrides, "Global", "output_dir") or "./output/"
    import_from_checkout(root, "ppcls.engine.engine", os.path.join("ppcls", "engine", "engine.py"), PADDLECLAS.option)
    script_args = ["-c", args.config]
    for text in suite_overrides:
        script_args += ["-o", text]
    if args.profiler_options:
        script_args += ["-p", args.profiler_options]
    locks = lock_run(save_dir)  # with the EMA off too: its saves may remove an earlier EMA run's .pdema
    try:
        run_suite_script(root, os.path.join("tools", "train.py"), script_args,
                         [_seams_installed(config, wanted, checkpoints)], PADDLECLAS.name)
        return 0
    finally:
        release_all(locks)


@contextlib.contextmanager
def _seams_installed(config: EMAConfig, wanted: bool, checkpoints: Any):
    """PaddleClas's ``Engine`` (ours when an EMA was asked for), ``init_model`` and ``save_model`` for the run, put
    back after."""
    import ppcls.engine.engine as engine_module
    import ppcls.utils.save_load as save_load

    saved = (engine_module.Engine, engine_module.init_model, save_load.save_model)
    try:
        if wanted:
            engine_module.Engine = _make_engine_class(saved[0], config, config.to_block() if config.enable else None,
                                                      checkpoints)
        engine_module.init_model = _wrapped_init_model(saved[1], config)
        save_load.save_model = _staged_save_model(saved[2])
        yield
    finally:
        engine_module.Engine, engine_module.init_model, save_load.save_model = saved


class PaddleClasAdapter(SuiteAdapter):
    """PaddleClas's answers to the shared layer (``suite_adapter``)."""

    suite = PADDLECLAS

    def eval_weights_option(self, prefix: str) -> str:
        return f"Global.pretrained_model={prefix}"

    def eval_options(self, options) -> List[str]:
        return [part for option in options for part in ("-o", option)]  # PaddleClas's tools: one option per -o

    def install_eval_check(self, check) -> None:
        import ppcls.engine.engine as engine_module

        original = engine_module.load_dygraph_pretrain

        def load_dygraph_pretrain(model, *args, **kwargs):  # the Engine passes [model, loss]
            check(model[0] if isinstance(model, (list, tuple)) else model)
            return original(model, *args, **kwargs)

        engine_module.load_dygraph_pretrain = load_dygraph_pretrain  # the name tools/eval.py's Engine calls

    def eval_metric(self, log: str, wanted: Optional[str]) -> Tuple[float, str]:
        """The last ``[Eval][Epoch N][Avg]name: value, ...`` line of tools/eval.py's output: ``wanted``, else
        ``top1`` where it is there, else its first metric."""
        lines = re.findall(r"\[Eval\]\[Epoch \d+\]\[Avg\](.*)$", log, re.M)
        if not lines:
            raise EMAConfigError("tools/eval.py: no [Eval]...[Avg] line in its output")
        values = dict(re.findall(r"(\w+): ([-\d.e]+)", lines[-1]))
        name = wanted or ("top1" if "top1" in values else next(iter(values), ""))
        if name not in values:
            raise EMAConfigError(f"--metric {name}: not among {', '.join(values)}")
        return float(values[name]), name


ADAPTER = PaddleClasAdapter()
