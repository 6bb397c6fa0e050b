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
import logging
import os
import runpy
import sys
from typing import Any, Dict, List, Optional

from .checkout import check_checkout
from .config import EMAConfig, EMAConfigError, has_ema_request, read_yaml, resolve_block, split_overrides
from .files import StagedWrite
from .guard import OutputGuard

logger = logging.getLogger("ema_callback")

ROOT_ENV = "PADDLEOCR_ROOT"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ema-callback ocr-train",
                                description="PaddleOCR's tools/train.py with EMA from the YAML's EMA: section.")
    p.add_argument("-c", "--config", required=True, help="PaddleOCR YAML config")
    p.add_argument("-o", "--opt", nargs="+", action="extend", default=[], metavar="Key.sub=value",
                   help="overrides, as tools/train.py takes them; EMA.* keys work without an EMA: section")
    p.add_argument("-p", "--profiler_options", default=None)
    p.add_argument("--paddleocr-root", default=None, help=f"PaddleOCR checkout (default: ${ROOT_ENV})")
    p.add_argument("--ema-config", default=None, help="a ready EMA: block merged under the YAML's own section")
    return p


def resolve_root(explicit: Optional[str]) -> str:
    """The PaddleOCR checkout, checked: ``tools/train.py``, ``tools/program.py`` and ``ppocr/`` must exist."""
    root = explicit or os.environ.get(ROOT_ENV)
    if not root:
        raise EMAConfigError(f"--paddleocr-root / ${ROOT_ENV}: not set; point it at a PaddleOCR git checkout "
                             "(the pip wheel lacks the training code)")
    return check_checkout(root, "--paddleocr-root", "PaddleOCR",
                          ("tools/train.py", "tools/program.py", "ppocr/__init__.py"))


def import_program(root: str):
    """Import ``tools.program`` from ``root`` and check that it is that checkout's module."""
    if root not in sys.path:
        sys.path.insert(0, root)
    import tools.program as program

    expected = os.path.join(root, "tools", "program.py")
    found = os.path.abspath(program.__file__)
    if os.path.realpath(found) != os.path.realpath(expected):
        raise EMAConfigError(f"--paddleocr-root {root}: imported tools.program from {found}, expected {expected} "
                             "(another 'tools' package shadows the checkout; run from elsewhere or fix PYTHONPATH)")
    return program


class PaddleOCRHooks:
    """The four wrapped seams of ``tools.program``; ``install()`` / ``uninstall()`` (a context manager)."""

    def __init__(self, program, config: EMAConfig, guard: Optional[OutputGuard] = None):
        self.program = program
        self.config = config
        self.guard = guard
        self.ema = None
        self.model = None
        self.counter = None
        self._originals: Dict[str, Any] = {}
        self._told_raw_eval = False

    @contextlib.contextmanager
    def installed(self):
        for name, wrapper in (("train", self._train), ("eval", self._eval), ("save_model", self._save_model)):
            self._originals[name] = getattr(self.program, name)
            setattr(self.program, name, wrapper)
        try:
            yield self
        finally:
            for name, original in self._originals.items():
                setattr(self.program, name, original)
            if self.counter is not None:
                self.counter.close()

    # ---------------------------------------------------------------- train
    def _train(self, config, train_dataloader, valid_dataloader, device, model, loss_class, optimizer,
               lr_scheduler, post_process_class, eval_class, pre_best_model_dict, logger_, *args, **kwargs):
        from .engine import ExponentialMovingAverage
        from .watch import OptimizerStepCounter

        self.model = model
        self.ema = ExponentialMovingAverage(model, self.config, optimizer=optimizer)
        checkpoints = (config.get("Global") or {}).get("checkpoints")
        if checkpoints:
            self._resume(checkpoints, model, logger_)
        if self.guard is not None:
            self.guard.release()  # the EMA is set up: from here on the run's files are the run's
        self.counter = OptimizerStepCounter(optimizer, on_update=self.ema.step)
        logger_.info("EMA: %s", ", ".join(f"{k}: {v}" for k, v in self.config.to_block().items()))
        result = self._originals["train"](config, train_dataloader, valid_dataloader, device, model, loss_class,
                                          optimizer, lr_scheduler, post_process_class, eval_class,
                                          pre_best_model_dict, logger_, *args, **kwargs)
        logger.info("EMA: finished: %s", self.ema.summary())
        return result

    def _resume(self, checkpoints: str, model, logger_) -> None:
        prefix = checkpoints[: -len(".pdparams")] if checkpoints.endswith(".pdparams") else checkpoints
        path = prefix + ".pdema"
        if not os.path.exists(path):
            logger_.warning("EMA: no EMA state at %s; the EMA starts from the loaded weights at update 0%s", path,
                            " (with save_as: ema those are EMA weights: the raw weights of that run are lost)"
                            if self.config.save_as == "ema" else "")
            return
        state = self.ema.load(path)
        raw = state.get("raw_weights")
        if raw:
            from .selection import unwrap
            unwrap(model).set_state_dict(raw)
        logger_.info("EMA: resumed from %s at optimizer step %d (%d updates); raw weights %s", path,
                     self.ema.num_steps, self.ema.num_updates, "restored from it" if raw else "from the checkpoint")

    # ---------------------------------------------------------------- eval
    def _eval(self, model, *args, **kwargs):
        original = self._originals["eval"]
        if self.ema is None:  # eval outside train (not through this launcher's train)
            return original(model, *args, **kwargs)
        c = self.config
        if self.ema.num_steps < c.eval_start_step:
            if not self._told_raw_eval:
                logger.info("EMA: evaluating raw weights until optimizer step %d (eval_start_step)",
                            c.eval_start_step)
                self._told_raw_eval = True
            metric = original(model, *args, **kwargs)
            return dict(metric, **{f"{k}_raw": v for k, v in metric.items()}) if c.eval_raw else metric
        raw_metric = original(model, *args, **kwargs) if c.eval_raw else {}
        drift = self.ema.log_before_eval()
        with self.ema.swapped(model):
            metric = original(model, *args, **kwargs)
        metric = dict(metric)
        metric.update({f"{k}_raw": v for k, v in raw_metric.items()})
        metric["ema_drift"] = drift  # PaddleOCR logs it and hands it to its W&B/VisualDL writer
        return metric

    # ---------------------------------------------------------------- save
    def _save_model(self, model, optimizer, model_path, logger_, config, is_best=False, prefix="ppocr", **kwargs):
        original = self._originals["save_model"]
        if self.ema is None:
            return original(model, optimizer, model_path, logger_, config, is_best=is_best, prefix=prefix, **kwargs)
        from .callback import _is_rank0
        raw = {k: v.numpy() for k, v in _unwrapped(model).state_dict().items()}
        relatives = [prefix] + ([os.path.join("best_model", "model")] if prefix == "best_accuracy" else [])
        with StagedWrite(model_path) as stage:  # a crash never leaves a partial file under a final name
            if self.config.save_as == "raw" or self.ema.num_steps < self.config.eval_start_step:
                # raw: PaddleOCR's files untouched; before eval_start_step the best model is chosen on raw weights
                result = original(model, optimizer, stage.tmp, logger_, config, is_best=is_best, prefix=prefix,
                                  **kwargs)
            else:
                with self.ema.swapped(model):
                    result = original(model, optimizer, stage.tmp, logger_, config, is_best=is_best, prefix=prefix,
                                      **kwargs)
            if _is_rank0():
                for relative in relatives:
                    self.ema.save(stage.path(relative + ".pdema"), extra={"raw_weights": raw})
                    if self.config.save_as == "raw":
                        self.ema.export(stage.path(relative + ".ema.pdparams"), _unwrapped(model))
                logger.info("EMA: saved %s.pdema (%s)", os.path.join(model_path, prefix), self.ema.summary())
            stage.publish(last=tuple(r + ".pdema" for r in relatives))
        return result


def _unwrapped(model):
    from .selection import unwrap
    return unwrap(model)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import paddle_compat  # noqa: F401  (the supported-range check; binds zlib before the suite imports paddle)
    root = resolve_root(args.paddleocr_root)
    suite = read_yaml(args.config)
    if not isinstance(suite, dict):
        raise EMAConfigError(f"{args.config}: expected a PaddleOCR YAML mapping")
    ema_overrides, suite_overrides = split_overrides(args.opt)
    wanted = has_ema_request(suite, args.ema_config, ema_overrides)
    config = resolve_block(suite, args.ema_config, ema_overrides) if wanted else EMAConfig(enable=False)
    save_dir = _save_dir(suite, suite_overrides)
    train_script = os.path.join(root, "tools", "train.py")
    argv_for_paddleocr = [train_script, "-c", args.config]
    if suite_overrides:
        argv_for_paddleocr += ["-o", *suite_overrides]
    if args.profiler_options:
        argv_for_paddleocr += ["-p", args.profiler_options]
    program = import_program(root)
    saved_argv = sys.argv
    sys.argv = argv_for_paddleocr
    try:
        if not config.enable:
            runpy.run_path(train_script, run_name="__main__")
            return 0
        guard = OutputGuard(save_dir)
        hooks = PaddleOCRHooks(program, config, guard)
        with guard, hooks.installed():
            runpy.run_path(train_script, run_name="__main__")
        return 0
    finally:
        sys.argv = saved_argv


def _save_dir(suite: Dict[str, Any], overrides: List[str]) -> Optional[str]:
    """``Global.save_model_dir`` after ``-o`` overrides (for rolling back files on an EMA error)."""
    value = (suite.get("Global") or {}).get("save_model_dir")
    for text in overrides:
        key, _, raw = text.partition("=")
        if key.strip() == "Global.save_model_dir":
            value = raw.strip()
    return value
