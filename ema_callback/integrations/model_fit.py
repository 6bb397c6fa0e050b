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
* Several EMAs (``decays``, a list of half-lives) and ``eval_raw``: the other candidates are evaluated with
  ``Model.evaluate`` on fit's eval loader inside ``on_eval_begin``, then fit's own evaluation runs on the selected
  one (the primary, or with ``select: best`` the best by ``monitor``, evaluated once more by fit itself so that every
  ``on_eval_end`` sees the weights that produced its metrics). The end table goes to the log and, with the
  callback's ``save_dir`` or else fit's (as the post-hoc snapshots), to ``ema_candidates.json``; one line then says
  what the network holds. The candidates are one callback's: two ``EMACallback`` in one ``fit`` are refused at its
  start.
* ``decay_batch_size`` and half-lives need the global batch: it is measured at the first ``train_batch``
  (its inputs' first dimension x ranks x ``accumulate_grad_batches``); the engine is built then.
* The EMA steps once per *real* optimizer update, counted on the optimizer itself: once per
  ``accumulate_grad_batches`` batches (and at an epoch's last batch), never for a step the AMP
  GradScaler skipped for inf/nan.
* Resuming, every path restoring the same: ``model.load(path)`` then ``fit`` continues the EMA from
  ``path.pdema`` wherever ``save_dir`` points (importing this module wraps ``paddle.Model.load``: the set's files
  are checked by the bounded, code-free reader before hapi unpickles them, and the model records which set it
  read); ``EMACallback(resume=path)`` without ``model.load`` loads the whole set itself (weights, optimizer state,
  EMA); ``model.load(a)`` with ``resume=b`` is refused (two checkpoints named); with ``enable=False`` the run
  continues from the raw weights and a save over an EMA run's set removes its stale ``.pdema``.
* One run per folder: while ``fit`` runs, the callback's folder (its ``save_dir``, else fit's) and
  ``EMA.posthoc.dir`` are locked (``files.run_lock``); a second run into them is refused at its start.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from ema_callback.config.files import check_section_name, read_yaml
from ema_callback.config.schema import SECTION, EMAConfig, EMAConfigError
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.core.horizon import BatchInfo
from ema_callback.core.run_report import log_before_eval, log_start
from ema_callback.core.storage import choose_backend
from ema_callback.errors import EMAError, EMAFileError
from ema_callback.files.checkpoint_io import checked_load
from ema_callback.files.checkpoint_set import StagedWrite
from ema_callback.files.state_file import fingerprint, read_state
from ema_callback.integrations.auto_length import AutoPick, has_length, ratio_units, saved_plan
from ema_callback.integrations.auto_length import resolve as resolve_length
from ema_callback.integrations.candidate_eval import Measured, evaluate_candidates
from ema_callback.integrations.candidates import RAW, CandidateBoard, metric_value
from ema_callback.integrations.checkpoints import (
    check_checkpoint_files,
    checkpoint_prefix,
    is_rank0,
    lock_run,
    numpy_state,
    place_features,
    restore_raw_weights,
    resume_ema,
    save_ema_state,
    stale_state_files,
)
from ema_callback.integrations.evaluation import DRIFT, RAW_SUFFIX, EvaluationPolicy
from ema_callback.integrations.optimizer_steps import OptimizerStepCounter
from ema_callback.paddle_compat import paddle

logger = logging.getLogger("ema_callback")

NOT_LOGGED = ("step", "batch_size", DRIFT)  # entries of evaluate()'s result that are not candidate metrics

class EMACallback(paddle.callbacks.Callback):
    """EMA of ``model.network`` during ``Model.fit``; evaluation runs on the EMA weights.

    Args:
        config: an ``EMAConfig`` or an ``EMA:`` mapping; keyword arguments (``decay=0.999``, ``eval_raw=True``,
            any key of the ``EMA:`` block) override it, as a layer above it (``config.schema.layered``: a length
            among them without ``schedule`` lets ``schedule: auto`` decide the warm-up).
        resume: a checkpoint (prefix ``dir/3``, or ``dir/3.pdema``) to continue: weights, optimizer state and EMA
            (loaded here when ``Model.load`` was not called; refused when ``Model.load`` read another set). Without
            it the set ``Model.load`` read is continued wherever it is; ``"auto"`` (the default when ``save_dir`` is
            given) also finds, when weights were set otherwise, the ``.pdema`` in ``save_dir`` whose raw or EMA
            weights equal the network's.
        save_dir: the ``save_dir`` given to ``fit``, for ``resume="auto"``; where ``ema_candidates.json`` and the
            post-hoc snapshots go (default: fit's ``save_dir``).
        final_weights: ``"ema"`` (default) leaves the EMA weights in the network after ``fit``, so
            ``model.save``/``model.evaluate``/``model.predict`` use them; ``"raw"`` leaves the raw weights.
        backend: the engine's store (``auto``, ``numpy``, ``paddle``, ``reference``; see the engine);
            ``update_path`` is its former name, still read with a deprecation line (both given: an error).
        monitor, mode: the metric the candidates table's recommendation and ``select: best`` compare, and its
            direction, as ``EarlyStopping`` takes them. Default: the first metric given to ``model.prepare``
            (higher is better), else ``loss`` as the mean over the evaluation's batches (``Model.evaluate`` itself
            reports the last batch's; lower is better). ``mode='auto'``: lower is better for a name containing
            ``loss`` or ``err``, higher otherwise.
        batch: the run's ``BatchInfo`` (per-device batch, ranks, accumulation, dataset size), when it should not be
            measured at the first batch.
    """

    def __init__(self, config: Union[EMAConfig, Mapping[str, Any], None] = None, *, resume: Optional[str] = None,
                 save_dir: Optional[str] = None, final_weights: str = "ema", backend: Optional[str] = None,
                 update_path: Optional[str] = None, monitor: Optional[str] = None, mode: str = "auto",
                 batch: Optional[BatchInfo] = None,
                 **kwargs: Any):
        super().__init__()
        base = config if isinstance(config, EMAConfig) else EMAConfig.from_block(config)
        self.config = base.replace(**kwargs) if kwargs else base
        if not isinstance(config, EMAConfig) and not has_length(dict(config or {}, **kwargs)):
            self.config = self.config.replace(length="auto")  # no length stated: picked at the end of the run
        if final_weights not in ("ema", "raw"):
            raise EMAConfigError(f"final_weights: expected 'ema' or 'raw', got {final_weights!r}")
        self.final_weights = final_weights
        if mode not in ("auto", "min", "max"):
            raise EMAConfigError(f"mode: expected 'auto', 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.higher_is_better = True  # set with the monitor at on_train_begin (model.prepare's metrics known then)
        self._loss_mean = _EvalLossMean()
        self.batch = batch
        self.board: Optional[CandidateBoard] = None
        self._eval_results: Dict[str, Dict[str, Any]] = {}
        self._evaluating: Optional[str] = None  # the candidate fit's own evaluation runs on
        self.save_dir = save_dir
        self._fit_dir: Optional[str] = None  # the running fit's save_dir (read at on_train_begin)
        self.resume = resume if resume is not None else ("auto" if save_dir else None)
        self.backend = choose_backend(backend, update_path, "EMACallback")
        self.ema: Optional[ExponentialMovingAverage] = None
        self.extra_logs: Dict[str, Any] = {}  # added to the evaluation logs: <metric>_raw, ema_drift
        self._copy_suffix = ""  # fit's own metrics are also logged with this suffix ("_raw" before eval_start_step)
        # found_inf flags of optimizer updates counted in train_batch, not yet averaged
        self._pending_updates: list = []
        self._in_fit = False
        self._policy = EvaluationPolicy(self.config)
        self._told_off = False
        self._resume_decided, self._resume_prefix = False, None
        self.auto: Optional[AutoPick] = None  # length: auto, once the engine is built
        self._locks: list = []  # this run's lock on its folders (one run per folder)

    @classmethod
    def from_config(cls, source: Union[EMAConfig, Mapping[str, Any], str], **kwargs: Any) -> "EMACallback":
        """From an ``EMAConfig``, an ``EMA:`` mapping, a YAML file with a top-level ``EMA:`` section, or a preset's
        name (``ema-callback presets``)."""
        if isinstance(source, str):
            from ema_callback.config.presets import block_path

            source = block_path(source, "EMACallback.from_config({!r})")
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
        if self.monitor is None:  # evaluate() without fit
            self._resolve_monitor()
        source = self._resume_source() if self.config.auto else None
        engine_config, plan = resolve_length(self.config, self._whole_run(self.batch), self.folder,
                                             resumed=saved_plan(source + ".pdema") if source else None)
        self.ema = ExponentialMovingAverage(self.network, engine_config,
                                            optimizer=getattr(self.model, "_optimizer", None),
                                            backend=self.backend, batch=self.batch)
        self.board = CandidateBoard(self.ema, engine_config, self.higher_is_better)
        place_features(self.ema, self.folder, only_rank0_evaluates=False)
        log_start(self.ema)
        if plan is not None:
            self.auto = AutoPick(self.ema, plan, self.higher_is_better, every_rank=True)
            logger.info("EMA: %s", plan.describe(sum(int(np.prod(e.tensor.shape)) for e in self.ema.averaged_entries)))
        if self._in_fit:  # the set-up is checked: this run now writes its folders
            self._lock_folders()
        try:
            self._install_save_hook()
            source = self._resume_source()
            if source is not None:
                resume_ema(self.ema, source, self.network)
        except BaseException:
            self._release_locks()
            raise

    def _whole_run(self, batch: Optional[BatchInfo]) -> Optional[BatchInfo]:
        """``batch`` with ``total_steps`` counting the steps a resumed checkpoint already took (a resumed ``fit`` is
        called for the remaining epochs): what ``length: auto`` sizes itself by, the same as the run's start did."""
        source = self._resume_source() if self.config.auto else None
        if batch is None or source is None or batch.total_steps is None or not os.path.isfile(source + ".pdema"):
            return batch
        data = checked_load(source + ".pdema")
        done = data.get("num_steps") if isinstance(data, dict) else None
        if not isinstance(done, int) or isinstance(done, bool) or done < 0:
            return batch
        return dataclasses.replace(batch, total_steps=batch.total_steps + done)

    def _resume_source(self) -> Optional[str]:
        """The checkpoint (prefix) this run continues, decided once (see ``resume`` in the class docstring):

        * ``resume=PATH``: that set. If ``Model.load`` read another set into the network, it is refused (two
          checkpoints named); if ``Model.load`` was not called, the set is loaded here through ``Model.load`` (its
          files checked first), so the optimizer state comes with the weights, as a resume needs;
        * else the set ``Model.load`` read, wherever it is, while the network still holds its weights;
        * else with ``resume='auto'`` the ``.pdema`` in ``save_dir`` whose weights the network holds.
        """
        if self._resume_decided:
            return self._resume_prefix
        self._resume_decided = True
        loaded = loaded_checkpoint(self.model)
        if self.resume not in (None, "auto"):
            wanted = checkpoint_prefix(self.resume)
            if loaded is not None and os.path.realpath(loaded) != os.path.realpath(wanted):
                raise EMAConfigError(f"EMACallback(resume={self.resume!r}): the network holds the weights "
                                     f"model.load({loaded!r}) read; a run continues one checkpoint: drop resume= (the "
                                     f".pdema beside {loaded} is used), or model.load the checkpoint to resume")
            if loaded is None:
                for suffix in (".pdparams", ".pdopt"):
                    if not os.path.isfile(wanted + suffix):
                        raise EMAFileError(f"EMACallback(resume={self.resume!r}): {wanted + suffix}: no such file; a "
                                           "resume restores the weights and the optimizer state with the EMA (to "
                                           "continue the EMA alone, model.load(path, reset_optimizer=True) first)")
                self.model.load(wanted)
                logger.info("EMA: resume=%s: weights and optimizer state loaded from %s.pdparams/.pdopt (as "
                            "model.load would)", self.resume, wanted)
            self._resume_prefix = wanted
        elif loaded is not None:
            self._resume_prefix = loaded
        elif self.resume == "auto":
            found = self._find_resume_file()
            self._resume_prefix = checkpoint_prefix(found) if found else None
        return self._resume_prefix

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
            except EMAError as exc:
                logger.warning("EMA: resume='auto' skipped a file in %s: %s", self.save_dir, exc)
                continue
        return None

    def _install_save_hook(self) -> None:
        """Every ``Model.save(path)`` (training=True) also writes ``path.pdema``; the whole set is staged and published
        as one. With the EMA off (``enable=False``) the set is staged too, and an earlier run's ``path.pdema`` is
        removed with it (it would describe other weights)."""
        model = self.model
        if getattr(model.save, "_ema_callback", None) is self:
            return
        original = getattr(model.save, "__wrapped__", model.save)

        def save(path, training=True):
            if not training:
                return original(path, training)
            folder, name = os.path.split(os.path.abspath(path))
            # save_as: raw: the .pdparams hold the raw weights even while EMA weights are in the network (after fit,
            # in an evaluation), and <path>.ema.pdparams what the network holds (else the primary EMA) beside them
            swap = self.ema is not None and self.config.save_as == "raw" and self.ema.applied
            with StagedWrite(folder) as stage:  # every file complete before it gets its final name
                held_ema = numpy_state(self.network) if swap else None
                if swap:
                    self.network.set_state_dict(self.raw_state_dict())
                try:
                    result = original(stage.path(name), training)
                finally:
                    if swap:
                        self.network.set_state_dict(held_ema)
                stale = []
                if self.ema is not None and is_rank0():  # .pdparams hold what the network holds now
                    held = self.ema.applied_label or RAW
                    several = (self.board is not None and self.board.active) or self.auto is not None
                    raw = self.raw_state_dict()
                    sha1 = save_ema_state(self.ema, [stage.path(name)], self.network, raw,
                                          raw if swap else numpy_state(self.network), self.config.save_as,
                                          candidate=held if several or swap else None, ema_weights=held_ema)
                    held = RAW if self.config.save_as == "raw" else held
                    stage.record_sets({name: {"hold": held, "sha1": sha1}})
                elif is_rank0():  # EMA off: an earlier EMA run's .pdema under this name no longer belongs here
                    stale = [f for f in stale_state_files([name]) if os.path.isfile(os.path.join(folder, f))]
                    if stale:
                        stage.record_sets({name: {"hold": RAW, "sha1": None}})
                stage.publish(last=(name + ".pdema",), remove=stale)
            return result

        save._ema_callback = self
        save.__wrapped__ = original
        model.save = save

    def _lock_folders(self) -> None:
        """One run per folder (``files.run_lock``): this fit's folder and ``EMA.posthoc.dir``, until fit ends."""
        if not self._locks:
            self._locks = lock_run(self.folder, (self.config.posthoc or {}).get("dir"))

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

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
            if self._in_fit and self.ema is None and self.config.enable:
                self._measure_batch(args[0] if args else kwargs.get("inputs"))
                self._build_engine()
            if not self._in_fit or self.ema is None:
                return original(*args, **kwargs)
            counter = OptimizerStepCounter(model._optimizer, read_found_inf=not self.ema.deferred)
            try:
                return original(*args, **kwargs)
            except BaseException:
                self._release_locks()  # fit ends here without on_train_end: its folders are free again
                raise
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

    def _measure_batch(self, inputs) -> None:
        """The global batch from the first training batch: its first dimension x ranks x accumulation steps; the
        images per epoch as fit's steps per epoch x that (what the run sees in an epoch)."""
        if self.batch is not None:
            return
        first = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else inputs
        shape = getattr(first, "shape", None)
        per_device = int(shape[0]) if shape else 0
        world = paddle.distributed.get_world_size()
        accumulate = int(getattr(self.model, "_accumulate", 1) or 1)
        steps, epochs = (self.params or {}).get("steps"), (self.params or {}).get("epochs")
        known = isinstance(steps, int) and steps > 0
        size = steps * per_device * world if known else None
        per_epoch = -(-steps // accumulate) if known else None
        total = per_epoch * epochs if per_epoch and isinstance(epochs, int) else None
        self.batch = BatchInfo(per_device, world, accumulate, size, per_epoch, total)

    def _flush_updates(self) -> None:
        flags, self._pending_updates = self._pending_updates, []
        for found_inf in flags:
            self.ema.step(found_inf=found_inf)

    # ------------------------------------------------------------------ training events
    def on_train_begin(self, logs=None) -> None:
        self._claim_fit()
        if not self.config.enable:
            self._start_without_ema()
            return
        self._resolve_monitor()
        self._fit_dir = _fit_save_dir()
        self._check_posthoc_folder()
        self._resume_source()  # decided (and a resume= set loaded) before the first step
        self._in_fit = True
        if self.ema is None and self.batch is not None:
            self._build_engine()  # else at the first train_batch, once the global batch is measured
        elif self.ema is not None:
            self._restore_raw()
            self.ema.reopen()  # a second fit on this engine: its features install themselves again
            self._lock_folders()
        self._pending_updates = []
        self._install_batch_hook()

    def _claim_fit(self) -> None:
        """One EMACallback per ``fit``: a second would take over the first's hooks and leave it silently inactive.
        The callbacks of one fit share hapi's ``params`` dict, so the first to start marks the model with it; the
        second undoes the first's batch hook and refuses, before any optimizer step."""
        claim = getattr(self.model, "_ema_callback_fit", None)
        if self.params is not None and claim is not None and claim[0] is self.params and claim[1] is not self:
            other = claim[1]
            other._remove_batch_hook()
            other._in_fit = False
            lists = (f"decays=[{other.config.decay:g}, {self.config.decay:g}]"
                     if other.config.length_key == self.config.length_key == "decay" else "decays=[...]")
            raise EMAConfigError(f"EMACallback: two in one Model.fit; one EMACallback keeps several EMAs in one pass "
                                 f"and compares them: EMACallback({lists}) or EMACallback(half_life_images=[...])")
        self.model._ema_callback_fit = (self.params, self)

    def _resolve_monitor(self) -> None:
        """The metric to compare: the one given, else the first of ``model.prepare``'s metrics, else the mean loss;
        a given one that fit does not report is an error now, not at the first evaluation."""
        names = list((self.params or {}).get("metrics") or self.model._metrics_name())
        if self.monitor is None:
            self.monitor = next((n for n in names if n != "loss"), "loss")
        elif names and self.monitor not in names:
            raise EMAConfigError(f"EMACallback(monitor={self.monitor!r}): not among the metrics fit reports "
                                 f"({', '.join(names)})")
        lower = any(word in self.monitor for word in ("loss", "err"))
        self.higher_is_better = self.mode == "max" or (self.mode == "auto" and not lower)

    @property
    def folder(self) -> Optional[str]:
        """Where this callback writes (post-hoc snapshots, ``ema_candidates.json``): its ``save_dir``, else the
        running fit's."""
        return self.save_dir or self._fit_dir

    def _check_posthoc_folder(self) -> None:
        """``EMA.posthoc`` needs a folder for its snapshots: ``posthoc.dir``, else ``posthoc/`` in ``folder``; none is
        an error at the start of fit, not at the first snapshot."""
        if not self.config.posthoc or self.config.posthoc.get("dir"):
            return
        if self.folder is None:
            raise EMAConfigError("EMA.posthoc.dir: no folder for the snapshots; pass model.fit(save_dir=...) or "
                                 "EMACallback(save_dir=...), or set EMA.posthoc.dir")

    def _start_without_ema(self) -> None:
        """EMA off: say so once; a resumed checkpoint saved with EMA continues from its raw weights, and a save over
        such a set removes its now stale ``.pdema``."""
        if not self._told_off:
            logger.info("EMA: off for this run (EMACallback enable=False)")
            self._told_off = True
        source = self._resume_source() if self.resume or loaded_checkpoint(self.model) else None
        if source is not None:
            restore_raw_weights(source, self.network, "pass enable=True to continue the EMA as well",
                                config=self.config)
        self._fit_dir = _fit_save_dir()
        self._lock_folders()  # its saves may remove an earlier EMA run's .pdema: one run per folder still
        self._install_save_hook()

    def on_epoch_begin(self, epoch=None, logs=None) -> None:
        self._restore_raw()

    def on_train_batch_begin(self, step, logs=None) -> None:
        self._restore_raw()

    def on_train_batch_end(self, step, logs=None) -> None:
        self._flush_updates()

    def on_train_end(self, logs=None) -> None:
        if self.ema is None:
            self._release_locks()
            return
        self._restore_raw()
        self._flush_updates()
        self._remove_batch_hook()
        self._in_fit = False
        if self.ema.num_updates == 0:
            logger.warning("EMA: no EMA update happened during fit (%d optimizer steps, start_step=%d)",
                           self.ema.num_steps, self.config.start_step)
        self._release_locks()
        if self.auto is not None:
            self._pick_length()
        elif self.final_weights == "ema":
            self.ema.apply_to(self.network)
        if self.board is not None:
            self.board.finish(self.folder, write=is_rank0())
            self._log_final_weights()
        self.ema.close()  # the model as it was found: no feature's hook stays on it

    def _pick_length(self) -> None:
        """``length: auto`` at the end of fit (``auto_length``): evaluate the candidates with ``Model.evaluate`` on
        fit's eval data, per batch for the paired uncertainty; the pick goes into the network (``final_weights:
        'ema'``), so ``final.pdparams`` (written next by ModelCheckpoint) and ``model.save`` hold it."""
        auto = self.auto
        auto.metric = self.monitor
        if getattr(self.model, "_test_dataloader", None) is None:
            logger.warning("EMA: length auto: fit had no eval_data, so nothing can be compared: the default length "
                           "(%s) is kept", auto.length_of(auto.default))
            label = auto.default
        else:
            label = auto.run(self._measure, self.network,
                             trend_noise=self.board.noises((auto.default, RAW)) if self.board else None).label
            if is_rank0():
                auto.write(self.folder)
        if self.final_weights == "ema" and label != RAW:
            if label == auto.default:
                self.ema.apply_to(self.network)
            else:
                self.ema.apply_values(self.network, auto.values(label, self.network), label)
        auto.close()

    def _log_final_weights(self) -> None:
        """After the candidates table: which weights the network holds now (and fit's ``final.pdparams``, which
        ``ModelCheckpoint`` writes next) and why, and how to get the recommended candidate when it is another."""
        data = self.board.summary() if self.board.active else {}
        if not data:
            return
        decision = self.auto.decision if self.auto is not None else None
        if decision is not None:  # length auto decided what the network holds; the table is the evaluations' record
            held = decision.label if self.final_weights == "ema" else RAW
            why = "length auto's pick" if held == decision.label else "the raw weights"
        else:
            held = self.board.primary if self.final_weights == "ema" else RAW
            why = "the primary EMA" if held != RAW else "the raw weights"
        line = f"EMA: after fit the network holds {held} ({why}: final_weights={self.final_weights!r})"
        if self._fit_dir and self.config.save_as == "raw" and held != RAW:
            line += (f", and so will {os.path.join(self._fit_dir, 'final.ema.pdparams')} (save_as: raw: final.pdparams "
                     "hold the raw weights)")
        elif self._fit_dir:
            line += f", and so will {os.path.join(self._fit_dir, 'final.pdparams')}"
        recommended = decision.label if decision is not None else data["recommended"]
        if recommended != held:
            picked = " (select: best chooses what a best-model file saved at an evaluation holds, not the weights " \
                     "fit ends on)" if self.config.select == "best" else ""
            if decision is not None:
                line += f"; length auto picked {recommended}, which is not applied: EMACallback(final_weights='ema') " \
                        "ends fit on the pick"
            else:
                how = "EMACallback(final_weights='raw') ends fit on them" if recommended == RAW else \
                    f"callback.ema.apply_to(model.network, {recommended!r}) puts it in the network"
                line += f"; the table recommends {recommended}, which is not applied{picked}: {how}"
        logger.info("%s", line)

    # ------------------------------------------------------------------ evaluation events
    def on_eval_begin(self, logs=None) -> None:
        self.extra_logs, self._copy_suffix, self._eval_results, self._evaluating = {}, "", {}, None
        self._loss_mean.on_eval_begin(logs)
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
            self._copy_suffix = RAW_SUFFIX if self.config.eval_raw else ""
            self._extend_metric_names(logs)
            return
        if not self.board.active:
            self.extra_logs[DRIFT] = log_before_eval(self.ema)  # to the logs, ProgBarLogger and VisualDL
            self._extend_metric_names(logs)
            self._evaluating = self.board.primary
            self.ema.apply_to(self.network)
            return
        labels = self.board.to_evaluate()
        nested = labels if self.config.select == "best" else labels[:-1]  # fit's own evaluation runs the last
        def before(label: str) -> None:
            if label == self.board.primary:
                self.extra_logs[DRIFT] = log_before_eval(self.ema)

        self._eval_results, units = evaluate_candidates(nested, lambda label: self.board.weights(label, self.network),
                                                        self._measure, before)
        if self.config.select == "best":
            try:
                chosen = self.board.pick(self._eval_results, self.monitor, units)
            except KeyError as exc:
                raise EMAConfigError(f"EMACallback(monitor={self.monitor!r}): {exc.args[0]}") from None
        else:
            chosen = self.board.primary
            self.extra_logs[DRIFT] = log_before_eval(self.ema)
            self._copy_suffix = "_" + chosen if self.board.several else ""
        self._evaluating = chosen
        for label, metrics in self._eval_results.items():
            if label != chosen or self.config.select == "best":
                self.extra_logs.update({f"{k}_{label}": v for k, v in metrics.items() if k not in NOT_LOGGED})
        self._extend_metric_names(logs)
        if chosen != RAW:
            self.ema.apply_to(self.network, chosen)

    def _extend_metric_names(self, logs) -> None:
        """fit's list of metric names (what ProgBarLogger and VisualDL show) gains the suffixed ones."""
        names = (logs or {}).get("metrics")
        if isinstance(names, list):
            plain = [n for n in names if self._plain(n)]
            added = [n + self._copy_suffix for n in plain] if self._copy_suffix else []
            added += [k for k in self.extra_logs if not self._plain(k) or k == DRIFT]
            for name in added:
                if name not in names:
                    names.append(name)

    def _plain(self, name: str) -> bool:
        """A metric name without a candidate suffix (and not the drift)."""
        labels = (self.ema.labels if self.ema is not None else []) + [RAW]
        return name != DRIFT and name not in NOT_LOGGED and not any(name.endswith("_" + label) for label in labels)

    def _measure(self) -> Measured:
        """``Model.evaluate`` on fit's eval loader (``_evaluate_here``) of the network as it is, with each batch's
        (sum, count) of ``monitor`` (``_PerBatchUnits``) for a paired comparison of candidates."""
        units = _PerBatchUnits(self.monitor)
        return self._evaluate_here(extra=[units]), units.array()

    def _evaluate_here(self, extra: Optional[list] = None) -> Dict[str, Any]:
        """Evaluate the network as it is on fit's eval loader, leaving fit's own state as it was (``extra``:
        callbacks that watch the evaluation)."""
        model = self.model
        loader = getattr(model, "_test_dataloader", None)
        if loader is None:
            raise EMAConfigError("EMA.eval_raw / several EMAs: need fit's evaluation data (eval_data) to compare "
                                 "the candidates")
        saved = {k: getattr(model, k) for k in ("num_iters", "stop_training", "_test_dataloader") if hasattr(model, k)}
        mean = _EvalLossMean()
        try:
            result = dict(model.evaluate(loader, verbose=0, callbacks=[mean] + list(extra or [])))
            if "loss" in result and mean.mean is not None:
                result["loss"] = mean.mean
        finally:
            for k, v in saved.items():
                setattr(model, k, v)
            if "num_iters" not in saved and hasattr(model, "num_iters"):
                del model.num_iters
        return result

    def _add_to_logs(self, logs) -> None:
        if logs is None:
            return
        if self._copy_suffix:
            logs.update({k + self._copy_suffix: v for k, v in list(logs.items())
                         if self._plain(k) and k not in self.extra_logs})
        logs.update(self.extra_logs)

    def on_eval_batch_end(self, step, logs=None) -> None:
        self._loss_mean.on_eval_batch_end(step, logs)
        self._add_to_logs(logs)  # the same dict reaches every on_eval_end, whatever the order

    def on_eval_end(self, logs=None) -> None:
        self._add_to_logs(logs)
        if self._in_fit and self.board is not None and self._evaluating is not None and logs is not None:
            own = {k: v for k, v in logs.items() if self._plain(k) and k not in self.extra_logs}
            if "loss" in own and self._loss_mean.mean is not None:
                own["loss"] = self._loss_mean.mean
            results = dict(self._eval_results)
            results.setdefault(self._evaluating, own)
            key = self.monitor if any(self.monitor in r for r in results.values()) else next(iter(own), "loss")
            self.board.record(self.ema.num_steps, results, key, self._evaluating)
        if not self._in_fit and self.ema is not None and self.ema.applied and self.final_weights == "raw":
            self._restore_raw()  # standalone evaluate(): leave the model as it was


class _PerBatchUnits(paddle.callbacks.Callback):
    """Each evaluation batch's (numerator, count) of ``metric``, for a paired comparison of candidates: hapi logs a
    metric accumulated over the batches so far (``value x seen`` differences give each batch's sum) and the loss
    of each batch (``loss x size``)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric, self.pairs, self._seen, self._total = metric, [], 0.0, 0.0

    def on_eval_batch_end(self, step, logs=None) -> None:
        logs = logs or {}
        value, size = metric_value(logs.get(self.metric)), float(logs.get("batch_size") or 0)
        if value is None or size <= 0:
            return
        if self.metric == "loss":
            self.pairs.append((value * size, size))
            return
        seen = self._seen + size
        total = value * seen
        self.pairs.append((total - self._total, size))
        self._seen, self._total = seen, total

    def array(self):
        return ratio_units(self.pairs)


class _EvalLossMean(paddle.callbacks.Callback):
    """The mean loss over an evaluation's batches, weighted by their sizes (``Model.evaluate`` reports the last
    batch's loss): what the candidates are compared by when the monitor is ``loss``."""

    def __init__(self):
        super().__init__()
        self.total = self.count = 0.0

    def on_eval_begin(self, logs=None) -> None:
        self.total = self.count = 0.0

    def on_eval_batch_end(self, step, logs=None) -> None:
        loss = metric_value((logs or {}).get("loss"))
        size = (logs or {}).get("batch_size") or 1
        if loss is not None:
            self.total += loss * size
            self.count += size

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.count if self.count else None


LOADED = "_ema_callback_loaded"  # on a paddle.Model: (prefix Model.load read, fingerprint of the weights it set)


def _weights_fingerprint(network) -> str:
    return fingerprint(numpy_state(network))


def loaded_checkpoint(model) -> Optional[str]:
    """The checkpoint prefix ``Model.load`` last read into ``model``, while its network still holds those weights."""
    record = getattr(model, LOADED, None)
    if not record:
        return None
    prefix, loaded = record
    return prefix if _weights_fingerprint(model.network) == loaded else None


def _record_model_loads() -> None:
    """``paddle.Model.load``, wrapped once per process when this module is imported (``from ema_callback import
    EMACallback`` does): before hapi's own loader unpickles a set, a save killed in its folder is finished or
    undone and its files are read with the bounded, code-free reader (one line refuses a file that fails); after, the
    model records which set it loaded, so that ``EMACallback`` resumes from the ``.pdema`` beside it wherever
    ``save_dir`` points. hapi's loading itself is unchanged, and nothing else of ``paddle.Model`` is touched."""
    original = paddle.Model.load
    if getattr(original, "_ema_callback_checked", False):
        return

    @functools.wraps(original)
    def load(self, path, *args, **kwargs):
        prefix = checkpoint_prefix(str(path))
        check_checkpoint_files(prefix, (".pdparams", ".pdopt", ".pdema"), f"Model.load({path!r})", verify_state=False)
        result = original(self, path, *args, **kwargs)
        setattr(self, LOADED, (prefix, _weights_fingerprint(self.network)))
        return result

    load._ema_callback_checked = True
    paddle.Model.load = load


_record_model_loads()


def _fit_save_dir() -> Optional[str]:
    """The ``save_dir`` given to the running ``Model.fit``: hapi hands it to ``ModelCheckpoint`` and
    ``EarlyStopping`` only, so it is read from fit's own frame (its parameter of that name)."""
    import inspect
    import sys

    code = inspect.unwrap(paddle.Model.fit).__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return frame.f_locals.get("save_dir")
        frame = frame.f_back
    return None
