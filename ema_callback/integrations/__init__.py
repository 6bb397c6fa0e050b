"""The ways in (registry.py; docs/adding-a-suite.md), each a thin adapter over one shared layer.

* ``model_fit``: ``EMACallback`` for ``paddle.Model.fit``;
* ``paddleocr``: ``ema-callback ocr-train`` over PaddleOCR's own ``tools/train.py`` (+ ``output_rollback``);
* ``paddledet``: ``ema-callback det-train`` over ppdet's own ``Trainer``;
* the shared layer: ``checkpoints`` (resume and save rules), ``evaluation`` (raw or EMA weights now, metric
  names), ``candidates`` (several candidates, selection, the end table), ``optimizer_steps`` (counting real
  optimizer updates), ``loader_batch`` (images per step from the sampler);
* ``checked_suite_eval``: a suite's ``tools/eval.py`` that refuses weights of another model (``posthoc sweep``);
* ``launch_ocr.py`` / ``launch_det.py``: their script forms for ``python -m paddle.distributed.launch``;
* ``suite_checkout``: finding a suite checkout (one rule for every command), checking it, and naming errors raised
  in its code.
"""
