"""EMA in PaddleNLP's Trainer: UIE span extraction on a synthetic task, on a CPU, no downloads.

    pip install 'ema-callback[nlp]'
    python examples/uie_ema.py [--steps 300] [--seed 1] [--out output/uie_ema]

The task (no pretrained weights or data are fetched): a sequence ``[CLS] p [SEP] text [SEP]`` where the prompt ``p``
names one of ``TYPES`` entity types; the text is filler tokens with, for some types, a span of 1-3 tokens drawn from
that type's own tokens. The answer for prompt ``p`` is the span of type ``p`` (or none): UIE's start/end
probabilities are trained with binary cross-entropy against one-hot start/end positions, as UIE's ``finetune.py``
does, and scored with PaddleNLP's ``SpanEvaluator`` (span F1). ``LABEL_NOISE`` of the training spans are moved by
one token (annotation noise, as real span data has); the evaluation spans are clean. The model is a randomly
initialised ``paddlenlp.transformers.UIE`` on a small ``ErnieConfig``, trained with a constant learning rate as
UIE's fine-tuning script does.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched
os.environ.setdefault("PPNLP_HOME", os.path.join(os.path.expanduser("~"), ".cache", "ema_callback_ppnlp"))

VOCAB, TYPES, TEXT_LEN, TYPE_TOKENS = 100, 3, 12, 8
SEQ_LEN = TEXT_LEN + 4
FILLER = list(range(10 + TYPES * TYPE_TOKENS, VOCAB))  # tokens of no entity type
LABEL_NOISE = 0.15
# ERNIE's initializer_range is 0.02, sized for pretrained widths; a random 64-wide model initialised so spends 1,500 to
# 3,000+ steps predicting no span at all (F1 0) on this task, some seeds never leaving it; at 0.1 every seed tried
# learned within 300-600 steps.
INIT_STD = 0.1


def type_tokens(k: int) -> List[int]:
    return list(range(10 + k * TYPE_TOKENS, 10 + (k + 1) * TYPE_TOKENS))


def make_examples(n: int, seed: int, noise: float = 0.0) -> List[Dict[str, np.ndarray]]:
    """``n`` examples: input_ids, token_type_ids, position_ids, attention_mask, start/end positions (float 0/1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = rng.choice(FILLER, size=TEXT_LEN)
        spans = {}
        free = list(range(TEXT_LEN))
        for k in range(TYPES):
            if rng.random() < 0.7:
                length = int(rng.integers(1, 4))
                for _try in range(10):
                    start = int(rng.integers(0, TEXT_LEN - length + 1))
                    if all(i in free for i in range(start, start + length)):
                        break
                else:
                    continue
                text[start:start + length] = rng.choice(type_tokens(k), size=length)
                free = [i for i in free if not start - 1 <= i <= start + length]
                spans[k] = (start, start + length - 1)
        prompt = int(rng.integers(0, TYPES))
        ids = np.array([1, 3 + prompt, 2] + list(text) + [2], dtype="int64")
        starts = np.zeros(SEQ_LEN, dtype="float32")
        ends = np.zeros(SEQ_LEN, dtype="float32")
        if prompt in spans:
            s, e = spans[prompt]
            if noise and rng.random() < noise:  # annotation noise: the span moved by one token
                shift = int(rng.choice([-1, 1]))
                s, e = min(max(s + shift, 0), TEXT_LEN - 1), min(max(e + shift, 0), TEXT_LEN - 1)
            starts[s + 3] = 1.0
            ends[e + 3] = 1.0
        out.append({"input_ids": ids, "token_type_ids": np.array([0] * 3 + [1] * (TEXT_LEN + 1), dtype="int64"),
                    "position_ids": np.arange(SEQ_LEN, dtype="int64"),
                    "attention_mask": np.ones(SEQ_LEN, dtype="int64"),
                    "start_positions": starts, "end_positions": ends})
    return out


def tiny_uie(seed: int, hidden: int = 32, layers: int = 2):
    """A randomly initialised UIE on a small ErnieConfig (dropout off: a run is a function of its seed; weights drawn
    with std ``INIT_STD``)."""
    import paddle
    from paddlenlp.transformers import UIE

    paddle.seed(seed)
    with paddle.utils.unique_name.guard():  # the same parameter names every time (the optimizer's state is by name)
        return UIE(_config(hidden, layers))


def _config(hidden: int, layers: int):
    from paddlenlp.transformers import ErnieConfig

    return ErnieConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=2 * hidden, max_position_embeddings=64, type_vocab_size=4,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=INIT_STD)


def uie_loss(outputs, labels):
    """UIE's fine-tuning loss: the mean of the start and end binary cross-entropies."""
    import paddle

    start_prob, end_prob = outputs
    start_ids, end_ids = labels
    bce = paddle.nn.BCELoss()
    return (bce(start_prob, start_ids) + bce(end_prob, end_ids)) / 2.0


def compute_metrics(eval_preds) -> Dict[str, float]:
    """Span precision/recall/F1 with PaddleNLP's ``SpanEvaluator`` (threshold 0.5, as UIE's evaluation)."""
    from paddlenlp.metrics import SpanEvaluator

    start_prob, end_prob = eval_preds.predictions
    start_ids, end_ids = eval_preds.label_ids
    metric = SpanEvaluator()
    metric.update(*metric.compute(start_prob, end_prob, start_ids, end_ids))
    precision, recall, f1 = metric.accumulate()
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def per_example_f1_units(model, examples) -> np.ndarray:
    """(correct, predicted, gold) span counts of each example, for a paired comparison of two weight sets."""
    import paddle
    from paddlenlp.metrics import SpanEvaluator

    model.eval()
    batch = {k: paddle.to_tensor(np.stack([e[k] for e in examples]))
             for k in ("input_ids", "token_type_ids", "position_ids", "attention_mask")}
    with paddle.no_grad():
        start_prob, end_prob = model(**batch)
    metric = SpanEvaluator()
    rows = []
    for i, e in enumerate(examples):
        rows.append(metric.compute(start_prob[i:i + 1].numpy(), end_prob[i:i + 1].numpy(),
                                   e["start_positions"][None], e["end_positions"][None]))
    return np.array(rows, dtype=np.float64)


def make_trainer(output_dir: str, seed: int = 1, callbacks: Optional[list] = None, n_train: int = 256,
                 n_eval: int = 128, model=None, **args: Any):
    """A PaddleNLP ``Trainer`` over the synthetic task; ``args`` override the ``TrainingArguments``."""
    from paddlenlp.datasets import MapDataset
    from paddlenlp.trainer import Trainer, TrainingArguments

    settings = dict(output_dir=output_dir, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                    learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, max_steps=40,
                    evaluation_strategy="steps", eval_steps=20, save_strategy="steps", save_steps=20,
                    logging_steps=20, seed=seed, disable_tqdm=True, report_to=[], weight_decay=0.0,
                    label_names=["start_positions", "end_positions"], dataloader_num_workers=0,
                    skip_memory_metrics=True, save_total_limit=None)
    settings.update(args)
    training_args = TrainingArguments(**settings)
    return Trainer(model=model if model is not None else tiny_uie(seed), args=training_args,
                   train_dataset=MapDataset(make_examples(n_train, seed=1000 + seed, noise=LABEL_NOISE)),
                   eval_dataset=MapDataset(make_examples(n_eval, seed=99)), criterion=uie_loss,
                   compute_metrics=compute_metrics, callbacks=callbacks or [])


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="output/uie_ema")
    ns = parser.parse_args(argv)
    from ema_callback.integrations.paddlenlp_trainer import EMATrainerCallback

    ema = EMATrainerCallback(half_life_images=800, eval_raw=True)
    trainer = make_trainer(ns.out, seed=ns.seed, callbacks=[ema], max_steps=ns.steps, eval_steps=ns.steps // 5,
                           save_steps=ns.steps // 5, logging_steps=ns.steps // 5, metric_for_best_model="eval_f1",
                           load_best_model_at_end=False)
    trainer.train()
    final = trainer.evaluate()  # the model holds the EMA weights now; eval_f1_raw beside
    trainer.save_model()  # model_state.pdparams = EMA weights; model_state.pdema = raw weights + EMA state
    print(json.dumps({k: round(v, 4) for k, v in final.items() if k.startswith("eval_f1")}))
    return final


if __name__ == "__main__":
    main()
