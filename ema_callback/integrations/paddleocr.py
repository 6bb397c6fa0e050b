"""PaddleOCR: an ``EMA:`` section in any PaddleOCR YAML, through PaddleOCR's own training loop.

    ema-callback ocr-train -c cfg.yml [-o Key.sub=val ...] [--paddleocr-root DIR] [--ema-config BLOCK.yml]

runs the checkout's own ``tools/train.py`` (as ``python tools/train.py`` would) with four seams of
``tools.program`` wrapped for the duration of the run, and nothing in the checkout edited:

* ``program.train``: builds the engine over the model PaddleOCR built (``DataParallel`` unwrapped,
  AMP O2 master weights read from the optimizer), resumes it from ``<Global.checkpoints>.pdema``, and
  counts real updates on the optimizer (``optimizer.step`` without AMP, ``scaler.minimize`` ->
  ``optimizer.minimize`` with AMP; a step the GradScaler skips for inf/nan is not an update);
* ``program.eval``: evaluates the EMA weights and restores the raw weights after; with ``eval_raw``
  the raw metrics are added as ``<name>_raw``, so PaddleOCR's log line and its W&B/VisualDL writer show both;
  before ``eval_start_step`` it evaluates (and selects best models with) the raw weights;
* ``program.save_model``: every checkpoint PaddleOCR writes (``latest``, ``best_accuracy``,
  ``iter_epoch_N``, ``best_model/model``) gets a ``.pdema`` beside it (EMA state, update count, raw
  weights). With ``save_as: ema`` (default) PaddleOCR's ``.pdparams`` hold the EMA weights, so
  ``tools/eval.py``, ``tools/export_model.py`` and ``tools/infer_*.py`` use them with no extra flag;
  with ``save_as: raw`` PaddleOCR's files are untouched and ``<prefix>.ema.pdparams`` is written beside.

With ``EMA.enable: false`` (or no ``EMA:`` section, block or override at all) nothing is wrapped and the
run is PaddleOCR's own, bit for bit.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ema_callback.config.files import resolve_block
from ema_callback.config.schema import SECTION, EMAConfig, EMAConfigError
from ema_callback.core.run_report import log_before_eval, log_start
from ema_callback.files.checkpoint_set import StagedWrite
from ema_callback.integrations.auto_length import AutoPick, ratio_units, saved_plan
from ema_callback.integrations.auto_length import resolve as resolve_length
from ema_callback.integrations.candidate_eval import Measured, evaluate_candidates
from ema_callback.integrations.candidates import RAW, CandidateBoard
from ema_callback.integrations.checkpoints import (
    check_checkpoint_files,
    checkpoint_prefix,
    describe_start_weights,
    is_rank0,
    lock_run,
    numpy_state,
    place_features,
    restore_raw_weights,
    resume_ema,
    save_ema_state,
    save_without_stale_state,
    stale_state_files,
)
from ema_callback.integrations.evaluation import DRIFT, EvaluationPolicy, before_eval_start, raw_suffixed
from ema_callback.integrations.output_rollback import OutputGuard
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
from ema_callback.integrations.suite_checkout import PADDLEOCR, find_checkout

logger = logging.getLogger("ema_callback")



def build_parser() -> argparse.ArgumentParser:
    return suite_parser("ocr-train", PADDLEOCR)


def resolve_root(explicit: Optional[str]) -> str:
    """The PaddleOCR checkout (``suite_checkout.find_checkout``), checked: ``tools/train.py``, ``tools/program.py``
    and ``ppocr/`` must exist."""
    return find_checkout(PADDLEOCR, explicit)


def import_program(root: str):
    """``tools.program`` from the checkout ``root`` (``suite_adapter.import_from_checkout``)."""
    return import_from_checkout(root, "tools.program", os.path.join("tools", "program.py"), PADDLEOCR.option)


def unwrap(model):
    from ema_callback.core.selection import unwrap as _unwrap  # imports paddle: not at module import (fast --help)

    return _unwrap(model)


class PaddleOCRHooks:
    """The wrapped seams of ``tools.program``, installed for the run by ``installed()`` (a context manager).

    Always (even with EMA off): ``program.train`` checks what the run starts from (a resumed checkpoint saved
    with EMA gets its raw weights back, a pretrained model of an EMA run gets one line). With an ``EMA:`` request:
    ``program.merge_config`` puts the resolved block into the config PaddleOCR saves as ``config.yml``. With EMA
    on: ``train`` builds and resumes the engine, ``eval`` and ``save_model`` as in the module docstring.
    """

    def __init__(self, program, config: EMAConfig, guard: Optional[OutputGuard] = None,
                 resolved_block: Optional[Dict[str, Any]] = None):
        self.program = program
        self.config = config
        self.guard = guard
        self.resolved_block = resolved_block
        self.ema = None
        self.model = None
        self.counter = None
        self.board: Optional[CandidateBoard] = None
        self.save_dir: Optional[str] = None
        self._originals: Dict[str, Any] = {}
        self._policy = EvaluationPolicy(config)
        self.auto = None  # length: auto, once the engine is built
        self._eval_call = self._save_call = None  # the arguments of PaddleOCR's last eval / save of latest
        self._pick: Optional[str] = None  # the candidate length: auto picked (what best_accuracy is saved with)

    @contextlib.contextmanager
    def installed(self):
        seams = [("train", self._train)]
        if self.resolved_block is not None:
            seams.append(("merge_config", self._merge_config))
        seams.append(("save_model", self._save_model))  # with the EMA off: only to drop a stale .pdema
        if self.config.enable:
            seams.append(("eval", self._eval))
        for name, wrapper in seams:
            self._originals[name] = getattr(self.program, name)
            setattr(self.program, name, wrapper)
        try:
            yield self
        finally:
            for name, original in self._originals.items():
                setattr(self.program, name, original)
            if self.counter is not None:
                self.counter.close()
            if self.ema is not None:
                self.ema.close()  # the model as it was found: no feature's hook stays on it

    # ---------------------------------------------------------------- config.yml
    def _merge_config(self, config, opts, *args, **kwargs):
        """PaddleOCR's merge of ``-o`` options, then the resolved ``EMA:`` block (``-o EMA.*`` and
        ``--ema-config`` included): ``preprocess`` saves this config as ``config.yml``, so
        ``-c output/<run>/config.yml`` resumes with the EMA as it was."""
        merged = self._originals["merge_config"](config, opts, *args, **kwargs)
        merged[SECTION] = dict(self.resolved_block)
        return merged

    # ---------------------------------------------------------------- train
    def _train(self, config, train_dataloader, valid_dataloader, device, model, loss_class, optimizer,
               lr_scheduler, post_process_class, eval_class, pre_best_model_dict, logger_, *args, **kwargs):
        global_config = config.get("Global") or {}
        checkpoints, pretrained = global_config.get("checkpoints"), global_config.get("pretrained_model")
        if not checkpoints and pretrained:
            describe_start_weights(pretrained, "Global.pretrained_model", logger_)
        if self.config.enable:
            self.save_dir = global_config.get("save_model_dir")
            self._start_ema(model, optimizer, checkpoints, logger_, _batch_info(config, train_dataloader))
        elif checkpoints:
            restore_raw_weights(checkpoints, unwrap(model), "add -o EMA.enable=true (or resume with the run's own "
                                "config.yml) to continue the EMA as well", config=self.config, log=logger_)
        result = self._originals["train"](config, train_dataloader, valid_dataloader, device, model, loss_class,
                                          optimizer, lr_scheduler, post_process_class, eval_class,
                                          pre_best_model_dict, logger_, *args, **kwargs)
        if self.ema is not None:
            logger.info("EMA: finished: %s", self.ema.summary())
            if self.auto is not None and is_rank0():  # PaddleOCR evaluates and saves on rank 0 only
                self._pick_length(model, logger_)
            self.board.finish(self.save_dir, write=is_rank0())
        return result

    def _pick_length(self, model, logger_) -> None:
        """``length: auto`` at the end (``auto_length``): each candidate through PaddleOCR's own ``eval`` (the
        arguments of its last evaluation), per batch where its metric counts samples (``correct_num``/``all_num``,
        the recognizers' ``acc``); the pick is written as ``best_accuracy`` (and ``best_model/model``) through
        PaddleOCR's own ``save_model``, the raw weights in their ``.pdema``."""
        auto = self.auto
        if self._eval_call is None or self._save_call is None:
            logger.warning("EMA: length auto: no evaluation%s during training, so nothing can be compared: the "
                           "default length (%s) is kept", "" if self._eval_call else " (Global.eval_batch_step)",
                           auto.length_of(auto.default))
            auto.close()
            return
        args, kwargs = self._eval_call
        auto.metric = getattr(_eval_class(args, kwargs), "main_indicator", None)
        label = auto.run(self._measure(model, args, kwargs), model,
                         trend_noise=self.board.noises((auto.default, RAW))).label
        auto.write(self.save_dir)
        if not auto.evaluated:  # nothing was compared (no EMA update): PaddleOCR's own best_accuracy stays
            auto.close()
            return
        self._pick = label
        optimizer, model_path, config, kwargs = self._save_call
        best = dict(kwargs.get("best_model_dict") or {}, **{auto.metric: auto.evaluated[label].value})
        global_config = config.get("Global") or {}
        if global_config.get("uniform_output_enabled"):  # PaddleOCR 2.10's layout: <dir>/best_accuracy/, inference
            model_path = os.path.join(global_config.get("save_model_dir") or os.path.dirname(model_path),
                                      "best_accuracy")
            export = getattr(self.program, "export", None)
            if export is not None:
                with auto.weights(label, model):
                    export(config, model, os.path.join(model_path, "inference"))
            if kwargs.get("save_model_info"):
                kwargs = dict(kwargs, save_model_info=dict(kwargs["save_model_info"], metric=best))
        self._save_model(model, optimizer, model_path, logger_, config, is_best=True, prefix="best_accuracy",
                         **dict(kwargs, best_model_dict=best))
        logger.info("EMA: length auto: %s written as %s (best_accuracy, best_model/model)", label,
                    os.path.join(model_path, "best_accuracy.pdparams"))
        auto.close()

    def _start_ema(self, model, optimizer, checkpoints, logger_, batch) -> None:
        from ema_callback.core.engine import ExponentialMovingAverage
        from ema_callback.integrations.optimizer_steps import OptimizerStepCounter

        self.model = model
        resumed = saved_plan(checkpoints + ".pdema") if checkpoints and self.config.auto else None
        engine_config, plan = resolve_length(self.config, batch, self.save_dir, resumed=resumed)
        self.ema = ExponentialMovingAverage(model, engine_config, optimizer=optimizer, batch=batch)
        self.board = CandidateBoard(self.ema, engine_config)
        if plan is not None:
            self.auto = AutoPick(self.ema, plan)
            logger_.info("EMA: %s", plan.describe(sum(int(np.prod(e.tensor.shape)) for e in self.ema.averaged_entries)))
        place_features(self.ema, self.save_dir, only_rank0_evaluates=True)  # PaddleOCR evaluates on rank 0 only
        log_start(self.ema, logger_)
        if checkpoints:
            resume_ema(self.ema, checkpoints, unwrap(model), logger_)
        if self.guard is not None:
            self.guard.release()  # the EMA is set up: from here on the run's files are the run's
        self.counter = OptimizerStepCounter(optimizer, on_update=self.ema.step, read_found_inf=not self.ema.deferred)
        logger_.info("EMA: %s", ", ".join(f"{k}: {v}" for k, v in self.config.to_block().items()))

    # ---------------------------------------------------------------- eval
    def _measure(self, model, args, kwargs) -> Callable[[], Measured]:
        """PaddleOCR's own ``eval`` with the arguments it was called with, on the model as it is: its metrics, and
        per-sample units where its metric counts samples (``_UnitTap``)."""
        original = self._originals["eval"]

        def measure() -> Measured:
            call_args, call_kwargs, tap = _tapped(args, kwargs, _eval_class(args, kwargs))
            return original(model, *call_args, **call_kwargs), tap.array()

        return measure

    def _eval(self, model, *args, **kwargs):
        original = self._originals["eval"]
        if self.ema is None:  # eval outside train (not through this launcher's train)
            return original(model, *args, **kwargs)
        c = self.config
        if self._policy.raw_weights_now(self.ema):
            metric = original(model, *args, **kwargs)
            self.board.winner = RAW
            return dict(metric, **raw_suffixed(metric)) if c.eval_raw else metric
        self._eval_call = (args, kwargs)
        key = getattr(_eval_class(args, kwargs), "main_indicator", None)
        drift = {}

        def before(label: str) -> None:
            if label == self.board.primary:
                drift[DRIFT] = log_before_eval(self.ema)

        results, units = evaluate_candidates(self.board.to_evaluate(), lambda label: self.board.weights(label, model),
                                             self._measure(model, args, kwargs), before)
        winner = self.board.pick(results, key, units) if key else self.board.primary
        self.board.record(self.ema.num_steps, results, key or "", winner)
        metric = self.board.logged(results, winner)
        metric[DRIFT] = drift.get(DRIFT)  # PaddleOCR logs it and hands it to its W&B/VisualDL writer
        return metric

    # ---------------------------------------------------------------- save
    def _save_model(self, model, optimizer, model_path, logger_, config, is_best=False, prefix="ppocr", **kwargs):
        original = self._originals["save_model"]
        relatives = [prefix] + ([os.path.join("best_model", "model")] if prefix == "best_accuracy" else [])
        if self.ema is None:
            stale = [r for r in stale_state_files(relatives) if os.path.isfile(os.path.join(model_path, r))]
            if not stale:
                return original(model, optimizer, model_path, logger_, config, is_best=is_best, prefix=prefix,
                                **kwargs)
            return save_without_stale_state(  # EMA off over an EMA run's set: its .pdema goes with the save
                model_path, relatives, stale,
                lambda stage: original(model, optimizer, stage.tmp,
                                       FinalPathLogger(logger_, stage.tmp, os.path.abspath(model_path).rstrip(os.sep)),
                                       config, is_best=is_best, prefix=prefix, **kwargs))
        if prefix == "latest":
            self._save_call = (optimizer, model_path, config, dict(kwargs))
        raw = numpy_state(unwrap(model))
        with StagedWrite(model_path) as stage:  # a crash never leaves a partial file under a final name
            log = FinalPathLogger(logger_, stage.tmp, os.path.abspath(model_path).rstrip(os.sep))
            # best_accuracy holds the candidate selected at the evaluation that made it best (select: best), or at
            # the end the one length: auto picked
            chosen = self.board.winner if prefix == "best_accuracy" and self.board.winner else self.board.primary
            if prefix == "best_accuracy" and self._pick is not None:
                chosen = self._pick
            if self.config.save_as == "raw" or before_eval_start(self.ema, self.config) or chosen == RAW:
                # raw: PaddleOCR's files untouched; before eval_start_step the best model is chosen on raw weights
                result = original(model, optimizer, stage.tmp, log, config, is_best=is_best, prefix=prefix, **kwargs)
                held, label = raw, RAW
            else:
                weights = self.auto.weights(chosen, model) if self._pick is not None and chosen == self._pick \
                    else self.ema.swapped(model, chosen)
                with weights:
                    result = original(model, optimizer, stage.tmp, log, config, is_best=is_best, prefix=prefix,
                                      **kwargs)
                    held, label = numpy_state(model), chosen
            if is_rank0():
                sha1 = save_ema_state(self.ema, [stage.path(r) for r in relatives], unwrap(model), raw, held,
                                      self.config.save_as,
                                      candidate=chosen if self.board.active or self.auto is not None else None)
                stage.record_sets({r: {"hold": label, "sha1": sha1} for r in relatives})
                which = f"; {prefix}.pdparams hold {chosen}" if self.board.active else ""
                logger.info("EMA: saved %s.pdema (%s%s)", os.path.join(model_path, prefix), self.ema.summary(), which)
            stage.publish(last=tuple(r + ".pdema" for r in relatives))
        return result


class _UnitTap:
    """A PaddleOCR metric that counts samples (``correct_num`` / ``all_num``: the recognizers' ``acc``), watched for a
    paired comparison of candidates: each sample's (correct, 1) where its input is a batch of ``(preds, labels)``
    pairs (``RecMetric``), else each call's (correct, count). The metric itself gets every call as it came, so its
    sums (and their last bits) are PaddleOCR's own; the per-sample counts come from a shallow copy of it called one
    sample at a time."""

    def __init__(self, metric):
        self._metric, self.pairs, self._single = metric, [], None

    @staticmethod
    def _counts(metric):
        return getattr(metric, "correct_num", None), getattr(metric, "all_num", None)

    def _record(self, metric, *args, **kwargs):
        before = self._counts(metric)
        out = metric(*args, **kwargs)
        after = self._counts(metric)
        if all(isinstance(v, (int, float)) for v in before + after) and after[1] > before[1]:
            self.pairs.append((after[0] - before[0], after[1] - before[1]))
        return out

    def __call__(self, *args, **kwargs):
        pair = args[0] if args else None
        if isinstance(self._counts(self._metric)[1], (int, float)) and isinstance(pair, (tuple, list)) and \
                len(pair) == 2 and all(isinstance(p, list) for p in pair) and len(pair[0]) == len(pair[1]) > 1:
            out = self._metric(*args, **kwargs)
            if self._single is None:
                self._single = copy.copy(self._metric)
            for pred, label in zip(*pair):  # one sample at a time, on the copy: per-sample units
                self._record(self._single, ([pred], [label]), *args[1:], **kwargs)
            return out
        return self._record(self._metric, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._metric, name)

    def array(self):
        return ratio_units(self.pairs)


def _eval_class(args, kwargs):
    """The metric object among ``program.eval``'s arguments (its third, ``eval_class``)."""
    return kwargs.get("eval_class", args[2] if len(args) > 2 else None)


def _tapped(args, kwargs, eval_class):
    """``program.eval``'s arguments with ``eval_class`` watched by a ``_UnitTap`` (args, kwargs, the tap)."""
    tap = _UnitTap(eval_class)
    call_args, call_kwargs = list(args), dict(kwargs)
    if eval_class is None:
        return call_args, call_kwargs, tap  # nothing to watch: its array() is None
    if "eval_class" in call_kwargs or len(call_args) <= 2:
        call_kwargs["eval_class"] = tap
    else:
        call_args[2] = tap
    return call_args, call_kwargs, tap


def _batch_info(config: Dict[str, Any], train_dataloader):
    """The global batch from what the loader yields (``loader_batch``: PaddleOCR's ``MultiScaleSampler`` yields fewer
    than ``Train.loader.batch_size_per_card`` at its larger scales) x ranks (PaddleOCR 2.x/3.x train without gradient
    accumulation); the training set's size and the run's length (``Global.epoch_num``)."""
    from ema_callback.integrations.loader_batch import suite_batch_info

    configured = ((config.get("Train") or {}).get("loader") or {}).get("batch_size_per_card")
    if not isinstance(configured, int) or configured <= 0:
        configured = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_size", None) or 0
    return suite_batch_info(train_dataloader, getattr(train_dataloader, "dataset", None), configured,
                            (config.get("Global") or {}).get("epoch_num"))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ema_callback import paddle_compat  # noqa: F401  (the supported-range check; binds zlib before the suite imports paddle)
    root = resolve_root(args.paddleocr_root)
    suite, config, wanted, suite_overrides = read_run_config(args.config, args.ema_config, args.opt,
                                                             PADDLEOCR.name, resolve_block)
    _check_relative_paths(suite, suite_overrides, root)
    save_dir = _global_value(suite, suite_overrides, "save_model_dir")
    _check_start_files(suite, suite_overrides)
    train_script = os.path.join(root, "tools", "train.py")
    argv_for_paddleocr = [train_script, "-c", args.config]
    if suite_overrides:
        argv_for_paddleocr += ["-o", *suite_overrides]
    if args.profiler_options:
        argv_for_paddleocr += ["-p", args.profiler_options]
    program = import_program(root)
    guard = OutputGuard(save_dir if config.enable else None)
    hooks = PaddleOCRHooks(program, config, guard if config.enable else None,
                           resolved_block=config.to_block() if wanted else None)
    locks = lock_run(save_dir)  # with the EMA off too: its saves may remove an earlier EMA run's .pdema
    try:
        run_suite_script(root, os.path.join("tools", "train.py"), argv_for_paddleocr[1:], [guard, hooks.installed()],
                         ADAPTER.suite.name)
        return 0
    finally:
        release_all(locks)


class PaddleOCRAdapter(SuiteAdapter):
    """PaddleOCR's answers to the shared layer (``suite_adapter``)."""

    suite = PADDLEOCR

    def eval_weights_option(self, prefix: str) -> str:
        return f"Global.checkpoints={prefix}"

    def install_eval_check(self, check) -> None:
        import ppocr.utils.save_load as save_load

        original = save_load.load_model

        def load_model(config, model, *args, **kwargs):
            check(model)
            return original(config, model, *args, **kwargs)

        save_load.load_model = load_model  # tools/eval.py imports the name after this

    def eval_metric(self, log: str, wanted: Optional[str]) -> Tuple[float, str]:
        """The lines ``INFO: name:value`` after tools/eval.py's ``metric eval ***`` banner: ``wanted``, else the
        first (the main indicator)."""
        after = log.split("metric eval ***************")[-1]
        pairs = re.findall(r"INFO: (\w+):([-\d.e]+)\s*$", after, re.M)
        if not pairs:
            raise EMAConfigError("tools/eval.py: no metric lines after 'metric eval' in its output")
        name = wanted or pairs[0][0]
        values = dict(pairs)
        if name not in values:
            raise EMAConfigError(f"--metric {name}: not among {', '.join(values)}")
        return float(values[name]), name


ADAPTER = PaddleOCRAdapter()


# Paths PaddleOCR opens relative to the working directory.
_PATH_KEYS = (("Global", "character_dict_path"), ("Train", "dataset", "data_dir"), ("Eval", "dataset", "data_dir"),
              ("Train", "dataset", "label_file_list"), ("Eval", "dataset", "label_file_list"))


def _check_relative_paths(suite: Dict[str, Any], overrides: List[str], root: str) -> None:
    """A relative path of the config that does not exist from the working directory: one line saying why."""
    values = {".".join(keys): suite_value(suite, overrides, *keys) for keys in _PATH_KEYS}
    for key, value in values.items():
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and path and not os.path.isabs(path) and not os.path.exists(path):
                raise EMAConfigError(
                    f"{key}: {path} does not exist from the working directory {os.getcwd()}; PaddleOCR opens "
                    f"relative paths from there: run from the PaddleOCR checkout (cd {root}), as PaddleOCR's own "
                    "docs do, or give an absolute path")


def _global_value(suite: Dict[str, Any], overrides: List[str], key: str) -> Any:
    """``Global.<key>`` after the ``-o`` overrides (read as PaddleOCR reads them)."""
    return suite_value(suite, overrides, "Global", key)


def _check_start_files(suite: Dict[str, Any], overrides: List[str]) -> None:
    """Every file PaddleOCR's ``load_model`` will unpickle (``pickle.load``/``paddle.load``, which run any code a file
    names) is read first by the bounded, code-free reader: the set of ``Global.checkpoints`` (``.pdparams``,
    ``.pdopt``, ``.states``, and our ``.pdema``), ``Global.pretrained_model`` and a distillation config's
    ``Architecture.Models.*.pretrained``; a file that fails is refused in one line before PaddleOCR starts (a URL is
    PaddleOCR's to download and read)."""
    for key, suffixes in (("checkpoints", (".pdparams", ".pdopt", ".states", ".pdema")),
                          ("pretrained_model", (".pdparams",))):
        value = _global_value(suite, overrides, key)
        if isinstance(value, str) and value and "://" not in value:
            check_checkpoint_files(checkpoint_prefix(value), suffixes, f"Global.{key}")
    models = (suite.get("Architecture") or {}).get("Models") if isinstance(suite.get("Architecture"), dict) else None
    for name, sub in (models or {}).items() if isinstance(models, dict) else ():
        value = sub.get("pretrained") if isinstance(sub, dict) else None
        if isinstance(value, str) and value and "://" not in value:
            check_checkpoint_files(checkpoint_prefix(value), (".pdparams",), f"Architecture.Models.{name}.pretrained")
