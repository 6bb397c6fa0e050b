"""``ema-callback demo``: what EMA does to a real training run, in a few minutes on a CPU.

Trains a small CRNN-style text recognizer (convolutional encoder, BiLSTM sequence head, CTC loss) on
synthetic text-line images (characters 0-9A-Z) rendered with Pillow, with ``paddle.Model.fit``, twice from the same
initial weights and data order: without EMA, and with ``EMACallback`` keeping three EMAs of different lengths in
one pass (half-lives of 1,000, 4,000 and 16,000 images) and evaluating them beside the raw weights. Prints a table
of each candidate's final/best validation accuracy and of how much its validation curve jumps between
evaluations, with the recommended one, and writes ``results.json``, ``curves.png`` and ``ema_candidates.json`` to
``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Dict, List, Optional

import numpy as np

from ..plots import pyplot
from .text_lines import ALPHANUMERIC, make_text_lines

HEIGHT, WIDTH, MAX_LABEL = 32, 128, 8
ALPHABET = ALPHANUMERIC
DATA_STYLE = dict(alphabet=ALPHABET, min_len=4, max_len=MAX_LABEL, noise=28.0, max_rotation=3.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ema-callback demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--steps", type=int, default=800, help="optimizer steps per run (default 800)")
    p.add_argument("--eval-every", type=int, default=80, help="optimizer steps between evaluations (default 80)")
    p.add_argument("--train-size", type=int, default=4000, help="synthetic training images (default 4000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.004, help="Adam learning rate (default 0.004: a noisy run)")
    p.add_argument("--half-lives", default="1000,4000,16000",
                   help="EMA half-lives in training images, one EMA each (default 1000,4000,16000)")
    p.add_argument("--decay", type=float, default=None, help="one EMA of this decay instead of --half-lives")
    p.add_argument("--schedule", default="constant",
                   help="EMA decay schedule (default constant: a threshold warm-up would cap the three EMAs at the "
                        "same decay for most of the run, hiding their difference)")
    p.add_argument("--eval-size", type=int, default=512, help="validation images (default 512)")
    p.add_argument("--posthoc", action="store_true",
                   help="also track two power-function EMA profiles (sigma_rel 0.05, 0.10) in the EMA run and sweep "
                        "sigma_rel 0.01..0.25 after it (post-hoc EMA; adds about 40 s)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for paddle (default: all cores)")
    return p


def _encode(labels: List[str]) -> np.ndarray:
    codes = np.zeros((len(labels), MAX_LABEL), dtype=np.int32)  # 0 is the CTC blank
    for i, text in enumerate(labels):
        codes[i, :len(text)] = [ALPHABET.index(c) + 1 for c in text]
    return codes


def greedy_decode(logits: np.ndarray) -> List[List[int]]:
    """CTC best path: argmax per time step, merge repeats, drop blanks (0)."""
    best = logits.argmax(-1)
    out = []
    for row in best:
        seq, prev = [], 0
        for c in row:
            if c != prev and c != 0:
                seq.append(int(c))
            prev = c
        out.append(seq)
    return out


def _modules():
    """The paddle parts, imported on first use so ``ema-callback --help`` stays fast."""
    from ..paddle_compat import paddle
    from paddle import nn

    class TextLines(paddle.io.Dataset):
        def __init__(self, images: np.ndarray, labels: List[str]):
            self.x = (images.astype("float32")[:, None] / 127.5 - 1.0)
            self.y = _encode(labels)
            self.n = np.array([[len(t)] for t in labels], dtype="int64")

        def __getitem__(self, i):
            return self.x[i], self.y[i], self.n[i]

        def __len__(self):
            return len(self.x)

    def conv_bn(cin, cout, kernel, stride, padding):
        return [nn.Conv2D(cin, cout, kernel, stride=stride, padding=padding, bias_attr=False),
                nn.BatchNorm2D(cout), nn.ReLU()]

    class TinyCRNN(nn.Layer):
        """Strided conv encoder (32x128 -> 1x32 columns) + BiLSTM + linear to 37 classes (blank + 0-9A-Z).

        Strided convolutions instead of pooling keep a training step under ~90 ms on 2 CPU cores.
        """

        def __init__(self, num_classes: int = len(ALPHABET) + 1, hidden: int = 64):
            super().__init__()
            self.encoder = nn.Sequential(*conv_bn(1, 32, 4, 4, 0), *conv_bn(32, 64, 3, (2, 1), 1),
                                         *conv_bn(64, 128, 3, (2, 1), 1), *conv_bn(128, 128, (2, 3), (2, 1), (0, 1)))
            self.rnn = nn.LSTM(128, hidden, direction="bidirect")
            self.head = nn.Linear(2 * hidden, num_classes)

        def forward(self, x):
            f = self.encoder(x).squeeze(2).transpose([0, 2, 1])  # [B, T=32, C]
            seq, _ = self.rnn(f)
            return self.head(seq)  # [B, T, classes] logits

    class CTCLoss(nn.Layer):
        def forward(self, logits, labels, label_len):
            t = paddle.full([logits.shape[0]], logits.shape[1], dtype="int64")
            return paddle.nn.functional.ctc_loss(logits.transpose([1, 0, 2]), labels, t,
                                                 label_len.squeeze(-1), blank=0, reduction="mean")

    class SequenceAccuracy(paddle.metric.Metric):
        """Exact-match accuracy of greedy CTC decoding."""

        def __init__(self):
            super().__init__()
            self.reset()

        def name(self):
            return "acc"

        def compute(self, logits, labels, label_len):
            return logits, labels, label_len

        def update(self, logits, labels, label_len):
            for pred, y, n in zip(greedy_decode(np.asarray(logits)), np.asarray(labels), np.asarray(label_len)):
                self.correct += int(pred == list(y[:int(n[0])]))
                self.total += 1
            return self.correct / max(self.total, 1)

        def reset(self):
            self.correct = self.total = 0

        def accumulate(self):
            return self.correct / max(self.total, 1)

    class CyclingBatches(paddle.io.BatchSampler):
        """``per_epoch`` batches per "epoch" from a pool that is reshuffled (seeded) each time it runs out,
        so evaluations can be frequent without repeating a small training set."""

        def __init__(self, pool_size: int, batch_size: int, per_epoch: int, seed: int):
            self.pool_size, self.batch_size, self.per_epoch = pool_size, batch_size, per_epoch
            self.rng = np.random.default_rng(seed)
            self.order: List[int] = []

        def __iter__(self):
            for _ in range(self.per_epoch):
                if len(self.order) < self.batch_size:
                    self.order = list(self.rng.permutation(self.pool_size))
                batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
                yield [int(i) for i in batch]

        def __len__(self):
            return self.per_epoch

    return paddle, TextLines, TinyCRNN, CTCLoss, SequenceAccuracy, CyclingBatches


def prepared_model(initial: Dict[str, np.ndarray], seed: int, lr: float):
    """A ``paddle.Model`` of the demo's CRNN from ``initial`` weights, prepared with Adam, CTC loss and sequence
    accuracy (the same in every run of the demo and of ``examples/bn_and_switch.py``)."""
    paddle, _, TinyCRNN, CTCLoss, SequenceAccuracy, _ = _modules()
    paddle.seed(seed)
    net = TinyCRNN()
    net.set_state_dict(initial)
    model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 1, HEIGHT, WIDTH], "float32", "image")],
                         labels=[paddle.static.InputSpec([None, MAX_LABEL], "int32", "label"),
                                 paddle.static.InputSpec([None, 1], "int64", "length")])
    model.prepare(paddle.optimizer.Adam(learning_rate=lr, parameters=net.parameters()), CTCLoss(), SequenceAccuracy())
    return model


def _curve_jump(values: List[float]) -> float:
    """Mean absolute change of a metric from one evaluation to the next."""
    return float(np.mean(np.abs(np.diff(values)))) if len(values) > 1 else 0.0


def run(args: argparse.Namespace, progress=print) -> Dict:
    paddle, TextLines, TinyCRNN, CTCLoss, SequenceAccuracy, CyclingBatches = _modules()
    from ..integrations.model_fit import EMACallback

    paddle.set_device("cpu")
    if args.threads:
        paddle.set_num_threads(args.threads) if hasattr(paddle, "set_num_threads") else None
    if args.steps % args.eval_every:
        raise SystemExit(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    epochs = args.steps // args.eval_every
    half_lives = [float(v) for v in str(args.half_lives).split(",") if v.strip()]
    models: List = []
    posthoc_dir = os.path.join(getattr(args, "candidates_dir", None) or args.out, "posthoc")
    started = time.time()
    images, labels = make_text_lines(args.train_size + args.eval_size, args.seed, **DATA_STYLE)
    n_train = args.train_size
    train = TextLines(images[:n_train], labels[:n_train])
    valid = TextLines(images[n_train:], labels[n_train:])
    progress(f"rendered {len(images)} synthetic text lines in {time.time() - started:.1f}s; "
             f"{args.steps} steps x batch {args.batch_size}, evaluation every {args.eval_every} steps")
    paddle.seed(args.seed)
    initial = TinyCRNN().state_dict()
    initial = {k: v.numpy().copy() for k, v in initial.items()}

    def fit(with_ema: bool):
        model = prepared_model(initial, args.seed, args.lr)
        net = model.network
        history: List[Dict[str, float]] = []
        tag = "with EMA" if with_ema else "raw only"

        class Progress(paddle.callbacks.Callback):
            def on_eval_end(self, logs=None):
                row = {k: float(np.mean(v)) for k, v in (logs or {}).items() if k not in ("step", "batch_size")}
                row["step"] = (len(history) + 1) * args.eval_every
                history.append(row)
                extra = "".join(f" | {k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("acc_"))
                progress(f"  [{tag}] step {row['step']:5d}/{args.steps}  acc {row['acc']:.3f}{extra}  "
                         f"({time.time() - started:.0f}s)")

        callbacks = [Progress()]
        if with_ema:
            length = {"decay": args.decay} if args.decay is not None else {"half_life_images": half_lives}
            if getattr(args, "posthoc", False):
                length["posthoc"] = {"sigma_rels": [0.05, 0.10], "snapshot_every": args.eval_every,
                                     "snapshot_dtype": "float32", "dir": posthoc_dir}
            callbacks.insert(0, EMACallback(schedule=args.schedule, eval_raw=True, final_weights="raw",
                                            monitor="acc", **length))
            callbacks[0].save_dir = getattr(args, "candidates_dir", None)  # for ema_candidates.json only
        batches = CyclingBatches(len(train), args.batch_size, args.eval_every, args.seed)
        train_loader = paddle.io.DataLoader(train, batch_sampler=batches)
        valid_loader = paddle.io.DataLoader(valid, batch_size=128, shuffle=False)
        model.fit(train_loader, valid_loader, epochs=epochs, verbose=0, callbacks=callbacks)
        labels = list(callbacks[0].ema.candidate_labels) if with_ema else []
        models.append((model, valid_loader))
        return history, {k: v.numpy() for k, v in net.state_dict().items()}, labels

    progress("run 1/2: without EMA")
    plain, plain_weights, _ = fit(False)
    progress("run 2/2: with EMA (each EMA and the raw weights of the same run evaluated side by side)")
    ema_run, ema_weights, labels = fit(True)
    identical = all(plain_weights[k].tobytes() == ema_weights[k].tobytes() for k in plain_weights)
    steps = [r["step"] for r in plain]
    curves = {"raw": [r["acc"] for r in plain], "raw_in_ema_run": [r["acc_raw"] for r in ema_run]}
    for label in labels:
        curves[label] = [r.get(f"acc_{label}", r["acc"]) for r in ema_run]
    curves["ema"] = [r["acc"] for r in ema_run]  # the primary EMA
    half = len(steps) // 2
    names = ["raw"] + labels
    summary = {name: {"final_acc": curves[name][-1], "best_acc": max(curves[name]),
                      "mean_abs_change": _curve_jump(curves[name]),
                      "mean_abs_change_2nd_half": _curve_jump(curves[name][half:])} for name in names}
    recommended = max(names, key=lambda n: (summary[n]["best_acc"], summary[n]["final_acc"]))
    posthoc = _posthoc_sweep(models[-1], posthoc_dir, summary, progress) if getattr(args, "posthoc", False) else None
    return {
        "posthoc": posthoc,
        "settings": {k: getattr(args, k) for k in ("steps", "eval_every", "batch_size", "lr", "decay", "half_lives",
                                                   "schedule", "eval_size", "train_size", "seed")},
        "candidates": names, "recommended": recommended,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, paddle {paddle.__version__}",
        "steps": steps, "curves": curves, "summary": summary,
        "raw_weights_identical_with_plugin": identical,
        "seconds": round(time.time() - started, 1),
    }


def _posthoc_sweep(fitted, folder: str, summary: Dict, progress) -> Dict:
    """Post-hoc EMA after the EMA run: sigma_rel 0.01..0.25 reconstructed from the snapshots at the last step and
    evaluated with the run's own evaluation (``Model.evaluate``), beside the EMAs and the raw weights."""
    from ..posthoc import PostHocEMA

    model, valid_loader = fitted
    post = PostHocEMA(folder)
    progress(f"post-hoc EMA sweep: {post.disk_use()}")
    sigmas = [round(0.01 * i, 2) for i in range(1, 26)]

    def evaluate(_network) -> float:
        return float(np.mean(model.evaluate(valid_loader, verbose=0)["acc"]))

    rows = post.sweep(model.network, evaluate, sigmas, progress=progress)
    best = max(rows, key=lambda r: r["metric"])
    return {"rows": rows, "best": best, "tracked_sigma_rels": post.sigma_rels, "at_step": post.steps[-1],
            "compare_final_acc": {name: r["final_acc"] for name, r in summary.items()}}


def format_table(results: Dict) -> str:
    s = results["settings"]
    length = f"EMA decay {s['decay']}" if s.get("decay") is not None else \
        f"EMA half-lives {s['half_lives']} images"
    rows = [
        f"EMA demo: tiny CRNN + CTC on synthetic text lines (0-9A-Z, 4-8 chars), {s['steps']} steps, batch {s['batch_size']}, "
        f"Adam lr {s['lr']}, {length} ({s['schedule']}), seed {s['seed']}",
        "",
        "| weights | final val acc | best val acc | mean abs change between evals | same, 2nd half of training |",
        "|---|---|---|---|---|",
    ]
    for name in results.get("candidates", ["raw", "ema"]):
        r = results["summary"][name]
        label = "raw (no EMA)" if name == "raw" else ("EMA" if name == "ema" else f"EMA {_pretty(name)}")
        rows.append(f"| {label} | {r['final_acc']:.3f} | {r['best_acc']:.3f} | {r['mean_abs_change']:.3f} | "
                    f"{r['mean_abs_change_2nd_half']:.3f} |")
    if results.get("recommended"):
        rows += ["", f"recommended (best val acc): {_pretty(results['recommended'])}"]
    if results.get("posthoc"):
        ph = results["posthoc"]
        rows += ["", f"post-hoc EMA (sigma_rel 0.01..0.25 reconstructed from the 0.05/0.10 snapshots at step "
                     f"{ph['at_step']}): best sigma_rel {ph['best']['sigma_rel']:.2f}, val acc {ph['best']['metric']:.3f}"]
    rows += ["", f"raw weights with the plugin == without it: {results['raw_weights_identical_with_plugin']}; "
                 f"{results['seconds']}s on {results['machine']}"]
    return "\n".join(rows)


def _pretty(label: str) -> str:
    """``ema_hl4000img`` -> ``half-life 4000 images``."""
    if label.startswith("ema_hl") and label.endswith("img"):
        return f"half-life {label[6:-3]} images"
    return label


def plot(results: Dict, path: str) -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(results["steps"], results["curves"]["raw"], "-o", ms=3, label="raw weights", color="#c44e52")
    colours = ["#4c72b0", "#55a868", "#8172b2", "#ccb974"]
    for i, name in enumerate(n for n in results.get("candidates", ["raw", "ema"]) if n != "raw"):
        label = f"EMA (decay {results['settings']['decay']})" if name == "ema" else f"EMA, {_pretty(name)}"
        ax.plot(results["steps"], results["curves"][name], "-o", ms=3, label=label, color=colours[i % 4])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation sequence accuracy")
    ax.set_title("Tiny CRNN on synthetic text lines: EMA vs raw weights")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    args.candidates_dir = args.out
    results = run(args)
    table = format_table(results)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    picture = plot(results, os.path.join(args.out, "curves.png"))
    if results.get("posthoc"):
        from ..posthoc_cli import plot_sweep

        ph = results["posthoc"]
        extra = {("raw weights" if k == "raw" else f"EMA {_pretty(k)}"): v for k, v in ph["compare_final_acc"].items()}
        plot_sweep(ph["rows"], ph["tracked_sigma_rels"], "validation accuracy at the last step",
                   os.path.join(args.out, "posthoc.png"), extra)
    print()
    print(table)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" + (f" and {picture}" if picture else ""))
    return 0
