"""Property-based: every EMA: block and -o string loads to a valid config or raises our one-line error."""
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ema_callback.config.files import apply_overrides, parse_override
from ema_callback.config.period import parse_period
from ema_callback.config.schema import _NUMBER as NUMBER
from ema_callback.config.schema import LENGTH_KEYS, OPTION_BY_NAME, OPTIONS, EMAConfig, EMAConfigError

NAMES = [o.name for o in OPTIONS]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16),
                    st.sampled_from(["threshold", "power", "float16", "cpu", "average", "raw", "(", "[a-z]+"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
blocks = st.one_of(st.dictionaries(keys, values, max_size=6), values)
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_loaded(cfg, block):
    assert EMAConfig.from_block(cfg.to_block()) == cfg  # everything loaded is itself valid
    for key, value in block.items():  # nothing given was silently replaced by a default
        got = getattr(cfg, key)
        if key == "posthoc" and value is False:
            assert got is None  # `posthoc: false` is the default: off
            continue
        if OPTION_BY_NAME[key].kind == "period":  # kept in its canonical form: 500 or '0.5 epochs' (0: not given)
            assert got == parse_period(value, key)
            continue
        if isinstance(value, str) and NUMBER.match(value.strip()) and isinstance(got, (int, float)):
            value = float(value)  # a number written as a string ('1e4': PyYAML 1.1 reads it so) is that number
        if isinstance(value, list) and all(isinstance(v, str) and NUMBER.match(v.strip()) for v in value):
            value = [float(v) for v in value]
        assert (got == value or got == [value] or (value is None and got == [])  # empty YAML list key
                or (value is None and key in LENGTH_KEYS)  # -o EMA.decay=null: not this form of the length
                or (isinstance(value, (int, float)) and math.isclose(got, value)))


def check_error(exc):
    text = str(exc)
    assert text and "\n" not in text and (text.startswith("EMA") or text.startswith("-o "))


@FUZZ
@given(blocks)
def test_any_block_loads_or_gives_one_line_error(block):
    try:
        cfg = EMAConfig.from_block(block)
    except EMAConfigError as exc:
        check_error(exc)
    else:
        check_loaded(cfg, block or {})


overrides = st.one_of(st.text(max_size=40),
                      st.builds(lambda k, v: f"EMA.{k}={v}", keys, st.text(max_size=20)),
                      st.builds(lambda k, v: f"EMA.{k}={v!r}", st.sampled_from(NAMES), scalars))


@FUZZ
@given(st.lists(overrides, min_size=1, max_size=3))
def test_any_override_string_loads_or_gives_one_line_error(texts):
    try:
        block = apply_overrides({}, [parse_override(t) for t in texts])
        cfg = EMAConfig.from_block(block)
    except EMAConfigError as exc:
        check_error(exc)
    else:
        check_loaded(cfg, block)
