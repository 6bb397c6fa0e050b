"""PaddleDetection: the ``EMA:`` section driving ppdet's own ``Trainer`` on our engine.

    ema-callback det-train -c cfg.yml [-o key=val ...] [--eval] [-r ckpt] [--amp] [--paddledet-root DIR]

runs the checkout's own ``tools/train.py`` with ``ppdet.engine.Trainer`` replaced by ``EMATrainer``, a
subclass that puts our engine in the place of ``trainer.ema`` (the seam ppdet's loop already calls:
``ema.update()`` after every iteration, ``ema.apply()`` before each snapshot's save and evaluation,
``ema.resume()`` from ``load_weight``). Everything else is ppdet's: the loop, the evaluation, the
Checkpointer and its file convention (``.pdparams`` = EMA weights, so ppdet's ``tools/eval.py``,
``tools/export_model.py`` and ``tools/infer.py`` use them; ``.pdema`` = raw weights). Our update count,
shadow and settings ride in the ``.pdema`` under ``ema_callback_state``, so ``-r`` resumes exactly.

What differs from ppdet's ``ModelEMA`` (``ppdet/optimizer/ema.py``), on purpose:

* resume is exact (ppdet feeds its bias-corrected ``.pdparams`` back as the uncorrected average: with
  ``ema_decay_type: normal`` the resumed EMA comes back ~1/(1-d^step) too large, ~50x at step 100);
* excluded (``ema_black_list``) parameters keep training: ``apply()`` returns copies and never sets
  ``stop_gradient`` (ppdet sets it on the live parameters, which then stop training);
* the shadow is float32 under AMP O2 (ppdet's is float16 and freezes), and from the fp32 master weights;
* ``cycle_epoch`` counts epochs (ppdet counts snapshots);
* a step the AMP GradScaler skipped is not an update.

Several EMAs (``decays``, half-life lists) and ``eval_raw``: at each snapshot evaluation the other candidates are
evaluated first through ppdet's own ``_eval_with_loader`` with only a metric-reading callback (so ppdet's
Checkpointer saves nothing for them), then ppdet's own evaluation runs on the selected candidate (the primary, or
with ``select: best`` the best by the Checkpointer's metric), so ``best_model.pdparams`` holds it. The global batch
is ``TrainReader.batch_size`` x ranks; the training set's size is ``len(TrainDataset)``.

ppdet's flat keys (``use_ema``, ``ema_decay``, ``ema_decay_type``, ``cycle_epoch``, ``ema_black_list``,
``ema_filter_no_grad``) without an ``EMA:`` block run on this engine with the equivalent settings. An ``EMA:``
section, ``--ema-config`` block or ``-o EMA.*`` on a config whose ``use_ema`` is true replaces ppdet's EMA: one line
names the ppdet keys it replaced (their ``ema_black_list`` is not carried over: the block's ``exclude`` is).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import runpy
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ema_callback.config.files import (
    check_section_name,
    load_suite_yaml,
    read_yaml,
    resolve_block,
    split_overrides,
    why_disabled,
)
from ema_callback.config.schema import SECTION, EMAConfig, EMAConfigError
from ema_callback.core.run_report import log_start
from ema_callback.errors import EMAError
from ema_callback.files.checkpoint_io import checked_load
from ema_callback.files.checkpoint_set import StagedWrite
from ema_callback.files.state_file import read_state
from ema_callback.integrations.auto_length import AutoPick, saved_plan
from ema_callback.integrations.auto_length import resolve as resolve_length
from ema_callback.integrations.candidate_eval import Measured, evaluate_candidates
from ema_callback.integrations.candidates import RAW, CandidateBoard
from ema_callback.integrations.checkpoints import (
    STATE_KEY,
    check_checkpoint_files,
    check_missing_state,
    checkpoint_prefix,
    describe_start_weights,
    ema_file,
    is_rank0,
    lock_run,
    numpy_state,
    place_features,
    ppdet_state,
    restore_raw_weights,
    stale_state_files,
)
from ema_callback.integrations.evaluation import before_eval_start
from ema_callback.integrations.suite_adapter import SuiteAdapter, import_from_checkout, release_all, run_suite_script
from ema_callback.integrations.suite_checkout import PADDLEDET, find_checkout

logger = logging.getLogger("ema_callback")

ROOT_ENV = PADDLEDET.env
FLAT_KEYS = ("use_ema", "ema_decay", "ema_decay_type", "cycle_epoch", "ema_black_list", "ema_filter_no_grad")
DET_ONLY_UNSUPPORTED = {"save_as": "ema"}


# ---------------------------------------------------------------------------- configuration
MAX_BASE_FILES = 64  # a ppdet config reads 5-10; a file listed twice at every level would make it exponential


def load_ppdet_yaml(path: str, _seen: Tuple[str, ...] = (), _count: Optional[List[int]] = None) -> Dict[str, Any]:
    """A ppdet config with its ``_BASE_`` files merged (later files and the file itself win)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise EMAConfigError(f"{path}: _BASE_ includes itself")
    _count = [0] if _count is None else _count
    _count[0] += 1
    if _count[0] > MAX_BASE_FILES:
        raise EMAConfigError(f"{path}: more than {MAX_BASE_FILES} _BASE_ files read for one config (a file listed "
                             "more than once at several levels?)")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise EMAConfigError(f"{path}: expected a YAML mapping")
    merged: Dict[str, Any] = {}
    for base in data.get("_BASE_", []) or []:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise EMAConfigError(f"{path}: _BASE_ entry {base!r} resolves to {os.path.abspath(base_path)}, which does "
                                 "not exist; _BASE_ paths are relative to the file that names them: fix the path "
                                 "(an absolute path into your PaddleDetection checkout works from anywhere)")
        _deep_merge(merged, load_ppdet_yaml(base_path, _seen + (path,), _count))
    _deep_merge(merged, {k: v for k, v in data.items() if k != "_BASE_"})
    return merged


def _deep_merge(into: Dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def from_ppdet_flat_keys(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``EMA:`` block equivalent to ppdet's flat ``use_ema`` keys."""
    kind = cfg.get("ema_decay_type", "threshold")
    schedules = {"threshold": {"schedule": "threshold"}, "exponential": {"schedule": "exponential", "tau": 2000.0},
                 "normal": {"schedule": "constant", "bias_correction": True}}
    if kind not in schedules:
        raise EMAConfigError(f"ema_decay_type: expected one of threshold, exponential, normal, got {kind!r}")
    block: Dict[str, Any] = {"decay": cfg.get("ema_decay", 0.9998), **schedules[kind]}
    black = cfg.get("ema_black_list") or []
    if black:
        block["exclude"] = [re.escape(str(name)) for name in black]  # ppdet matches substrings
    return block


def resolve_det_config(suite: Mapping[str, Any], block_file: Optional[str], overrides) -> Tuple[EMAConfig, Dict]:
    """(EMAConfig, extra) from ``EMA:`` (block file < suite section < -o) or from ppdet's flat keys."""
    flat = {k: suite[k] for k in FLAT_KEYS if k in suite}
    has_block = SECTION in suite or block_file or overrides
    extra = {"cycle_epoch": int(flat.get("cycle_epoch", -1) or -1),
             "filter_no_grad": bool(flat.get("ema_filter_no_grad", False))}
    if has_block:
        config = resolve_block(suite, block_file, overrides)
        if flat.get("use_ema"):  # the explicit request is the user's intent: ours replaces ppdet's
            logger.info("EMA: the %s replaces PaddleDetection's own EMA: %s ignored",
                        "--ema-config block" if block_file and SECTION not in suite else f"{SECTION}: section",
                        ", ".join(f"{k}: {flat[k]}" for k in FLAT_KEYS if k in flat))
            extra = {"cycle_epoch": -1, "filter_no_grad": False}
    elif flat.get("use_ema"):
        config = EMAConfig.from_block(from_ppdet_flat_keys(flat))
        extra["black_list"] = [str(name) for name in flat.get("ema_black_list") or []]
    else:
        return EMAConfig(enable=False), extra
    for key, supported in DET_ONLY_UNSUPPORTED.items():
        if getattr(config, key) != supported:
            raise EMAConfigError(f"{SECTION}.{key}: det-train keeps ppdet's convention ({key}: {supported!r}); "
                                 f"got {getattr(config, key)!r}")
    return config, extra


def _check_black_list(model, black_list: List[str]) -> None:
    """Each ``ema_black_list`` entry (ppdet's flat key: a substring of tensor names, which ppdet's own ModelEMA
    ignores when it is in none) must be in a tensor name of the model: else one line naming the key, as the
    ``EMA.exclude`` it becomes would say under its own name."""
    names = list(model.state_dict())
    for entry in black_list:
        if not any(entry in name for name in names):
            example = f" (names like {names[0]!r})" if names else ""
            raise EMAConfigError(f"ema_black_list: {entry!r} is in no tensor name of the model{example}; fix or "
                                 "remove it")


# ---------------------------------------------------------------------------- ppdet glue
class PpdetEMA:
    """ppdet's ``ModelEMA`` interface (``update``, ``apply``, ``resume``) over ``ExponentialMovingAverage``."""

    def __init__(self, model, config: EMAConfig, optimizer=None, cycle_epoch: int = -1,
                 resume_path: Optional[str] = None, batch=None):
        from ema_callback.core.engine import ExponentialMovingAverage
        from ema_callback.integrations.optimizer_steps import OptimizerStepCounter

        self.engine = ExponentialMovingAverage(model, config, optimizer=optimizer, batch=batch)
        self.model = model
        self.optimizer = optimizer
        self.cycle_epoch = cycle_epoch
        self.resume_path = resume_path
        self.epoch = -1
        self.counter = (OptimizerStepCounter(optimizer, read_found_inf=not self.engine.deferred)
                        if optimizer is not None else None)

    @property
    def step(self) -> int:  # ppdet's attribute name
        return self.engine.num_updates

    def update(self, model=None) -> None:
        """Called by ppdet after every iteration: one EMA step per real optimizer update since the last call."""
        flags = self.counter.pop_flags() if self.counter is not None else [None]
        for found_inf in flags:
            self.engine.step(found_inf=found_inf)

    def apply(self) -> Dict[str, Any]:
        """The EMA state dict ppdet puts into the model for saving and evaluation (copies; nothing aliased)."""
        import paddle

        if before_eval_start(self.engine, self.engine.config):
            values = {k: paddle.to_tensor(v.numpy()) for k, v in self.model.state_dict().items()}
        else:
            values = {k: paddle.to_tensor(v) for k, v in self.weights().items()}
        return values

    def weights(self, shadow=0) -> Dict[str, Any]:
        """The EMA's full state dict (numpy); with ``recompute_bn`` its BatchNorm statistics recomputed."""
        if "recompute_bn" not in self.engine.features:
            return self.engine.ema_state_dict(self.model, shadow)
        with self.engine.swapped(self.model, shadow):
            return numpy_state(self.model)

    def start_epoch(self, epoch_id: int) -> None:
        """Called on every rank as each training epoch begins (the raw weights are in the model then): after every
        ``cycle_epoch`` epochs the EMA restarts from them. ppdet resets inside ``apply()``, which runs only on rank 0
        and only at snapshot epochs, so its period depends on ``snapshot_epoch`` and its ranks diverge."""
        if epoch_id == self.epoch:  # ppdet's evaluation calls on_epoch_begin again within the same epoch
            return
        self.epoch = epoch_id
        if self.cycle_epoch > 0 and epoch_id > 0 and epoch_id % self.cycle_epoch == 0:
            logger.info("EMA: cycle_epoch %d reached after epoch %d: the EMA restarts from the current weights",
                        self.cycle_epoch, epoch_id)
            self.engine.reset()

    def resume(self, state_dict, step: int = 0) -> None:
        """From ppdet's ``load_weight``: our exact state when the ``.pdema`` carries it, else the saved EMA weights."""
        state = None
        if self.resume_path:
            source = ema_file(self.resume_path)
            data = checked_load(source) if os.path.exists(source) else {}
            if isinstance(data, dict) and STATE_KEY in data:
                state = read_state(source, key=STATE_KEY)[STATE_KEY]
        if state is not None:
            self.engine.set_state_dict(state, source=source)
            logger.info("EMA: resumed from %s at optimizer step %d (%d updates)", source, self.engine.num_steps,
                        self.engine.num_updates)
            return
        self.engine.load_average({k: v.numpy() if hasattr(v, "numpy") else v for k, v in state_dict.items()},
                                 num_steps=int(step))
        logger.warning("EMA: %s has no %s entry (a checkpoint of ppdet's own EMA): starting from its EMA "
                       "weights at step %d", self.resume_path, STATE_KEY, step)


def _make_trainer_class(config: EMAConfig, extra: Dict[str, Any]):
    from ppdet.engine import Trainer
    from ppdet.engine.callbacks import Callback, ComposeCallback

    class EMAStateCallback(Callback):
        """Before ppdet's Checkpointer: put our state into the raw-weights dict it saves as ``.pdema``; read each
        evaluation's main metric (before ppdet resets its metrics)."""

        def on_epoch_begin(self, status):
            if status.get("mode") == "train" and isinstance(self.model.ema, PpdetEMA):
                self.model.ema.start_epoch(status["epoch_id"])

        def on_epoch_end(self, status):
            weight = status.get("weight")
            if status.get("mode") == "eval":
                self.model._ema_eval_metrics = _main_metrics(self.model)
                board = getattr(self.model, "_ema_board", None)
                if isinstance(weight, dict) and board is not None and board.active:
                    # a best_model saved now holds the selected candidate: its .pdema refers to those weights
                    weight[STATE_KEY] = ppdet_state(self.model.ema.engine, weight, numpy_state(self.model.model),
                                                    pdparams_hold=board.winner or board.primary)
                return
            if isinstance(weight, dict) and isinstance(self.model.ema, PpdetEMA):
                # the Checkpointer saves the network (EMA weights now) as .pdparams: the shadow refers to it
                weight[STATE_KEY] = ppdet_state(self.model.ema.engine, weight, numpy_state(self.model.model))

    class EMATrainer(Trainer):
        """ppdet's Trainer with our engine as ``trainer.ema``."""

        def __init__(self, cfg, mode="train"):
            if mode == "train" and config.enable:
                cfg["use_ema"] = False  # ppdet would build its own ModelEMA (a full copy) only for us to replace it
            super().__init__(cfg, mode=mode)
            self._resume_path = None
            if mode == "train" and config.enable:
                cfg["use_ema"] = self.use_ema = True  # ppdet's EMA code paths (apply at snapshots, .pdema files)
                _check_black_list(self.model, extra.get("black_list") or [])
                ema_config = config
                if extra.get("filter_no_grad"):
                    frozen = [re.escape(n) for n, p in self.model.named_parameters()
                              if p.stop_gradient and not n.endswith(("_mean", "_variance"))]
                    ema_config = config.replace(exclude=list(config.exclude) + [f"^{n}$" for n in frozen])
                batch = _batch_info(cfg, self)
                resumed = saved_plan(ema_file(extra["resume"])) if extra.get("resume") and ema_config.auto else None
                ema_config, plan = resolve_length(ema_config, batch, cfg.save_dir, resumed=resumed)
                self.ema = PpdetEMA(self.model, ema_config, optimizer=self.optimizer,
                                    cycle_epoch=extra.get("cycle_epoch", -1), batch=batch)
                self._ema_board = CandidateBoard(self.ema.engine, ema_config)
                self._ema_auto = AutoPick(self.ema.engine, plan) if plan is not None else None
                if plan is not None:
                    logger.info("EMA: %s", plan.describe(sum(int(np.prod(e.tensor.shape))
                                                             for e in self.ema.engine.averaged_entries)))
                place_features(self.ema.engine, cfg.save_dir, only_rank0_evaluates=True)  # ppdet: rank 0 only
                self._ema_eval_metrics: Dict[str, float] = {}
                self._ema_state_callback = EMAStateCallback(self)
                self._callbacks.insert(0, self._ema_state_callback)
                self._compose_callback = ComposeCallback(self._callbacks)
                logger.info("EMA: %s", ", ".join(f"{k}: {v}" for k, v in ema_config.to_block().items()))
                log_start(self.ema.engine)

        def _eval_with_loader(self, loader):
            """At a snapshot evaluation with several candidates: the others first (quietly), then ppdet's own on the
            selected one (the model holds the primary EMA here: ppdet applied it)."""
            board = getattr(self, "_ema_board", None)
            raw = self.status.get("weight")
            if board is None or not board.active or not isinstance(raw, dict) or \
                    before_eval_start(self.ema.engine, board.config):  # raw weights until eval_start_step
                return super()._eval_with_loader(loader)
            engine = self.ema.engine
            labels = board.to_evaluate()
            nested = labels if board.config.select == "best" else labels[:-1]

            @contextlib.contextmanager
            def holding(label: str):  # ppdet puts the weights it evaluates next in itself: no restore here
                logger.info("EMA: evaluating candidate %s", label)
                self.model.set_dict(raw if label == RAW else self.ema.weights(label))
                yield

            results, _ = evaluate_candidates(nested, holding, self._ema_measure(loader))
            key = next(iter(next(iter(results.values()), {})), None) if results else None
            chosen = board.pick(results, key) if board.config.select == "best" and key else board.primary
            self.model.set_dict(raw if chosen == RAW else self.ema.weights(chosen))
            board.winner = chosen
            super()._eval_with_loader(loader)  # ppdet's own: its Checkpointer compares and saves best_model
            results.setdefault(chosen, dict(self._ema_eval_metrics))
            key = key or next(iter(results[chosen]), "")
            board.record(engine.num_steps, results, key, chosen)
            self.model.set_dict(self.ema.weights())  # ppdet restores the raw weights after this

        def _ema_measure(self, loader) -> Callable[[], Measured]:
            """ppdet's own ``_eval_with_loader`` on the model as it is, with only a metric-reading callback (its
            Checkpointer saves nothing, its logger prints nothing): the main metrics; mAP is no per-sample mean, so
            no units."""
            def measure() -> Measured:
                own = self._compose_callback
                self._compose_callback = ComposeCallback([self._ema_state_callback])
                try:
                    Trainer._eval_with_loader(self, loader)
                finally:
                    self._compose_callback = own
                return dict(self._ema_eval_metrics), None

            return measure

        def resume_weights(self, weights):
            if isinstance(getattr(self, "ema", None), PpdetEMA):
                self.ema.resume_path = weights
                if not os.path.exists(ema_file(weights)):  # ppdet would load the .pdparams as the raw weights
                    check_missing_state(weights, self.ema.engine.config)
                return super().resume_weights(weights)
            result = super().resume_weights(weights)  # EMA off: ppdet loads the .pdparams (EMA weights, if any)
            restore_raw_weights(weights, self.model, "drop EMA.enable=false (or use -o EMA.enable=true) to continue "
                                "the EMA as well", config=config)
            return result

        def train(self, validate=False):
            ours = isinstance(getattr(self, "ema", None), PpdetEMA)
            try:
                result = super().train(validate)
                if ours:
                    logger.info("EMA: finished: %s", self.ema.engine.summary())
                    if self._ema_auto is not None and is_rank0():  # ppdet evaluates and saves on rank 0 only
                        self._pick_length(validate)
                    self._ema_board.finish(self.cfg.save_dir, write=is_rank0())
            finally:
                if ours:
                    if self.ema.counter is not None:
                        self.ema.counter.close()
                    self.ema.engine.close()  # the model as it was found: no feature's hook stays on it
            return result

        def _pick_length(self, validate: bool) -> None:
            """``length: auto`` at the end (``auto_length``): each candidate through ppdet's own
            ``_eval_with_loader`` (with only a metric-reading callback: its Checkpointer saves nothing); mAP is no
            per-sample mean, so the uncertainty is the noise of the metric over nearby lengths. The pick is saved
            as ``best_model`` and ``model_final`` through ppdet's own ``save_model`` (raw weights in the
            ``.pdema``)."""
            import paddle

            auto = self._ema_auto
            loader = getattr(self, "_eval_loader", None)
            if not validate or loader is None:
                logger.warning("EMA: length auto: no evaluation (--eval) in this run, so nothing can be compared: "
                               "the default length (%s) is kept", auto.length_of(auto.default))
                auto.close()
                return

            with paddle.no_grad():  # as ppdet's train loop evaluates
                label = auto.run(self._ema_measure(loader), self.model,
                                 trend_noise=self._ema_board.noises((auto.default, RAW))).label
            auto.write(self.cfg.save_dir)
            if not auto.evaluated:  # nothing was compared (no EMA update): ppdet's own best_model stays
                auto.close()
                return
            import ppdet.engine.callbacks as ppdet_callbacks

            raw = {k: v for k, v in self.model.state_dict().items()}
            picked = auto.values(label, self.model)
            weight = dict(raw, **{STATE_KEY: ppdet_state(self.ema.engine, raw, picked, pdparams_hold=label)})
            for name in ("best_model", "model_final"):
                ppdet_callbacks.save_model(weight, self.optimizer, self.cfg.save_dir, name, self.cfg.epoch,
                                           ema_model={k: paddle.to_tensor(v) for k, v in picked.items()})
            logger.info("EMA: length auto: %s written as best_model and model_final in %s", label,
                        self.cfg.save_dir)
            auto.close()

    return EMATrainer


def _main_metrics(trainer) -> Dict[str, float]:
    """The main metric of each of ppdet's metrics, read as its Checkpointer reads it (``bbox`` AP, ...)."""
    out: Dict[str, float] = {}
    for metric in getattr(trainer, "_metrics", []) or []:
        results = metric.get_results() or {}
        key = next((k for k in ("pose3d", "bbox", "keypoint", "mask") if k in results), None)
        key = trainer.cfg.get("target_metrics", key)
        if key in results:
            value = results[key]
            out[f"{key}_mAP" if key != "pose3d" else key] = float(value[0] if hasattr(value, "__len__") else value)
    return out


def _batch_info(cfg, trainer):
    """The images per step ppdet's loader yields on one card (``loader_batch``; ``TrainReader.batch_size`` where it
    cannot be counted) x ranks (ppdet has no gradient accumulation); ``len(TrainDataset)``; ``epoch`` epochs."""
    from ema_callback.integrations.loader_batch import suite_batch_info

    return suite_batch_info(getattr(trainer, "loader", None), getattr(trainer, "dataset", None),
                            (cfg.get("TrainReader") or {}).get("batch_size", 0), cfg.get("epoch"))


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ema-callback det-train", add_help=False,
                                description="PaddleDetection's tools/train.py with EMA from the EMA: section. "
                                            "Every other argument (--eval, -r/--resume, --amp, ...) is ppdet's own, "
                                            "passed to its tools/train.py: they are listed below.")
    p.add_argument("-h", "--help", action="store_true", help="this help, then ppdet's own arguments")
    p.add_argument("-c", "--config", required=True, help="ppdet YAML config (its _BASE_ files are followed)")
    p.add_argument("-o", "--opt", nargs="+", action="extend", default=[], metavar="key=value",
                   help="overrides, as tools/train.py takes them; EMA.* keys work without an EMA: section")
    p.add_argument("--paddledet-root", default=None,
                   help=f"PaddleDetection checkout (default: ${ROOT_ENV}, else the working directory when it is one, "
                        "else an installed ppdet's)")
    p.add_argument("--ema-config", default=None, help="a ready EMA: block merged under the YAML's own section")
    return p


def _print_help(root_option: Optional[str]) -> int:
    """Our arguments, then ppdet's own (its tools/train.py's --help), where a checkout can be found."""
    build_parser().print_help()
    try:
        root = resolve_root(root_option)
    except EMAError as exc:
        print(f"\nppdet's own arguments: not shown ({exc})")
        return 0
    print(f"\nppdet's own arguments ({os.path.join(root, 'tools', 'train.py')}), passed through:", flush=True)
    saved = sys.argv
    sys.argv = [os.path.join(root, "tools", "train.py"), "--help"]
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.argv = saved
    return 0


def _option_value(args: List[str], *names: str) -> Optional[str]:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def resolve_root(explicit: Optional[str]) -> str:
    """The PaddleDetection checkout (``suite_checkout.find_checkout``)."""
    return find_checkout(PADDLEDET, explicit)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return _print_help(_option_value(argv, "--paddledet-root"))
    args, passthrough = build_parser().parse_known_args(argv)
    from ema_callback import paddle_compat  # noqa: F401  (the supported-range check; binds zlib before the suite imports paddle)
    root = resolve_root(args.paddledet_root)
    suite = load_ppdet_yaml(args.config)
    check_section_name(suite, args.config)
    ema_overrides, det_overrides = split_overrides(args.opt)
    for text in det_overrides:  # -o keys that decide the EMA (ppdet's flat keys) or what we check
        key, _, raw = text.partition("=")
        if key.strip() in FLAT_KEYS + ("pretrain_weights", "use_cot", "ssod_method"):
            suite[key.strip()] = load_suite_yaml(raw)
    config, extra = resolve_det_config(suite, args.ema_config, ema_overrides)
    if config.enable and (suite.get("ssod_method") or suite.get("use_cot")):
        key = "ssod_method" if suite.get("ssod_method") else "use_cot"
        raise EMAConfigError(f"{key}: {suite[key]!r} trains through ppdet's own semi-supervised or co-tuning trainer, "
                             "which det-train does not replace (its EMA would silently not run); train it with "
                             "ppdet's tools/train.py and its own EMA, or remove the EMA: section")
    if not config.enable:
        logger.info("EMA: off for this run (%s)", why_disabled(suite, args.ema_config, ema_overrides, args.config)
                    if not suite.get("use_ema") else "use_ema overridden")
    resume = _option_value(passthrough, "-r", "--resume")
    for text in det_overrides:
        key, _, raw = text.partition("=")
        if key.strip() in ("weights", "save_dir"):
            suite[key.strip()] = load_suite_yaml(raw)
    _check_start_files(suite, resume)
    if isinstance(suite.get("pretrain_weights"), str) and not resume:
        describe_start_weights(suite["pretrain_weights"], "pretrain_weights")
    import_from_checkout(root, "ppdet.engine", os.path.join("ppdet", "engine", "__init__.py"), PADDLEDET.option)
    opts = list(det_overrides) + (["use_ema=false"] if not config.enable and suite.get("use_ema") else [])
    locks = lock_run(suite.get("save_dir") or "output")  # EMA off too: its saves may remove a stale .pdema
    try:
        run_suite_script(root, os.path.join("tools", "train.py"),
                         ["-c", args.config] + passthrough + (["-o", *opts] if opts else []),
                         [_seams_installed(config, dict(extra, resume=resume))], ADAPTER.suite.name)
    except SystemExit as exc:
        if exc.code == 2:  # argparse: a mistyped or unknown ppdet argument
            print("ema-callback det-train: the error above is from PaddleDetection's tools/train.py argument parser; "
                  "`ema-callback det-train --help` lists its arguments", file=sys.stderr)
        raise
    finally:
        release_all(locks)
    return 0


@contextlib.contextmanager
def _seams_installed(config: EMAConfig, extra: Dict[str, Any]):
    """ppdet's ``Trainer`` (our subclass, with the EMA on or a resume to check) and its ``save_model`` (staged sets)
    for the run, put back after."""
    import ppdet.engine
    import ppdet.engine.callbacks as ppdet_callbacks

    original, original_save = ppdet.engine.Trainer, ppdet_callbacks.save_model
    try:
        if config.enable or extra.get("resume"):  # with EMA off, only a resume needs our Trainer (raw weights back)
            ppdet.engine.Trainer = _make_trainer_class(config, extra)
        ppdet_callbacks.save_model = _staged_save_model(original_save, config.enable)
        yield
    finally:
        ppdet.engine.Trainer = original
        ppdet_callbacks.save_model = original_save


AP = re.compile(r"Average Precision  \(AP\) @\[ IoU=0\.50:0\.95 \| area=   all \| maxDets=100 \] = ([-\d.]+)")


class PaddleDetAdapter(SuiteAdapter):
    """PaddleDetection's answers to the shared layer (``suite_adapter``)."""

    suite = PADDLEDET

    def eval_weights_option(self, prefix: str) -> str:
        return f"weights={prefix}"

    def install_eval_check(self, check) -> None:
        from ppdet.engine.trainer import Trainer

        original = Trainer.load_weights

        def load_weights(self, *args, **kwargs):
            check(self.model)
            return original(self, *args, **kwargs)

        Trainer.load_weights = load_weights

    def eval_metric(self, log: str, wanted: Optional[str]) -> Tuple[float, str]:
        """bbox mAP(0.50:0.95), the last COCO summary line of its output (ppdet prints one main metric, which
        ``wanted`` may only name)."""
        if wanted and wanted != "bbox_mAP":
            raise EMAConfigError(f"--metric {wanted}: PaddleDetection's tools/eval.py reports bbox_mAP (the COCO "
                                 "AP over IoU 0.50:0.95) only")
        found = AP.findall(log)
        if not found:
            raise EMAConfigError("tools/eval.py: no bbox mAP line in its output")
        return float(found[-1]), "bbox_mAP"


ADAPTER = PaddleDetAdapter()


def _check_start_files(suite: Mapping[str, Any], resume: Optional[str]) -> None:
    """Every file ppdet's own loaders will unpickle with ``paddle.load`` (which runs any code a file names) is read
    first by the bounded, code-free reader: the set of ``-r`` (``.pdparams``, ``.pdema``, ``.pdopt``) and the local
    ``pretrain_weights`` and ``weights``; a file that fails is refused in one line before ppdet starts. (A URL is
    downloaded and read by ppdet itself.)"""
    checks = [("-r", resume, (".pdparams", ".pdema", ".pdopt"))]
    checks += [(key, suite.get(key), (".pdparams",)) for key in ("pretrain_weights", "weights")]
    for option, value, suffixes in checks:
        if isinstance(value, str) and value and "://" not in value:
            check_checkpoint_files(checkpoint_prefix(value), suffixes, option)


def _staged_save_model(original, ema_enabled: bool):
    """ppdet's ``save_model`` (``ppdet.utils.checkpoint``, as its Checkpointer calls it), writing the set into a
    staging folder published as one (``files.checkpoint_set``). With the EMA on, the ``.pdema``'s state also
    fingerprints the ``.pdopt`` ppdet wrote after it (so a mixed set is refused at resume); with it off, a ``.pdema``
    an earlier EMA run left under the same name is removed with the save (ppdet writes none then)."""
    from ema_callback.files.checkpoint_io import atomic_save
    from ema_callback.files.state_file import COMPANIONS, add_file_companion

    def save_model(model, optimizer, save_dir, save_name, last_epoch, ema_model=None, *args, **kwargs):
        import paddle

        if paddle.distributed.get_rank() != 0:
            return original(model, optimizer, save_dir, save_name, last_epoch, ema_model, *args, **kwargs)
        names = [save_name] + ([os.path.join("best_model", "model")] if save_name == "best_model" else [])
        with StagedWrite(save_dir) as stage:
            result = original(model, optimizer, stage.tmp, save_name, last_epoch, ema_model, *args, **kwargs)
            pdema, pdopt = stage.path(save_name + ".pdema"), stage.path(save_name + ".pdopt")
            state = model.get(STATE_KEY) if isinstance(model, dict) else None
            if isinstance(state, dict):
                if os.path.isfile(pdopt):  # ppdet writes it after the .pdema: fingerprinted now, .pdema written again
                    state = add_file_companion(state, ".pdopt", pdopt)
                    atomic_save(dict(model, **{STATE_KEY: state}), pdema)
                sha1 = next((r.get("sha1") for r in state.get(COMPANIONS) or [] if r.get("suffix") == ".pdparams"),
                            None)
                stage.record_sets({n: {"hold": state.get("pdparams_hold") or "ema", "sha1": sha1} for n in names})
            stale = [] if ema_enabled else [r for r in stale_state_files(names) if
                                            os.path.isfile(os.path.join(save_dir, r))]
            if stale:
                stage.record_sets({n: {"hold": "raw", "sha1": None} for n in names})
            stage.publish(last=(save_name + ".pdema",), remove=stale)
        return result

    return save_model
