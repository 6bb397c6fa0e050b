"""A period "in optimizer steps or in epochs": one type for every option that takes one (``EMA.switch_every``,
``EMA.posthoc.snapshot_every``).

Spellings (what a YAML value, an ``-o`` override or a keyword argument may be):

* a whole number ``N`` (or ``"N steps"``, ``{steps: N}``): every N optimizer steps;
* ``"x epochs"`` (or ``"x epoch"``, ``{epochs: x}``): every x epochs of the training set, i.e. x * optimizer steps
  per epoch, rounded to a whole number of EMA updates (a multiple of ``update_every``, at least one), x a positive
  number (``0.5 epochs``);
* ``0``, ``null`` or no key: not given (Switch EMA off; post-hoc EMA then asks for one).

``parse_period`` checks a value and returns its canonical form (``int`` steps or ``"x epochs"``), the form kept in
``EMAConfig`` and written to a checkpoint's settings; ``Period.of`` reads that form back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from ema_callback.errors import EMAConfigError

UNITS = ("steps", "epochs")
_TEXT = re.compile(r"^\s*(?P<value>[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)\s*(?P<unit>steps?|epochs?)\s*$")
EXPECTED = "a whole number of optimizer steps (500), or epochs ('0.5 epochs' or {epochs: 0.5})"


@dataclass(frozen=True)
class Period:
    """Every ``value`` optimizer steps (``unit='steps'``, a whole number) or epochs (``unit='epochs'``)."""

    value: float
    unit: str

    @classmethod
    def of(cls, canonical: Union[int, str, None]) -> Optional["Period"]:
        """The period of a canonical value (``parse_period``'s result; an int or ``"x epochs"``), None when not
        given."""
        if canonical is None or canonical == 0:
            return None
        if isinstance(canonical, str):
            return cls(float(canonical.split()[0]), "epochs")
        return cls(int(canonical), "steps")

    def steps(self, steps_per_epoch: Optional[int], key: str, multiple: int = 1) -> int:
        """Optimizer steps of one period: the steps, or epochs x ``steps_per_epoch`` rounded to a multiple of
        ``multiple`` (``update_every``: a whole number of EMA updates), at least one. An epoch period where the
        steps per epoch are unknown is an error naming ``key``."""
        if self.unit == "steps":
            return int(self.value)
        if not steps_per_epoch:
            raise EMAConfigError(f"{key}: {self.canonical} needs the number of optimizer steps per epoch, which "
                                 "is unknown here (an iterable dataset or a loader without a length); give it in "
                                 "optimizer steps instead")
        steps = self.value * steps_per_epoch
        if steps > 2 ** 62:
            raise EMAConfigError(f"{key}: {self.canonical} is {steps:.3g} optimizer steps ({steps_per_epoch:,} per "
                                 "epoch), beyond any run")
        multiple = max(1, int(multiple))
        return max(1, int(round(steps / multiple))) * multiple

    @property
    def canonical(self) -> Union[int, str]:
        """``500`` (steps) or ``'0.5 epochs'``."""
        if self.unit == "steps":
            return int(self.value)
        text = repr(float(self.value))  # exact: read back as the same float
        return f"{text[:-2] if text.endswith('.0') else text} epochs"


def parse_period(value: Any, key: str) -> Union[int, str, None]:
    """Check a period's value (see the module docstring) and return its canonical form (None: not given); a bad one
    is an ``EMAConfigError`` naming ``key`` and what was expected."""
    if value is None:
        return None
    amount, unit = _split(value, key)
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount != amount or \
            amount in (float("inf"), float("-inf")) or amount < 0:
        raise EMAConfigError(f"{key}: expected {EXPECTED}, got {value!r}")
    if amount == 0:
        return None
    if unit == "steps":
        if not float(amount).is_integer():
            raise EMAConfigError(f"{key}: a number of optimizer steps is whole, got {value!r} (a fraction of an "
                                 "epoch is written '0.5 epochs')")
        return int(amount)
    return Period(float(amount), "epochs").canonical


def _split(value: Any, key: str):
    """``(amount, unit)`` of a value in any of the spellings."""
    if isinstance(value, str):
        match = _TEXT.match(value)
        if match:
            unit = match.group("unit")
            return float(match.group("value")), unit if unit.endswith("s") else unit + "s"
        try:
            return float(value), "steps"  # '500': PyYAML or a command line gave the number as a string
        except ValueError:
            raise EMAConfigError(f"{key}: expected {EXPECTED}, got {value!r}") from None
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in UNITS:
            raise EMAConfigError(f"{key}: expected {EXPECTED}, got {value!r}")
        unit, amount = next(iter(value.items()))
        if isinstance(amount, str):
            try:
                amount = float(amount)
            except ValueError:
                raise EMAConfigError(f"{key}: expected {EXPECTED}, got {value!r}") from None
        return amount, unit
    return value, "steps"
