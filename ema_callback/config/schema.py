"""The ``EMA:`` block's schema: one set of keys, defaults and checks shared by every way in.

``EMAConfig.from_block(dict)`` validates a block (types, ranges, unknown keys) and raises ``EMAConfigError``
with a one-line message naming the key, e.g. ``EMA.decya: unknown key, did you mean 'decay'?``. Reading YAML
files, ``-o EMA.*`` overrides and their precedence is ``config.files``'s job.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ema_callback.config.deprecated import warn_once
from ema_callback.config.period import parse_period
from ema_callback.errors import EMAConfigError  # re-exported: ema_callback.config.EMAConfigError

SCHEDULES = ("constant", "threshold", "exponential", "power")  # core.schedules implements each (config is below core)

SECTION = "EMA"
LENGTH_KEYS = ("decay", "decays", "half_life_images", "half_life_epochs", "length")  # one form of the length per block
WARM_UP_KEYS = ("schedule", "tau", "inv_gamma", "power", "min_decay", "bias_correction")  # what schedule auto decides
# each schedule parameter and the one schedule that uses it
SCHEDULE_PARAMS = {"tau": "exponential", "inv_gamma": "power", "power": "power", "min_decay": "power"}


@dataclass(frozen=True)
class Option:
    """One key of the ``EMA:`` block: its default, type, allowed range and documentation."""

    name: str
    default: Any
    kind: str  # bool | int | float | choice | regex_list
    doc: str
    choices: Tuple[str, ...] = ()
    low: Optional[float] = None  # inclusive unless low_open
    high: Optional[float] = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False


OPTIONS: Tuple[Option, ...] = (
    Option("enable", True, "bool", "Turn EMA on. `false` leaves training bit-identical to a run without the plugin."),
    Option("decay", 0.9999, "float", "Target decay d in `ema = d*ema + (1-d)*w`; horizon ~ 1/(1-d) optimizer steps.",
           low=0.0, high=1.0, low_open=True, high_open=True),
    Option("decays", None, "decay_list",
           "Several EMAs in one pass: one shadow per decay, e.g. `[0.999, 0.9999]`; the first is the primary "
           "(what `save_as: ema` writes and best-model selection uses unless `select: best`). Instead of `decay`."),
    Option("half_life_images", None, "positive_or_list",
           "EMA length as a half-life in images (a number, or a list for several EMAs): after this many training "
           "images a weight's contribution has halved. Per optimizer step d = 0.5^(B/H), B = the measured global "
           "batch. Instead of `decay`."),
    Option("half_life_epochs", None, "positive_or_list",
           "Half-life in epochs of the training set (number or list): `half_life_images` = x * dataset size. "
           "Instead of `decay`."),
    Option("length", None, "choice",
           "`auto`: the length is picked at the end of the run from its own evaluation (post-hoc EMA profiles, "
           "kept to the default unless another length beats it by more than the measured uncertainty), and the "
           "pick is saved as the model. What a block or `EMACallback` that states no length runs.",
           choices=("auto",)),
    Option("decay_batch_size", None, "int",
           "Global batch (images per optimizer update) that `decay`/`decays` were tuned for: the run uses "
           "d^kappa, kappa = measured global batch / this (the EMA scaling rule, Busbridge et al. 2023).", low=1),
    Option("schedule", "auto", "choice",
           "Decay warm-up: `auto` is `threshold` for `decay`/`decays`, and for a length in the user's units "
           "(`half_life_images`, `half_life_epochs`, `decay_batch_size`) `constant` with bias correction, so that "
           "length holds from the first update; `constant` d; `threshold` min(d,(1+t)/(10+t)) (TF, PaddleDetection); "
           "`exponential` d(1-exp(-(t+1)/tau)) (YOLOv5, PaddleDetection); `power` 1-(1+t/inv_gamma)^-power "
           "clamped to [min_decay, d] (timm, diffusers). t = optimizer steps covered by earlier updates.",
           choices=("auto",) + SCHEDULES),
    Option("tau", 2000.0, "float", "`schedule: exponential` only: its time constant, in optimizer steps.",
           low=0.0, low_open=True),
    Option("inv_gamma", 1.0, "float", "`schedule: power` only: steps are divided by it.", low=0.0, low_open=True),
    Option("power", 2.0 / 3.0, "float", "`schedule: power` only: its exponent (2/3 for ~100k steps, 3/4 for ~1M).",
           low=0.0, low_open=True),
    Option("min_decay", 0.0, "float", "`schedule: power` only: lower clamp of the decay.", low=0.0, high=1.0,
           high_open=True),
    Option("bias_correction", None, "bool",
           "Start the average from zero and divide by 1-prod(d_i) (TF `zero_debias`). Not given: on by itself under "
           "`schedule: auto` with a length in the user's units (auto is then `constant`), else off. `false` there "
           "is acted on: no bias correction, so auto gives that length the `threshold` warm-up instead."),
    Option("start_step", 0, "int", "Optimizer steps before averaging starts; until then the shadow copies the weights.",
           low=0),
    Option("update_every", 1, "int",
           "Update every k optimizer steps with decay d^k, so the horizon in steps does not depend on k.", low=1),
    Option("eval_start_step", 0, "int",
           "Evaluate (and pick best models) with raw weights until this many optimizer steps.", low=0),
    Option("buffers", "average", "choice",
           "Non-trainable float tensors (BatchNorm mean/variance are parameters in Paddle): `average` them, "
           "`copy` the live values at each update, or `skip` (always use the live values). Integer tensors are copied.",
           choices=("average", "copy", "skip")),
    Option("include", [], "regex_list",
           "Regexes on state-dict names; when set, only matching tensors are averaged (the rest follow the live "
           "weights). A regex that matches no tensor is refused when the EMA is built."),
    Option("exclude", [], "regex_list",
           "Regexes on state-dict names never averaged; they follow the live weights and keep training. A regex that "
           "matches no tensor is refused when the EMA is built."),
    Option("storage_dtype", "float32", "choice",
           "Shadow precision. float16/bfloat16 halve its memory but round every update "
           "(a decay above ~0.999 then stalls: the increment (1-d)(w-ema) falls below half an ulp).",
           choices=("float32", "float16", "bfloat16")),
    Option("device", "same", "choice", "Where the shadow lives: `same` as the weights, or `cpu` (host memory).",
           choices=("same", "cpu")),
    Option("nan_guard", True, "bool",
           "Check every weight for NaN/Inf before an update and skip the update if any (exact: the shadow is "
           "untouched). Costs one extra read of the weights (~30% of a CPU update); false skips the check."),
    Option("eval_raw", False, "bool", "Also evaluate the raw weights and log their metrics with a `_raw` suffix."),
    Option("eval_all", True, "bool",
           "With several EMAs: evaluate every one at each evaluation (`false`: only the primary, and raw with "
           "`eval_raw`); `false` with one EMA is refused."),
    Option("select", "primary", "choice",
           "With several candidates: `primary` keeps the first EMA for best-model selection; `best` selects the best "
           "evaluated candidate (raw weights included with `eval_raw`) and saves it as the best model; `best` with "
           "one candidate (one EMA, no `eval_raw`) is refused.",
           choices=("primary", "best")),
    Option("recompute_bn", 0, "int",
           "Before each EMA evaluation and save: reset every BatchNorm layer's running mean/variance and recompute "
           "them with the EMA weights over the last N training batches (cumulative average); 0 = off. A model "
           "without BatchNorm refuses it.", low=0),
    Option("switch_every", None, "period",
           "Switch EMA (Li et al. 2024): every period copy the EMA weights into the model (and AMP master weights) "
           "and train on from them, optimizer state kept. A period: `500` optimizer steps, or `'0.5 epochs'` "
           "(`{epochs: 0.5}`: optimizer steps per epoch x 0.5, rounded to whole EMA updates); not given (or `0`): off. "
           "A period in steps must be a multiple of `update_every`."),
    Option("posthoc", None, "posthoc",
           "Post-hoc EMA (EDM2): a mapping turns it on: `sigma_rels` (tracked power-function profiles, default "
           "[0.05, 0.1]), `snapshot_every` (required; a period as for `switch_every`: `2000` optimizer steps or "
           "`'1 epochs'`), `snapshot_dtype` "
           "(float16|float32, default float16), `dir` (default: posthoc/ beside the checkpoints), `update_every` "
           "(profiles updated every N EMA updates, default 1: exact for any N, a fraction of the cost). "
           "`ema-callback posthoc` reconstructs any other length afterwards."),
    Option("restart", False, "bool",
           "Resume a checkpoint whose `.pdema` is missing while its folder holds other EMA checkpoints (so its "
           "`.pdparams` likely hold EMA weights): start a new EMA from the loaded weights, taken as raw. Without it "
           "that resume is refused in one line."),
    Option("save_as", "ema", "choice",
           "What the weight files hold (PaddleOCR's checkpoints, `Model.save` and ModelCheckpoint in `Model.fit`): "
           "`ema` (the suite's eval/export/infer tools use EMA) with the raw weights in the `.pdema` file, or `raw` "
           "(`.pdparams` hold the raw weights, `<prefix>.ema.pdparams` beside them the EMA weights). `det-train` "
           "refuses `raw` (ppdet's convention).",
           choices=("ema", "raw")),
)
OPTION_BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}


def _key(name: Any) -> str:
    plain = isinstance(name, str) and name and name.isprintable() and name.strip() == name and " " not in name
    return f"{SECTION}.{name}" if plain else f"{SECTION}[{name!r}]"


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numeric(value: Any) -> Any:
    """A number written as a string (PyYAML 1.1 reads ``1e4`` as the string '1e4'), as a number; else unchanged."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def _check_value(opt: Option, value: Any) -> Any:
    key = _key(opt.name)
    if opt.kind == "period":
        return parse_period(value, key)
    if opt.kind in ("int", "float"):
        value = _numeric(value)
    elif opt.kind in ("decay_list", "positive_or_list"):
        value = [_numeric(v) for v in value] if isinstance(value, (list, tuple)) else _numeric(value)
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise EMAConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if opt.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EMAConfigError(f"{key}: expected a{'n integer' if opt.kind == 'int' else ' number'}, got {value!r}")
        if opt.kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
            raise EMAConfigError(f"{key}: expected an integer, got {value!r}")
        value = int(value) if opt.kind == "int" else float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise EMAConfigError(f"{key}: expected a finite number, got {value!r}")
        if opt.low is not None and (value <= opt.low if opt.low_open else value < opt.low):
            raise EMAConfigError(f"{key}: must be {'>' if opt.low_open else '>='} {opt.low:g}, got {value!r}"
                                 + (f" (and {'<' if opt.high_open else '<='} {opt.high:g})"
                                    if opt.high is not None else ""))
        if opt.high is not None and (value >= opt.high if opt.high_open else value > opt.high):
            raise EMAConfigError(f"{key}: must be {'<' if opt.high_open else '<='} {opt.high:g}, got {value!r}")
        return value
    if opt.kind in ("decay_list", "positive_or_list"):
        return _check_list(opt, value)
    if opt.kind == "posthoc":
        return _check_posthoc(value)
    if opt.kind == "choice":
        if not isinstance(value, str) or value not in opt.choices:
            raise EMAConfigError(f"{key}: expected one of {', '.join(opt.choices)}, got {value!r}")
        return value
    if opt.kind == "regex_list":
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise EMAConfigError(f"{key}: expected a regex or a list of regexes, got {value!r}")
        for pattern in items:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise EMAConfigError(f"{key}: bad regex {pattern!r}: {exc}") from None
        return list(items)
    raise AssertionError(opt.kind)


def _check_list(opt: Option, value: Any) -> Optional[List[float]]:
    """``decays`` (a non-empty list of numbers in (0, 1)) or a half-life (a positive number or a non-empty list)."""
    key = _key(opt.name)
    if value is None:
        return None
    scalar = opt.kind == "positive_or_list" and not isinstance(value, (list, tuple))
    items = [value] if scalar else value
    what = "a list of decays in (0, 1), e.g. [0.999, 0.9999]" if opt.kind == "decay_list" else \
        "a positive number or a non-empty list of them"
    if not isinstance(items, (list, tuple)) or not items:
        raise EMAConfigError(f"{key}: expected {what}, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or item != item or \
                item in (float("inf"), float("-inf")):
            raise EMAConfigError(f"{key}: expected {what}, got {value!r}")
        if opt.kind == "decay_list" and not 0.0 < item < 1.0:
            raise EMAConfigError(f"{key}: every decay must be > 0 and < 1, got {item!r}")
        if opt.kind == "positive_or_list" and item <= 0:
            raise EMAConfigError(f"{key}: a half-life must be > 0, got {item!r}")
        out.append(float(item))
    if len(set(out)) != len(out):
        raise EMAConfigError(f"{key}: the same value twice in {value!r}; each entry is one EMA")
    return out[0] if scalar else out


POSTHOC_DEFAULTS = {"sigma_rels": [0.05, 0.10], "snapshot_every": None, "snapshot_dtype": "float16", "dir": None,
                    "update_every": 1}


def _check_posthoc(value: Any) -> Optional[Dict[str, Any]]:
    """The ``posthoc:`` sub-block, with its defaults filled in (None: off)."""
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise EMAConfigError(f"EMA.posthoc: expected a mapping (sigma_rels, snapshot_every, ...), got {value!r}")
    out = dict(POSTHOC_DEFAULTS)
    value = _renamed_period(dict(value), "snapshot_every", "snapshot_every_epochs", "EMA.posthoc.")
    for key, item in value.items():
        name = f"EMA.posthoc.{key}"
        if key not in POSTHOC_DEFAULTS:
            raise _unknown_key_error(key, POSTHOC_DEFAULTS, name)
        item = [_numeric(v) for v in item] if isinstance(item, (list, tuple)) else _numeric(item)
        if key == "sigma_rels":
            items = item if isinstance(item, (list, tuple)) else None
            if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 0.2886
                                    for v in items):
                raise EMAConfigError(f"{name}: expected a non-empty list of relative widths in (0, 0.2886), "
                                     f"got {item!r}")
            if len(set(items)) != len(items):
                raise EMAConfigError(f"{name}: the same value twice in {item!r}")
            out[key] = [float(v) for v in items]
        elif key == "snapshot_every":
            out[key] = parse_period(item, name)
        elif key == "snapshot_dtype":
            if item not in ("float16", "float32"):
                raise EMAConfigError(f"{name}: expected one of float16, float32, got {item!r}")
            out[key] = item
        elif key == "dir":
            if item is not None and not (isinstance(item, str) and item):
                raise EMAConfigError(f"{name}: expected a folder path, got {item!r}")
            out[key] = item
        elif key == "update_every":
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise EMAConfigError(f"{name}: expected a whole number >= 1 of EMA updates between profile "
                                     f"updates, got {item!r}")
            out[key] = item
    if out["snapshot_every"] is None:
        raise EMAConfigError("EMA.posthoc.snapshot_every: give how often snapshots are taken: a number of optimizer "
                             "steps (2000) or of epochs ('1 epochs')")
    return out


def _renamed_period(block: Dict[str, Any], key: str, old: str, prefix: str) -> Dict[str, Any]:
    """``block`` with the old spelling ``old: x`` (epochs) read as ``key: 'x epochs'``, in one deprecation line; an
    old ``0`` meant "not given", as ``0`` still does. Both given (not 0) is an error naming both."""
    if old not in block:
        return block
    epochs = block.pop(old)
    given = epochs is not None and not (isinstance(epochs, (int, float)) and not isinstance(epochs, bool)
                                        and epochs == 0)
    if given:
        if block.get(key) not in (None, 0):
            raise EMAConfigError(f"{prefix}{old}: give the period one way, not both {key} and {old} (it is "
                                 f"{prefix}{key}: '{epochs} epochs' now)")
        if isinstance(epochs, bool) or not isinstance(_numeric(epochs), (int, float)):
            raise EMAConfigError(f"{prefix}{old}: expected a number of epochs, got {epochs!r}")
        block[key] = {"epochs": _numeric(epochs)}
        canonical = parse_period(block[key], prefix + old)
        warn_once(f"{prefix}{old}: read as {prefix}{key}: {canonical!r} (one key takes optimizer steps or epochs)")
    return block


def _ema_count(values: Mapping[str, Any]) -> int:
    """How many EMAs a block states: the length of its list of lengths (``decays``, ``half_life_*``), else 1."""
    return next((len(values[k]) for k in ("decays", "half_life_images", "half_life_epochs")
                 if isinstance(values.get(k), list)), 1)


def _without_other_schedules(block: Mapping[str, Any], schedule: Any) -> Dict[str, Any]:
    """``block`` without the parameters of schedules other than ``schedule`` (``SCHEDULE_PARAMS``)."""
    return {k: v for k, v in block.items() if SCHEDULE_PARAMS.get(k, schedule) == schedule}


def _check_combination(values: Mapping[str, Any]) -> None:
    """One form of the EMA length; ``decay_batch_size`` only with a decay; keys that act on several candidates
    (``select: best``, ``eval_all: false``) only with them; a schedule's parameters only with that schedule."""
    forms = [k for k in LENGTH_KEYS if values.get(k) is not None]
    if len(forms) > 1:
        raise EMAConfigError(f"{_key(forms[1])}: give the EMA length one way (decay, decays, half_life_images, "
                             f"half_life_epochs or length: auto), not both {forms[0]} and {forms[1]}")
    emas = _ema_count(values)
    if values.get("select") == "best" and emas < 2 and not values.get("eval_raw"):
        raise EMAConfigError(f"{_key('select')}: best chooses among several candidates and this block has one (one "
                             "EMA, no eval_raw); give several lengths (decays, a list of half_life_images) or "
                             "eval_raw: true, or remove select")
    if values.get("eval_all") is False and emas < 2:
        raise EMAConfigError(f"{_key('eval_all')}: false leaves out the other EMAs of a list, and this block has one "
                             "EMA; remove eval_all")
    schedule = values.get("schedule", "auto")
    for name, owner in SCHEDULE_PARAMS.items():
        if name in values and schedule != owner:
            raise EMAConfigError(f"{_key(name)}: a parameter of schedule: {owner}, which this block does not use "
                                 f"(schedule: {schedule}); set schedule: {owner} or remove {name}")
    if values.get("decay_batch_size") is not None and forms and forms[0] not in ("decay", "decays"):
        raise EMAConfigError(f"{_key('decay_batch_size')}: scales a decay tuned for another batch; a half-life "
                             f"({forms[0]}) is already in images or epochs, whatever the batch: remove one of them")


def _unknown_key_error(name: Any, known=OPTION_BY_NAME, key: Optional[str] = None) -> EMAConfigError:
    """``EMA.<name>: unknown key, did you mean ...?`` (``key``: the full name, for keys of a sub-block)."""
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z_]\w*:\S+", name):  # a slip like {snapshot_every:0}
        head = key.rsplit(".", 1)[0] if key else SECTION
        return EMAConfigError(f"{head}: YAML read {name!r} as one key with no value (no space after the colon); "
                              f"write {name.split(':', 1)[0]}: {name.split(':', 1)[1]}")
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    hint = f", did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return EMAConfigError(f"{key or _key(name)}: unknown key{hint}")


@dataclass(frozen=True)
class EMAConfig:
    """Validated settings of the EMA (see ``OPTIONS`` for each key's meaning and default)."""

    enable: bool = True
    decay: float = 0.9999
    decays: Optional[List[float]] = None
    half_life_images: Any = None  # a number or a list of numbers
    half_life_epochs: Any = None
    length: Optional[str] = None  # "auto": picked at the end of the run (integrations.auto_length)
    decay_batch_size: Optional[int] = None
    schedule: str = "auto"
    tau: float = 2000.0
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    bias_correction: Optional[bool] = None  # None: schedule auto decides
    start_step: int = 0
    update_every: int = 1
    eval_start_step: int = 0
    buffers: str = "average"
    include: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)
    storage_dtype: str = "float32"
    device: str = "same"
    nan_guard: bool = True
    eval_raw: bool = False
    eval_all: bool = True
    select: str = "primary"
    recompute_bn: int = 0
    switch_every: Optional[Any] = None  # a period: int optimizer steps or "x epochs" (config.period)
    posthoc: Optional[Dict[str, Any]] = None
    restart: bool = False
    save_as: str = "ema"

    @classmethod
    def from_block(cls, block: Optional[Mapping[str, Any]]) -> "EMAConfig":
        """Validate an ``EMA:`` block (``None`` or ``{}`` gives the defaults)."""
        if block is None:
            return cls()
        if not isinstance(block, Mapping):
            raise EMAConfigError(f"{SECTION}: expected a mapping of keys to values, "
                                 f"got {type(block).__name__} {block!r}")
        values = {}
        block = _renamed_period(dict(block), "switch_every", "switch_every_epochs", SECTION + ".")
        for name, value in block.items():
            opt = OPTION_BY_NAME.get(name) if isinstance(name, str) else None
            if opt is None:
                raise _unknown_key_error(name)
            if name == "decay" and isinstance(value, (list, tuple)):
                raise EMAConfigError(f"{_key(name)}: expected a number; several EMAs are EMA.decays: {list(value)!r}")
            try:
                values[name] = value if value is None and opt.default is None else _check_value(opt, value)
            except (OverflowError, ValueError) as exc:  # e.g. an integer of 400 digits where a number belongs
                if isinstance(exc, EMAConfigError):
                    raise
                raise EMAConfigError(f"{_key(name)}: {str(value)[:40]}... is out of range ({exc})") from None
        _check_combination(values)
        return cls(**values)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EMAConfig":
        """Same validation as ``from_block`` for Python keyword arguments."""
        return cls.from_block(kwargs)

    @property
    def auto(self) -> bool:
        """``length: auto``: a way in resolves it for the run (``integrations.auto_length``) before the engine is
        built; the engine itself takes a stated length."""
        return self.length == "auto"

    @property
    def in_user_units(self) -> bool:
        """Whether the length is stated in images or epochs (``half_life_*``, or a decay with ``decay_batch_size``)."""
        return self.decay_batch_size is not None or self.length_key.startswith("half_life")

    @property
    def effective_schedule(self) -> str:
        """The schedule the run uses: ``schedule``, with ``auto`` resolved: ``constant`` (with bias correction) for
        a length in the user's units, unless ``bias_correction: false`` is stated; else ``threshold``,
        PaddleDetection's and TF's default (a constant decay without bias correction would start on the initial
        weights, weight d^n after n updates)."""
        if self.schedule != "auto":
            return self.schedule
        return "constant" if self.in_user_units and self.bias_correction is not False else "threshold"

    @property
    def effective_bias_correction(self) -> bool:
        """``bias_correction`` as stated, else on by itself where ``auto`` resolves to ``constant`` (the stated length
        then holds from the first update: update i of n has weight (1-d) d^(n-i) / (1-d^n), none on the start)."""
        if self.bias_correction is not None:
            return self.bias_correction
        return self.schedule == "auto" and self.in_user_units

    @property
    def length_key(self) -> str:
        """Which form states the EMA length: ``decay``, ``decays``, ``half_life_images``, ``half_life_epochs`` or
        ``length`` (auto)."""
        return next((k for k in LENGTH_KEYS[1:] if getattr(self, k) is not None), "decay")

    def to_block(self) -> Dict[str, Any]:
        """The block as plain YAML-able values (the one length form that is set, the schedule parameters of the
        schedule set; unset optional keys left out): ``from_block`` of it is this config."""
        block = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in LENGTH_KEYS and f.name != self.length_key) or \
                    SCHEDULE_PARAMS.get(f.name, self.schedule) != self.schedule:
                continue
            block[f.name] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) \
                else value
        return block

    @classmethod
    def from_saved(cls, block: Mapping[str, Any]) -> "EMAConfig":
        """``from_block`` for the settings a checkpoint holds: files written before issue 27.4's checks hold every key
        (``tau: 2000.0`` under ``schedule: auto``) and may hold keys their run did not use (``select: best`` with one
        candidate); those are dropped here, silently (the run that wrote them is over)."""
        if not isinstance(block, Mapping):
            return cls.from_block(block)
        block = _without_other_schedules(block, block.get("schedule", "auto"))
        if _ema_count(block) < 2:  # keys for several candidates that such a run kept without using them
            if block.get("eval_all") is False:
                block.pop("eval_all")
            if block.get("select") == "best" and not block.get("eval_raw"):
                block.pop("select")
        return cls.from_block(block)

    def replace(self, **changes: Any) -> "EMAConfig":
        return EMAConfig.from_block(layered(self.to_block(), changes))


def layered(base: Mapping[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated with ``top``; a length form in ``top`` replaces the one in ``base`` (``-o EMA.decays=[..]``
    over a section with ``decay: 0.9999`` means the list, not a conflict). Within one layer (one YAML block, one
    ``-o`` list) two forms are an error (``EMAConfig.from_block``, ``config.files.apply_overrides``).

    A length form in ``top`` without a ``schedule`` of its own also drops ``base``'s warm-up (``WARM_UP_KEYS``: its
    schedule, that schedule's parameters and ``bias_correction``), which was chosen for ``base``'s length: ``schedule:
    auto`` decides for the length stated (``--ema-config ppyoloe_plus_s -o EMA.half_life_epochs=2`` holds from the
    first update, not after the preset's threshold warm-up). A ``schedule`` in ``top`` likewise drops ``base``'s
    parameters of other schedules (``SCHEDULE_PARAMS``): ``-o EMA.schedule=power`` over a block's ``schedule:
    exponential, tau: 500`` runs ``power``, its ``tau`` gone with it."""
    merged = dict(base)
    if isinstance(top, Mapping) and any(k in LENGTH_KEYS and top[k] is not None for k in top):
        for k in LENGTH_KEYS:
            merged.pop(k, None)
        if any(k in ("half_life_images", "half_life_epochs") and top[k] is not None for k in top):
            merged.pop("decay_batch_size", None)
        if "schedule" not in top:
            for k in WARM_UP_KEYS:
                merged.pop(k, None)
    if isinstance(top, Mapping) and "schedule" in top:  # a schedule brings its own parameters
        merged = _without_other_schedules(merged, top["schedule"])
    merged.update(top)
    for k in LENGTH_KEYS:  # a length key set to null means "not this form" (the default decay if none is left)
        if k in merged and merged[k] is None:
            del merged[k]
    return merged
