"""``EMACallback``: the EMA engine in ``paddle.Model.fit``.

    model.fit(train, eval, callbacks=[EMACallback(decay=0.999)])

Ordering contract (holds wherever the callback stands in the list):

* Every ``on_eval_end`` of every callback sees the EMA weights in the network, i.e. the weights that
  produced the logged metrics: ``EarlyStopping(save_best_model=True)`` saves what it measured. The raw
  weights are put back at the next training event (``on_epoch_begin``/``on_train_batch_begin``/
  ``on_train_end``), before any optimizer step.
* ``ModelCheckpoint`` saves at ``on_epoch_end``, before evaluation: its ``{epoch}.pdparams`` hold the raw
  weights. Every ``Model.save(path)`` during and after ``fit`` also writes ``path.pdema`` (EMA state, its
  update count and the raw weights), on rank 0 only, atomically.
* The EMA steps once per *real* optimizer update, counted on the optimizer itself: once per
  ``accumulate_grad_batches`` batches (and at an epoch's last batch), never for a step the AMP
  GradScaler skipped for inf/nan.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from ..config import SECTION, EMAConfig, EMAConfigError
from ..errors import EMAError
from ..config_files import check_section_name, read_yaml
from ..paddle_compat import paddle
from ..engine import ExponentialMovingAverage
from .checkpoints import is_rank0, numpy_state, restore_raw_weights, resume_ema, save_ema_state
from .evaluation import DRIFT, RAW_SUFFIX, EvaluationPolicy, raw_suffixed
from ..checkpoint_io import StagedWrite, checked_load
from ..state_file import read_state
from ..optimizer_steps import OptimizerStepCounter

logger = logging.getLogger("ema_callback")

class EMACallback(paddle.callbacks.Callback):
    """EMA of ``model.network`` during ``Model.fit``; evaluation runs on the EMA weights.

    Args:
        config: an ``EMAConfig`` or an ``EMA:`` mapping; keyword arguments (``decay=0.999``, ``eval_raw=True``,
            any key of the ``EMA:`` block) override it.
        resume: a ``.pdema`` file (or a checkpoint prefix ``dir/3`` with ``dir/3.pdema`` beside it) to
            continue from, including the update count and the raw weights; ``"auto"`` (the default when
            ``save_dir`` is given) picks the ``.pdema`` in ``save_dir`` whose raw or EMA weights equal the
            network's (the checkpoint just passed to ``Model.load``).
        save_dir: the ``save_dir`` given to ``fit``, for ``resume="auto"``.
        final_weights: ``"ema"`` (default) leaves the EMA weights in the network after ``fit``, so
            ``model.save``/``model.evaluate``/``model.predict`` use them; ``"raw"`` leaves the raw weights.
        backend: the engine's store (``auto``, ``numpy``, ``paddle``, ``reference``; see the engine);
            ``update_path`` is its former name, still accepted.
    """

    def __init__(self, config: Union[EMAConfig, Mapping[str, Any], None] = None, *, resume: Optional[str] = None,
                 save_dir: Optional[str] = None, final_weights: str = "ema", backend: str = "auto",
                 update_path: Optional[str] = None,
                 **kwargs: Any):
        super().__init__()
        base = config if isinstance(config, EMAConfig) else EMAConfig.from_block(config)
        self.config = base.replace(**kwargs) if kwargs else base
        if final_weights not in ("ema", "raw"):
            raise EMAConfigError(f"final_weights: expected 'ema' or 'raw', got {final_weights!r}")
        self.final_weights = final_weights
        self.save_dir = save_dir
        self.resume = resume if resume is not None else ("auto" if save_dir else None)
        self.backend = update_path or backend
        self.ema: Optional[ExponentialMovingAverage] = None
        self.extra_logs: Dict[str, Any] = {}  # added to the evaluation logs: <metric>_raw, ema_drift
        self._raw_copies_metrics = False  # raw-weight evaluation (before eval_start_step): <metric>_raw = <metric>
        self._pending_updates: list = []  # found_inf flags of optimizer updates counted in train_batch, not yet averaged
        self._in_fit = False
        self._policy = EvaluationPolicy(self.config)
        self._told_off = False

    @classmethod
    def from_config(cls, source: Union[EMAConfig, Mapping[str, Any], str], **kwargs: Any) -> "EMACallback":
        """From an ``EMAConfig``, an ``EMA:`` mapping, or a YAML file with a top-level ``EMA:`` section."""
        if isinstance(source, str):
            data = read_yaml(source)
            check_section_name(data, source)
            if not isinstance(data, Mapping) or SECTION not in data:
                raise EMAConfigError(f"{source}: expected a YAML file with a top-level '{SECTION}:' section")
            source = data[SECTION] or {}
        return cls(source, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def network(self) -> paddle.nn.Layer:
        return self.model.network

    def _build_engine(self) -> None:
        if not paddle.in_dynamic_mode():
            raise RuntimeError("EMACallback needs dynamic-graph mode: the model was prepared under "
                               "paddle.enable_static(); call paddle.disable_static() before building paddle.Model")
        self.ema = ExponentialMovingAverage(self.network, self.config, optimizer=getattr(self.model, "_optimizer", None),
                                            backend=self.backend)
        self._install_save_hook()
        if self.resume:
            self._resume(self.resume)

    def _resume_file(self, where: str) -> Optional[str]:
        return self._find_resume_file() if where == "auto" else where

    def _resume(self, where: str) -> None:
        path = self._resume_file(where)
        if path is not None:
            resume_ema(self.ema, path, self.network)

    def _find_resume_file(self) -> Optional[str]:
        """The ``.pdema`` in ``save_dir`` whose ``.pdparams`` or raw weights equal the network's current weights
        (the checkpoint just passed to ``Model.load``), newest first; files are read with the restricted loader."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return None
        current = numpy_state(self.network)

        def holds_current(weights) -> bool:
            return isinstance(weights, dict) and set(weights) == set(current) and all(
                np.array_equal(np.asarray(weights[k]), current[k]) for k in current)

        for path in sorted(glob.glob(os.path.join(self.save_dir, "*.pdema")), key=os.path.getmtime, reverse=True):
            params = path[: -len(".pdema")] + ".pdparams"
            try:  # the .pdparams first (what Model.load read); the .pdema's raw weights only if they differ
                if (os.path.exists(params) and holds_current(checked_load(params))) or \
                        holds_current(read_state(path).get("raw_weights")):
                    return path
            except EMAError:
                continue
        return None

    def _install_save_hook(self) -> None:
        """Every ``Model.save(path)`` (training=True) also writes ``path.pdema``; the whole set is staged."""
        model = self.model
        if getattr(model.save, "_ema_callback", None) is self:
            return
        original = getattr(model.save, "__wrapped__", model.save)

        def save(path, training=True):
            if not training:
                return original(path, training)
            folder, name = os.path.split(os.path.abspath(path))
            with StagedWrite(folder) as stage:  # every file complete before it gets its final name
                result = original(stage.path(name), training)
                if self.ema is not None and is_rank0():  # .pdparams hold what the network holds now
                    save_ema_state(self.ema, [stage.path(name)], self.network, self.raw_state_dict(),
                                   numpy_state(self.network))
                stage.publish(last=(name + ".pdema",))
            return result

        save._ema_callback = self
        save.__wrapped__ = original
        model.save = save

    def raw_state_dict(self) -> Dict[str, np.ndarray]:
        """The raw (trained) weights, whether or not the EMA weights are currently in the network."""
        live = {k: v.numpy() for k, v in self.network.state_dict().items()}
        if self.ema is not None and self.ema.applied:
            live.update(self.ema.backup_numpy())
        return live

    def save_state(self, path: str) -> None:
        """Write the EMA state, its update count and the raw weights to ``path`` (atomic, self-contained)."""
        self.ema.save(path, extra={"raw_weights": self.raw_state_dict()})

    def _restore_raw(self) -> None:
        if self.ema is not None and self.ema.applied:
            self.ema.restore(self.network)

    def _install_batch_hook(self) -> None:
        """Count real optimizer updates during each ``Model.train_batch`` call only (where fit steps the optimizer):
        its ``step``/``minimize`` are wrapped for that call and put back in ``finally``, so a ``fit`` that raises
        anywhere leaves the optimizer's methods as they were."""
        model = self.model
        if getattr(model.train_batch, "_ema_callback", None) is self:
            return
        original = getattr(model.train_batch, "__wrapped__", model.train_batch)

        def train_batch(*args, **kwargs):
            if not self._in_fit or self.ema is None:
                return original(*args, **kwargs)
            counter = OptimizerStepCounter(model._optimizer, read_found_inf=not self.ema.deferred)
            try:
                return original(*args, **kwargs)
            finally:
                counter.close()
                self._pending_updates += counter.pop_flags()

        train_batch._ema_callback = self
        train_batch.__wrapped__ = original
        model.train_batch = train_batch

    def _remove_batch_hook(self) -> None:
        model = self.model
        if getattr(model.train_batch, "_ema_callback", None) is not self:
            return
        wrapped = model.train_batch.__wrapped__
        if getattr(wrapped, "__func__", None) is getattr(type(model), "train_batch", None):
            del model.train_batch  # the class's own method again
        else:
            model.train_batch = wrapped

    def _flush_updates(self) -> None:
        flags, self._pending_updates = self._pending_updates, []
        for found_inf in flags:
            self.ema.step(found_inf=found_inf)

    # ------------------------------------------------------------------ training events
    def on_train_begin(self, logs=None) -> None:
        if not self.config.enable:
            self._start_without_ema()
            return
        self._in_fit = True
        if self.ema is None:
            self._build_engine()
        else:
            self._restore_raw()
        self._pending_updates = []
        self._install_batch_hook()

    def _start_without_ema(self) -> None:
        """EMA off: say so once; a resumed checkpoint saved with EMA continues from its raw weights."""
        if not self._told_off:
            logger.info("EMA: off for this run (EMACallback enable=False)")
            self._told_off = True
        path = self._resume_file(self.resume) if self.resume else None
        if path is not None:
            restore_raw_weights(path, self.network, "pass enable=True to continue the EMA as well")

    def on_epoch_begin(self, epoch=None, logs=None) -> None:
        self._restore_raw()

    def on_train_batch_begin(self, step, logs=None) -> None:
        self._restore_raw()

    def on_train_batch_end(self, step, logs=None) -> None:
        self._flush_updates()

    def on_train_end(self, logs=None) -> None:
        if self.ema is None:
            return
        self._restore_raw()
        self._flush_updates()
        self._remove_batch_hook()
        self._in_fit = False
        if self.ema.num_updates == 0:
            logger.warning("EMA: no EMA update happened during fit (%d optimizer steps, start_step=%d)",
                           self.ema.num_steps, self.config.start_step)
        if self.final_weights == "ema":
            self.ema.apply_to(self.network)

    # ------------------------------------------------------------------ evaluation events
    def on_eval_begin(self, logs=None) -> None:
        self.extra_logs, self._raw_copies_metrics = {}, False
        if not self.config.enable:
            return
        if self.ema is None:
            if not self.resume:
                logger.warning("EMA: evaluate() before any fit and without resume=: evaluating raw weights")
                return
            self._build_engine()
        if self.ema.applied:  # after fit with final_weights='ema': the EMA weights are already in
            return
        if self._policy.raw_weights_now(self.ema):
            self._raw_copies_metrics = self.config.eval_raw
            self._extend_metric_names(logs)
            return
        if self.config.eval_raw:
            self.extra_logs.update(self._evaluate_raw())
        self.extra_logs[DRIFT] = self.ema.log_before_eval()  # to the logs, ProgBarLogger and VisualDL
        self._extend_metric_names(logs)
        self.ema.apply_to(self.network)

    def _extend_metric_names(self, logs) -> None:
        names = (logs or {}).get("metrics")
        if isinstance(names, list):
            if self.config.eval_raw:
                for name in list(names):
                    if not name.endswith(RAW_SUFFIX) and name != DRIFT and name + RAW_SUFFIX not in names:
                        names.append(name + RAW_SUFFIX)
            if DRIFT in self.extra_logs and DRIFT not in names:
                names.append(DRIFT)

    def _evaluate_raw(self) -> Dict[str, Any]:
        """Evaluate the raw weights on fit's eval loader, leaving fit's own state as it was."""
        model = self.model
        loader = getattr(model, "_test_dataloader", None)
        if loader is None:
            logger.warning("EMA: eval_raw needs the evaluation DataLoader; raw metrics not computed")
            return {}
        saved = {k: getattr(model, k) for k in ("num_iters", "stop_training", "_test_dataloader") if hasattr(model, k)}
        try:
            result = model.evaluate(loader, verbose=0)
        finally:
            for k, v in saved.items():
                setattr(model, k, v)
            if "num_iters" not in saved and hasattr(model, "num_iters"):
                del model.num_iters
        return raw_suffixed(result, skip=())

    def _add_to_logs(self, logs) -> None:
        if logs is None:
            return
        if self._raw_copies_metrics:
            logs.update(raw_suffixed(logs))
        logs.update(self.extra_logs)

    def on_eval_batch_end(self, step, logs=None) -> None:
        self._add_to_logs(logs)  # the same dict reaches every on_eval_end, whatever the order

    def on_eval_end(self, logs=None) -> None:
        self._add_to_logs(logs)
        if not self._in_fit and self.ema is not None and self.ema.applied and self.final_weights == "raw":
            self._restore_raw()  # standalone evaluate(): leave the model as it was
