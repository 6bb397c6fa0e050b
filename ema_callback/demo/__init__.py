"""The main job: ``ema-callback demo`` (``run``) and its Pillow-rendered text lines (``text_lines``)."""
