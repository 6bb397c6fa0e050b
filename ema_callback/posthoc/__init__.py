"""Post-hoc EMA (Karras et al. 2024, EDM2): the math of power-function EMA profiles (``power_math``), tracking the
profiles and writing snapshots during training (``tracking``, an engine feature), reading them back and
reconstructing any other length (``snapshots``: ``PostHocEMA``), and ``ema-callback posthoc`` (``cli``)."""
from ema_callback.posthoc.snapshots import PostHocEMA, Snapshot, load_snapshots, parse_sigma_rels

__all__ = ["PostHocEMA", "Snapshot", "load_snapshots", "parse_sigma_rels"]
