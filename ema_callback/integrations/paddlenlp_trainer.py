"""``EMATrainerCallback``: the EMA engine in PaddleNLP's ``paddlenlp.trainer.Trainer`` (``ema-callback[nlp]``).

    trainer = Trainer(model=model, args=args, ..., callbacks=[EMATrainerCallback(half_life_images=4000, eval_raw=True)])
    trainer.train()            # evaluations run on the EMA weights; checkpoint-N/model_state.pdparams hold them
    trainer.save_model()       # after train() the model holds the EMA weights (final_weights='ema')

The same engine and ``EMA:`` block as the other ways in (``docs/paddlenlp.md``). How the Trainer's events are used
(PaddleNLP 2.8: ``trainer.py``'s ``_inner_training_loop`` and ``_maybe_log_save_evaluate``):

* ``on_train_begin`` (after the Trainer created the optimizer and loaded ``resume_from_checkpoint``): the engine is
  built over ``trainer.model`` with the optimizer (AMP O2 master weights are averaged), the global batch is
  ``per_device_train_batch_size x world x gradient_accumulation_steps``; a resumed ``checkpoint-N`` with a
  ``model_state.pdema`` continues the EMA from it and puts its raw weights back into the model (the Trainer has just
  loaded the ``.pdparams``, which hold EMA weights).
* ``on_optimizer_end``: one EMA step per real optimizer update (the Trainer calls it once per
  ``gradient_accumulation_steps`` batches); a step the AMP GradScaler skipped for inf/nan (``scaler._cache_found_inf``)
  is not an update.
* ``on_step_end`` / ``on_epoch_end`` with ``control.should_evaluate`` or ``control.should_save`` set (by
  ``DefaultFlowCallback``, which runs before this callback): the EMA weights go into the model, so the Trainer's
  evaluation, its best-model bookkeeping and ``checkpoint-N/model_state.pdparams`` are the EMA's. Before
  ``eval_start_step`` optimizer steps the raw weights stay in.
* ``on_evaluate(metrics)``: with ``eval_raw`` / several EMAs, the other candidates are evaluated with the Trainer's own
  ``evaluation_loop`` (no ``on_evaluate``/``on_log`` for them) and added to the metrics dict the Trainer returns,
  saves and logged (``eval_f1_raw``, ``eval_f1_<label>``; the last ``state.log_history`` entry gains them too) with
  ``ema_drift``. Without a save pending the raw weights go back now.
* ``on_save``: ``checkpoint-N/model_state.pdema`` (EMA state, its counters and the raw weights, rank 0, atomic)
  beside the ``model_state.pdparams`` the Trainer just wrote; then the raw weights go back.
* ``on_step_begin`` / ``on_optimizer_begin`` / ``on_epoch_begin``: the raw weights are in the model before any
  forward pass or optimizer update, whatever happened in between.
* ``on_train_end``: with ``load_best_model_at_end`` and a best checkpoint, the model keeps what the Trainer loaded:
  that checkpoint's ``model_state.pdparams``, i.e. the EMA weights that produced the best metric (the weights the
  metric was measured on). Otherwise, with ``final_weights='ema'`` (default), the EMA weights go into the model so
  that ``trainer.save_model()`` / ``paddle.jit`` export write them; ``<output_dir>/model_state.pdema`` (raw weights and
  EMA state) is written beside where ``trainer.save_model()`` writes by default.
* A direct ``trainer.evaluate()`` after ``train()`` evaluates what the model holds (the EMA weights), with ``eval_raw``
  the raw metrics beside.

The Trainer's class and instance are not modified; options that cannot act here are refused in one line at start-up.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np

from ema_callback.config.schema import EMAConfig, EMAConfigError
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.core.horizon import BatchInfo
from ema_callback.core.run_report import log_before_eval, log_start
from ema_callback.integrations.auto_length import AutoPick, saved_plan
from ema_callback.integrations.auto_length import resolve as resolve_length
from ema_callback.integrations.candidate_eval import Measured, evaluate_candidates
from ema_callback.integrations.candidates import RAW, CandidateBoard, metric_value
from ema_callback.integrations.checkpoints import (
    is_rank0,
    numpy_state,
    place_features,
    restore_raw_weights,
    resume_ema,
    save_ema_state,
)
from ema_callback.integrations.evaluation import DRIFT, RAW_SUFFIX, EvaluationPolicy

try:
    from paddlenlp.trainer import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ema_callback.integrations.paddlenlp_trainer needs PaddleNLP: pip install 'ema-callback[nlp]' "
                      f"(paddlenlp==2.8.1 and its pins); importing it failed: {exc}") from exc

logger = logging.getLogger("ema_callback")

WEIGHTS = "model_state"  # the Trainer's weights file is <checkpoint>/model_state.pdparams (PADDLE_WEIGHTS_NAME)
REFUSED = {  # EMA: keys this way in cannot act on, with why (one line at start-up)
    "recompute_bn": "BatchNorm statistics are recomputed from a suite's training batches; the Trainer way in does "
                    "not record them (transformers use LayerNorm)",
}


def _measure(trainer, prefix: str = "eval", description: str = "Evaluation") -> Callable[[], Measured]:
    """The Trainer's ``evaluation_loop`` on its eval dataloader (no ``on_evaluate``), of the model as it is: its metrics
    (``compute_metrics`` gives no per-example counts, so no units), as ``candidate_eval`` takes it."""
    def measure() -> Measured:
        output = trainer.evaluation_loop(trainer.get_eval_dataloader(), description=description,
                                         prediction_loss_only=True if trainer.compute_metrics is None else None,
                                         metric_key_prefix=prefix, max_eval_iters=trainer.args.max_evaluate_steps)
        return dict(output.metrics), None

    return measure


def _trainer_in_stack():
    """The ``Trainer`` whose training loop is running (the ``self`` of ``_inner_training_loop`` up the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and "self" in frame.f_locals:
            return frame.f_locals["self"], frame.f_locals.get("resume_from_checkpoint")
        frame = frame.f_back
    return None, None


class EMATrainerCallback(TrainerCallback):
    """EMA of ``trainer.model`` during ``Trainer.train``; evaluations and checkpoints hold the EMA weights.

    Args:
        config: an ``EMAConfig`` or an ``EMA:`` mapping; keyword arguments (any key of the ``EMA:`` block) override it.
            No length stated means ``length: auto``: the default length (sigma_rel 0.10 of the run) during training,
            post-hoc profiles beside it, and at the end of ``train()`` the candidates evaluated on the Trainer's eval
            data by ``metric_for_best_model`` (else the loss) pick what the model ends on (``ema_auto.json`` in
            ``output_dir``); it needs an ``eval_dataset`` and is refused with ``load_best_model_at_end``.
            ``select: best`` (with ``eval_raw`` or several EMAs): at each evaluation the one rule's pick among the
            candidates is what the checkpoint holds and what its plain metric names report. ``recompute_bn`` is
            refused at start-up.
        final_weights: ``"ema"`` (default): after ``train()`` the model holds the EMA weights (unless
            ``load_best_model_at_end`` loaded a best checkpoint, which holds the EMA weights evaluated there);
            ``"raw"``: the raw weights.
        backend: the engine's store (``auto``, ``numpy``, ``paddle``, ``reference``).
    """

    def __init__(self, config: Union[EMAConfig, Mapping[str, Any], None] = None, *, final_weights: str = "ema",
                 backend: str = "auto", **kwargs: Any):
        super().__init__()
        base = config if isinstance(config, EMAConfig) else EMAConfig.from_block(config)
        self.config = base.replace(**kwargs) if kwargs else base
        if final_weights not in ("ema", "raw"):
            raise EMAConfigError(f"final_weights: expected 'ema' or 'raw', got {final_weights!r}")
        self.final_weights, self.backend = final_weights, backend
        self._check_config(config, kwargs)
        self.ema: Optional[ExponentialMovingAverage] = None
        self.board: Optional[CandidateBoard] = None
        self.trainer = None
        self.batch: Optional[BatchInfo] = None
        self.resumed_from: Optional[str] = None
        self._policy = EvaluationPolicy(self.config)
        self._scheduled = False  # the EMA weights were put in for the Trainer's pending evaluation/save
        self._in_train = False
        self._inner_eval = False
        self._drift: Optional[float] = None
        self.auto: Optional[AutoPick] = None  # length: auto, once the engine is built
        self._selected: Optional[str] = None  # the candidate the latest evaluation selected

    def _check_config(self, config, kwargs) -> None:
        from ema_callback.integrations.auto_length import has_length

        if not isinstance(config, EMAConfig) and not has_length(dict(config or {}, **kwargs)):
            self.config = self.config.replace(length="auto")  # no length stated: picked at the end of the run
        for key, why in REFUSED.items():
            if getattr(self.config, key):
                raise EMAConfigError(f"EMA.{key}: not available in the PaddleNLP Trainer way in: {why}")

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        trainer, resume = _trainer_in_stack()
        self._check_order(trainer)
        self.trainer = trainer
        resume = _resumed_checkpoint(args, state, resume)
        if self.config.enable:
            _check_checkpoint_layout(args, model)
        if not self.config.enable:
            logger.info("EMA: off for this run (EMATrainerCallback enable=False)")
            if resume:
                restore_raw_weights(os.path.join(resume, WEIGHTS), model,
                                    "pass enable=True to continue the EMA as well",
                                    config=self.config)
            return
        world = max(1, int(getattr(args, "dataset_world_size", 1) or 1))
        accumulate = int(args.gradient_accumulation_steps)
        per_epoch = None
        loader = kwargs.get("train_dataloader")
        if loader is not None and hasattr(loader, "__len__"):
            per_epoch = max(1, len(loader) // accumulate)
        dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
        self.batch = BatchInfo(args.per_device_train_batch_size, world, accumulate,
                               len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None,
                               per_epoch, int(state.max_steps) if state.max_steps else None,
                               "per_device_train_batch_size")
        higher = _higher_is_better(args)
        engine_config, plan = self.config, None
        if self.config.auto:
            self._check_auto(args, trainer)
            engine_config, plan = resolve_length(self.config, self.batch, args.output_dir, resumed=saved_plan(
                os.path.join(resume, WEIGHTS + ".pdema") if resume else None))
        self.ema = ExponentialMovingAverage(model, engine_config, optimizer=optimizer, backend=self.backend,
                                            batch=self.batch)
        self.board = CandidateBoard(self.ema, engine_config, higher_is_better=higher)
        place_features(self.ema, args.output_dir, only_rank0_evaluates=False)
        log_start(self.ema)
        if self.board.active:
            self._check_candidates(trainer)
        if plan is not None:  # every rank evaluates together (the Trainer's evaluation gathers across ranks)
            self.auto = AutoPick(self.ema, plan, higher, every_rank=True)
            logger.info("EMA: %s", plan.describe(sum(int(np.prod(e.tensor.shape)) for e in self.ema.averaged_entries)))
        if resume:
            self.resumed_from = resume
            resume_ema(self.ema, os.path.join(resume, WEIGHTS), model)
        self._in_train = True
        self._scheduled = False

    def _check_candidates(self, trainer) -> None:
        """``eval_raw`` / several EMAs evaluate the other candidates with the Trainer's own evaluation: it must be
        found, with one eval dataset."""
        if trainer is None:
            raise EMAConfigError("EMA.eval_raw / several EMAs: the Trainer running this callback was not found "
                                 "(Trainer._inner_training_loop), so the other candidates cannot be evaluated; drop "
                                 "eval_raw and keep one length")
        if isinstance(getattr(trainer, "eval_dataset", None), dict):
            raise EMAConfigError("EMA.eval_raw / several EMAs: the Trainer has a dict of eval datasets; the other "
                                 "candidates are evaluated on one: pass a single eval_dataset, or drop eval_raw and "
                                 "keep one length")

    def _check_auto(self, args, trainer) -> None:
        """``length: auto`` picks the final weights by evaluating candidates at the end of ``train()``: it needs the
        Trainer's eval data, and two rules choosing the final weights (with ``load_best_model_at_end``) are refused."""
        if trainer is None or getattr(trainer, "eval_dataset", None) is None:
            raise EMAConfigError("EMA.length: auto (no length stated) compares lengths on the Trainer's eval_dataset, "
                                 "and this Trainer has none; give eval_dataset or state a length (half_life_images, "
                                 "half_life_epochs, decay, decays)")
        if isinstance(trainer.eval_dataset, dict):
            raise EMAConfigError("EMA.length: auto (no length stated) compares lengths on one eval dataset, and this "
                                 "Trainer has a dict of them; pass a single eval_dataset or state a length")
        if args.load_best_model_at_end:
            raise EMAConfigError("EMA.length: auto (no length stated) with load_best_model_at_end: both choose the "
                                 "weights train() ends on; state a length (half_life_images, half_life_epochs, decay, "
                                 "decays) or drop load_best_model_at_end")

    def _check_order(self, trainer) -> None:
        """This callback must run after ``DefaultFlowCallback`` (which sets ``should_evaluate``/``should_save``)."""
        if trainer is None:
            return
        names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
        mine = [i for i, c in enumerate(trainer.callback_handler.callbacks) if c is self]
        if sum(isinstance(c, EMATrainerCallback) for c in trainer.callback_handler.callbacks) > 1:
            raise EMAConfigError("EMATrainerCallback: two in one Trainer; one keeps several EMAs: decays=[...] or "
                                 "half_life_images=[...]")
        if "DefaultFlowCallback" in names and mine and names.index("DefaultFlowCallback") > mine[0]:
            raise EMAConfigError("EMATrainerCallback must come after DefaultFlowCallback in the Trainer's callbacks "
                                 "(pass it in Trainer(callbacks=[...]) or trainer.add_callback)")

    # ------------------------------------------------------------------ training events
    def _restore_raw(self) -> None:
        if self.ema is not None and self.ema.applied:
            self.ema.restore(self.ema.model)
        self._scheduled = False

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self._restore_raw()

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._restore_raw()

    def on_optimizer_begin(self, args, state, control, **kwargs) -> None:
        self._restore_raw()

    def on_optimizer_end(self, args, state, control, scaler=None, **kwargs) -> None:
        if self.ema is None or not self._in_train:
            return
        found_inf = None
        if scaler is not None:  # the Trainer reads the same flag to decide optimizer_was_run
            found_inf = getattr(scaler, "_cache_founf_inf", getattr(scaler, "_cache_found_inf", None))
        self.ema.step(found_inf=found_inf)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._before_trainer_eval_or_save(control)

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        self._before_trainer_eval_or_save(control)

    def _before_trainer_eval_or_save(self, control) -> None:
        """The Trainer evaluates and/or saves next (``_maybe_log_save_evaluate``): the EMA weights go in."""
        if self.ema is None or not self._in_train or not (control.should_evaluate or control.should_save):
            return
        self._restore_raw()
        if self._policy.raw_weights_now(self.ema):
            return
        if self.config.save_as == "raw" and not control.should_evaluate:
            return  # save_as: raw: the checkpoint's .pdparams keep the raw weights, the EMA goes beside
        if control.should_evaluate:
            self._drift = log_before_eval(self.ema)
        self.ema.apply_to(self.ema.model, self.board.primary)
        self._scheduled = True

    # ------------------------------------------------------------------ evaluation
    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        if self.ema is None or self._inner_eval or metrics is None:
            return
        if self._in_train and not self._scheduled and not self._policy.raw_weights_now(self.ema):
            logger.warning("EMA: trainer.evaluate() called during training outside the Trainer's own evaluation: "
                           "it evaluated the raw weights")
            return
        held = self.ema.applied_label or RAW
        labels = [label for label in self.board.to_evaluate() if label != held]
        prefix = _prefix_of(metrics)
        results = {held: {k: v for k, v in metrics.items() if k.startswith(prefix + "_")}}
        added: Dict[str, Any] = {}
        if self._in_train and held == RAW and self._policy.raw_weights_now(self.ema):
            labels = []  # before eval_start_step the raw weights are evaluated and saved; with eval_raw also as _raw
            if self.config.eval_raw:
                added.update({k + RAW_SUFFIX: v for k, v in results[held].items() if _is_metric(k, prefix)})
        if self.ema.applied and self._in_train:
            added[DRIFT] = float(self._drift if self._drift is not None else self.ema.drift())
        if labels and (self.board.active or not self._in_train):
            network, back = self.ema.model, self.ema.applied_label
            # a length rebuilt from the snapshots (length auto's pick) is no shadow: its values go back as they were
            back_values = numpy_state(network) if back is not None and back not in self.ema.labels else None
            if self.ema.applied:
                self.ema.restore(network)
            self._inner_eval = True
            try:
                others, _ = evaluate_candidates(labels, lambda label: self.board.weights(label, network),
                                                _measure(self.trainer, prefix))
            finally:
                self._inner_eval = False
                if back_values is not None:
                    self.ema.apply_values(network, back_values, back)
                elif back is not None:
                    self.ema.apply_to(network, back)
            results.update(others)
            for label, values in others.items():
                suffix = RAW_SUFFIX if label == RAW else "_" + label
                added.update({k + suffix: v for k, v in values.items() if _is_metric(k, prefix)})
            if (self.board.several or self.config.select == "best") and held != RAW:
                added.update({k + "_" + held: v for k, v in results[held].items() if _is_metric(k, prefix)})
            logger.info("EMA: evaluation at optimizer step %d: %s", self.ema.num_steps,
                        ", ".join(f"{k} {v:.6g}" for k, v in sorted(added.items()) if metric_value(v) is not None))
        key = _main_metric(args, prefix, results[held])
        chosen = held
        if self._in_train and self.config.select == "best" and len(results) > 1:
            chosen = self._select_best(results, key, held)
            added.update({k: v for k, v in results[chosen].items() if _is_metric(k, prefix)})  # plain names
        last = dict(state.log_history[-1]) if state.log_history else {}
        metrics.update(added)  # the dict evaluate() returns and _save_checkpoint reads
        if added and last and all(last.get(k) == v for k, v in results[held].items() if _is_metric(k, prefix)):
            state.log_history[-1].update(added)  # the entry Trainer.log just made of these metrics
        if self._in_train:
            self.board.record(self.ema.num_steps, results, key, chosen)
            self._selected = chosen
            if not control.should_save or self.config.save_as == "raw":
                self._restore_raw()

    def _select_best(self, results: Mapping[str, Mapping[str, Any]], key: str, held: str) -> str:
        """``select: best``: the one rule's pick among the evaluated candidates (``CandidateBoard.pick``: the primary
        unless another beats it by more than 2 standard errors of the validation noise); its weights go into the model
        for the checkpoint the Trainer saves next, and its metrics take the plain names (what
        ``metric_for_best_model`` compares), so the best checkpoint holds the weights its metric was measured on."""
        try:
            chosen = self.board.pick(results, key)
        except KeyError as exc:
            raise EMAConfigError(f"EMA.select: best (metric_for_best_model): {exc.args[0]}") from None
        if chosen != held:
            if self.ema.applied:
                self.ema.restore(self.ema.model)
            if chosen != RAW:
                self.ema.apply_to(self.ema.model, chosen)
            self._scheduled = True
            logger.info("EMA: select: best -> %s at optimizer step %d (%s %.6g against the primary's %.6g)", chosen,
                        self.ema.num_steps, key, metric_value(results[chosen].get(key)) or float("nan"),
                        metric_value(results[held].get(key)) or float("nan"))
        return chosen

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, **kwargs) -> None:
        if self.ema is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if is_rank0() and os.path.isfile(os.path.join(folder, WEIGHTS + ".pdparams")):
            self.save_state(folder)
        self._restore_raw()

    def save_state(self, folder: str) -> str:
        """Write ``<folder>/model_state.pdema``: the EMA state, its counters and the raw weights, beside the
        ``model_state.pdparams`` that hold what the model holds now (rank 0 calls it). Returns its path."""
        network = self.ema.model
        held = numpy_state(network)
        raw = dict(held)
        if self.ema.applied:
            raw.update(self.ema.backup_numpy())
        label = self.ema.applied_label or RAW
        if self.config.save_as == "raw":  # .pdparams: raw; .ema.pdparams: the candidate last selected (or the primary)
            label = self._selected if self._selected not in (None, RAW) else self.board.primary
        save_ema_state(self.ema, [os.path.join(folder, WEIGHTS)], network, raw, held, save_as=self.config.save_as,
                       candidate=label if self.board is not None and self.board.active else None)
        return os.path.join(folder, WEIGHTS + ".pdema")

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        if self.ema is None:
            return
        self._restore_raw()
        self._in_train = False
        if self.ema.num_updates == 0:
            logger.warning("EMA: no EMA update happened during training (%d optimizer steps, start_step=%d)",
                           self.ema.num_steps, self.config.start_step)
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if self.auto is not None:
            self._pick_length(args)
            self._save_final_state(args.output_dir)
        elif best is not None:
            logger.info("EMA: load_best_model_at_end: the model holds %s/%s.pdparams as the Trainer loaded it (the "
                        "weights evaluated there: the EMA's from eval_start_step on); the raw weights of that step "
                        "are in its %s.pdema", best, WEIGHTS, WEIGHTS)
        elif self.final_weights == "ema":
            self.ema.apply_to(self.ema.model, self.board.primary)
            path = self._save_final_state(args.output_dir)
            if path is not None:
                logger.info("EMA: after train() the model holds the EMA weights (%s); trainer.save_model() writes "
                            "them, the raw weights and EMA state are in %s", self.board.primary, path)
        if self.board is not None:
            self.board.finish(args.output_dir, write=is_rank0())
        self.ema.close()  # the model as it was found: no feature's hook stays on it

    def _save_final_state(self, output_dir: str) -> Optional[str]:
        """``<output_dir>/model_state.pdema`` after ``train()`` (rank 0): the EMA state and the raw weights (the
        model's own, or those set aside while it holds an EMA), beside what ``trainer.save_model()`` writes."""
        if not is_rank0():
            return None
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, WEIGHTS + ".pdema")
        raw = self.ema.backup_numpy() if self.ema.applied else numpy_state(self.ema.model)
        self.ema.save(path, extra={"raw_weights": raw})
        return path

    def _pick_length(self, args) -> None:
        """``length: auto`` at the end of ``train()`` (``auto_length``): the candidates evaluated with the Trainer's
        ``evaluation_loop`` (``candidate_eval``) on its eval data, compared by ``metric_for_best_model`` (else
        the loss) with the one rule (the default unless another beats it by more than 2 standard errors of its
        validation noise); with ``final_weights='ema'`` the pick goes into the model (so ``save_model`` writes it)."""
        auto = self.auto
        key = _main_metric(args, "eval", {})
        auto.metric = key

        self._inner_eval = True
        try:
            label = auto.run(_measure(self.trainer, description="Evaluation (EMA length auto)"), self.ema.model,
                             trend_noise=self.board.noises((auto.default, RAW))).label
        finally:
            self._inner_eval = False
        if is_rank0():
            auto.write(args.output_dir)
        if self.final_weights == "ema" and label != RAW:
            if label == auto.default:
                self.ema.apply_to(self.ema.model)
            else:
                self.ema.apply_values(self.ema.model, auto.values(label, self.ema.model), label)
        auto.close()


def _check_checkpoint_layout(args, model) -> None:
    """The checkpoints this way in writes beside: ``checkpoint-N/model_state.pdparams`` of a whole model. Unified or
    sharded checkpoints and LoRA/prefix models save otherwise: refused in one line, not left without EMA state."""
    if getattr(args, "unified_checkpoint", False):
        raise EMAConfigError("EMATrainerCallback: unified_checkpoint is not supported (its weights are not "
                             "checkpoint-N/model_state.pdparams, so the EMA state has no place beside them); set "
                             "unified_checkpoint=False")
    if getattr(args, "should_save_sharding_stage1_model", False) or getattr(args, "use_hybrid_parallel", False):
        raise EMAConfigError("EMATrainerCallback: sharding / tensor / pipeline parallel runs are not supported (each "
                             "rank holds part of the weights); data parallel is")
    if type(model).__name__ in ("LoRAModel", "PrefixModelForCausalLM"):
        raise EMAConfigError(f"EMATrainerCallback: a {type(model).__name__} saves its adapter weights only; not "
                             "supported")


def _resumed_checkpoint(args, state, resume) -> Optional[str]:
    """The checkpoint folder this ``train()`` resumed: the path given (``True``: the last ``checkpoint-N`` of
    ``output_dir``, as the Trainer finds it); a run that starts at ``global_step > 0`` with no path known uses
    ``output_dir/checkpoint-<global_step>``, and without one is refused (its weights may be EMA weights)."""
    if resume is True:
        from paddlenlp.trainer.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    if isinstance(resume, str) and resume:
        return resume
    if state.global_step > 0:
        guess = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(guess):
            return guess
        raise EMAConfigError(f"EMATrainerCallback: training resumes at step {state.global_step}, but the checkpoint it "
                             "was loaded from is not known (Trainer._inner_training_loop not found); pass "
                             "resume_from_checkpoint=<checkpoint-N folder> to train()")
    return None


def _higher_is_better(args) -> bool:
    """The Trainer's own direction: ``greater_is_better`` (which it sets from ``metric_for_best_model``: False for a
    loss); without a metric the loss is compared, lower is better."""
    if getattr(args, "metric_for_best_model", None) is None:
        return False
    return getattr(args, "greater_is_better", True) is not False


def _prefix_of(metrics: Mapping[str, Any]) -> str:
    """The Trainer's ``metric_key_prefix`` (``eval``, or ``eval_<name>`` for a dict of eval datasets)."""
    for key in metrics:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval"


def _is_metric(key: str, prefix: str) -> bool:
    """A metric of the evaluation (not its timing entries or our drift)."""
    return key.startswith(prefix + "_") and not key.endswith(("_runtime", "_samples_per_second",
                                                               "_steps_per_second")) and key != DRIFT


def _main_metric(args, prefix: str, metrics: Mapping[str, Any]) -> str:
    """``metric_for_best_model`` (with the ``eval_`` prefix), else the loss."""
    name = getattr(args, "metric_for_best_model", None) or "loss"
    key = name if name.startswith(prefix + "_") else f"{prefix}_{name}"
    return key if key in metrics else next((k for k in metrics if _is_metric(k, prefix)), key)
