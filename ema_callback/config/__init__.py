"""The ``EMA:`` block: its schema (``schema``: ``EMAConfig``, the option table), reading it from files and ``-o``
overrides with one precedence rule (``files``), merging a ready block into a suite YAML (``merge``) and the ready
blocks shipped with the package (``presets``)."""
from ema_callback.config.schema import (
                                        LENGTH_KEYS,
                                        OPTION_BY_NAME,
                                        OPTIONS,
                                        SECTION,
                                        EMAConfig,
                                        EMAConfigError,
                                        Option,
                                        layered,
)

__all__ = ["EMAConfig", "EMAConfigError", "LENGTH_KEYS", "OPTIONS", "OPTION_BY_NAME", "Option", "SECTION", "layered"]
