"""The ways in (docs/adding-a-suite.md), each a thin adapter over one shared layer.

* callbacks: ``model_fit`` (``EMACallback`` for ``paddle.Model.fit``), ``paddlenlp_trainer`` (``EMATrainerCallback``
  for PaddleNLP's ``Trainer``);
* suite commands, one ``registry`` line each, over ``suite_adapter``: ``paddleocr`` (``ocr-train``, with
  ``output_rollback``), ``paddledet`` (``det-train``), ``paddleclas`` (``cls-train``); their script forms
  ``launch_<name>.py`` for ``python -m paddle.distributed.launch``;
* the shared layer: ``checkpoints`` (resume and save rules), ``evaluation`` (raw or EMA weights now, metric
  names), ``candidate_eval`` (the one loop evaluating candidate weights), ``candidates`` (several candidates,
  selection, the end table), ``auto_length`` and ``honest_pick`` (length auto and the one rule),
  ``optimizer_steps`` (counting real optimizer updates), ``loader_batch`` (images per step from the sampler);
* ``checked_suite_eval``: a suite's ``tools/eval.py`` that refuses weights of another model (``posthoc sweep``);
* ``suite_checkout``: finding a suite checkout (one rule for every command), checking it, and naming errors raised
  in its code.
"""
