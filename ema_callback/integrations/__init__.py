"""The three ways in, each a thin adapter over one shared layer (``checkpoints``, ``evaluation``).

* ``model_fit``: ``EMACallback`` for ``paddle.Model.fit``;
* ``paddleocr``: ``ema-callback ocr-train`` over PaddleOCR's own ``tools/train.py`` (+ ``output_rollback``);
* ``paddledet``: ``ema-callback det-train`` over ppdet's own ``Trainer``;
* ``launch_ocr.py`` / ``launch_det.py``: their script forms for ``python -m paddle.distributed.launch``;
* ``suite_checkout``: checking a suite checkout and naming errors raised in its code.
"""
