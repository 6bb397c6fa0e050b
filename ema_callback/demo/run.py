"""``ema-callback demo``: what EMA does to a real training run, in under three minutes on a CPU.

Trains a small CRNN-style text recognizer (convolutional encoder, BiLSTM sequence head, CTC loss) on
synthetic text-line images (characters 0-9A-Z) rendered with Pillow, with ``paddle.Model.fit`` and an
``EMACallback`` that states no length: ``length: auto``. The default-length EMA is evaluated beside the raw weights
of the same run every ``--eval-every`` steps (``eval_raw``: the raw weights with the plugin are bit-identical to a
run without it, so one run shows both), and at the end the length is picked from the run's own evaluation
(``integrations.auto_length``). Prints the headline (raw against the automatic pick: final validation accuracy,
validation noise, the pick's gain with its standard error), then every candidate, and writes ``results.json``,
``curves.png``, ``ema_auto.json`` (+ ``.png``) and ``ema_candidates.json`` (+ ``.png``) to ``--out``.
``--half-lives 2000,4000,16000`` runs several EMAs of stated lengths in one pass instead, ``--posthoc`` also sweeps
post-hoc lengths after the run.

Validation noise is the residual standard deviation of validation accuracy around a linear trend over the last
quarter of training (``candidates.trend_noise``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Dict, List, Optional

import numpy as np

from ema_callback.demo.text_lines import ALPHANUMERIC, make_text_lines
from ema_callback.plots import pyplot

HEIGHT, WIDTH, MAX_LABEL = 32, 128, 8
ALPHABET = ALPHANUMERIC
DATA_STYLE = dict(alphabet=ALPHABET, min_len=4, max_len=MAX_LABEL, noise=28.0, max_rotation=3.0)
DEFAULTS = dict(steps=640, eval_every=20, train_size=4000, batch_size=32, lr=0.004, half_lives="",
                eval_size=512, seed=7)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ema-callback demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"],
                   help="optimizer steps between evaluations (default %(default)s: at least 8 in the last quarter, "
                        "where the noise is measured)")
    p.add_argument("--train-size", type=int, default=DEFAULTS["train_size"],
                   help="synthetic training images (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (default %(default)s: a "
                                                                    "noisy run, as high rates are)")
    p.add_argument("--half-lives", default=DEFAULTS["half_lives"],
                   help="EMA half-lives in training images, one EMA each (default: none stated, length auto)")
    p.add_argument("--decay", type=float, default=None, help="one EMA of this decay instead of --half-lives")
    p.add_argument("--schedule", default="auto",
                   help="EMA decay schedule (default auto: half-lives hold from the first update)")
    p.add_argument("--eval-size", type=int, default=DEFAULTS["eval_size"],
                   help="validation images (default %(default)s)")
    p.add_argument("--posthoc", action="store_true",
                   help="also track two power-function EMA profiles (sigma_rel 0.05, 0.10) and sweep sigma_rel "
                        "0.01..0.25 after the run (post-hoc EMA)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
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


class NumpyBatches:
    """A ``DataLoader``'s batches as numpy arrays, for ``Model.fit``/``evaluate``: hapi passes every input through
    ``paddle.to_tensor``, which copies a tensor with a ``UserWarning`` ("To copy construct from a tensor, it is
    recommended to use sourceTensor.clone().detach() ...") and takes numpy as it is. ``len`` is the loader's."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            yield [field.numpy() for field in batch]

    def __len__(self) -> int:
        return len(self.loader)


def _modules():
    """The paddle parts, imported on first use so ``ema-callback --help`` stays fast."""
    from paddle import nn

    from ema_callback.paddle_compat import paddle

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


def run(args: argparse.Namespace, progress=print) -> Dict:
    """One ``Model.fit`` with ``EMACallback`` (the EMAs and the raw weights evaluated side by side, and with length
    auto the pick at the end); the results are the candidates table's (``CandidateBoard.summary``) and the pick's,
    with the headline: raw against the automatic pick (or the recommended EMA)."""
    return results_of(fit(args, progress))


def fit(args: argparse.Namespace, progress=print, held_out: int = 0) -> Dict:
    """The demo's training run; returns what it made (``model``, ``ema`` the callback, the validation loader, with
    ``held_out`` > 0 a loader of that many more text lines the run never saw, ``table`` and ``posthoc``)."""
    paddle, TextLines, TinyCRNN, CTCLoss, SequenceAccuracy, CyclingBatches = _modules()
    from ema_callback.integrations.model_fit import EMACallback

    paddle.set_device("cpu")
    if args.threads:
        paddle.set_num_threads(args.threads) if hasattr(paddle, "set_num_threads") else None
    if args.steps % args.eval_every:
        raise SystemExit(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    half_lives = [float(v) for v in str(args.half_lives).split(",") if v.strip()]
    out = getattr(args, "candidates_dir", None) or args.out
    posthoc_dir = os.path.join(out, "posthoc")
    started = time.time()
    images, labels = make_text_lines(args.train_size + args.eval_size + held_out, args.seed, **DATA_STYLE)
    train = TextLines(images[:args.train_size], labels[:args.train_size])
    end = args.train_size + args.eval_size
    valid = TextLines(images[args.train_size:end], labels[args.train_size:end])
    held = TextLines(images[end:], labels[end:]) if held_out else None
    progress(f"rendered {len(images)} synthetic text lines in {time.time() - started:.1f}s; "
             f"{args.steps} steps x batch {args.batch_size}, evaluation every {args.eval_every} steps")
    paddle.seed(args.seed)
    initial = {k: v.numpy().copy() for k, v in TinyCRNN().state_dict().items()}
    model = prepared_model(initial, args.seed, args.lr)

    class Progress(paddle.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.evaluations = 0

        def on_eval_end(self, logs=None):
            self.evaluations += 1
            shown = " | ".join(f"{'EMA' if k == 'acc' else k[4:]} {float(np.mean(v)):.3f}"
                               for k, v in (logs or {}).items() if k == "acc" or k.startswith("acc_"))
            progress(f"  step {self.evaluations * args.eval_every:5d}/{args.steps}  {shown}  "
                     f"({time.time() - started:.0f}s)")

    length = {"decay": args.decay} if args.decay is not None else \
        {"half_life_images": half_lives} if half_lives else {}  # none stated: length auto
    if getattr(args, "posthoc", False):
        length["posthoc"] = {"sigma_rels": [0.05, 0.10], "snapshot_every": args.eval_every,
                             "snapshot_dtype": "float32", "dir": posthoc_dir}
    ema = EMACallback(schedule=args.schedule, eval_raw=True, final_weights="raw", monitor="acc", **length)
    ema.save_dir = out  # ema_candidates.json goes here (no checkpoints, so no resume look-up)
    batches = CyclingBatches(len(train), args.batch_size, args.eval_every, args.seed)
    train_loader = NumpyBatches(paddle.io.DataLoader(train, batch_sampler=batches))
    # batches of 32: 16 paired units for length auto's bootstrap (per batch in Model.fit; the accuracy is the same)
    valid_loader = NumpyBatches(paddle.io.DataLoader(valid, batch_size=32, shuffle=False))
    model.fit(train_loader, valid_loader, epochs=args.steps // args.eval_every, verbose=0,
              callbacks=[ema, Progress()])
    table = ema.board.summary()
    rows = {r["candidate"]: r for r in table["candidates"]}
    posthoc = _posthoc_sweep((model, valid_loader), posthoc_dir, rows, progress) \
        if getattr(args, "posthoc", False) else None
    held_loader = NumpyBatches(paddle.io.DataLoader(held, batch_size=128, shuffle=False)) if held else None
    return {"args": args, "model": model, "ema": ema, "valid": valid_loader, "held_out": held_loader,
            "table": table, "posthoc": posthoc, "started": started, "paddle": paddle.__version__}


def results_of(fitted: Dict) -> Dict:
    """``run``'s results from ``fit``'s."""
    args, ema, table, posthoc = fitted["args"], fitted["ema"], fitted["table"], fitted["posthoc"]
    rows = {r["candidate"]: r for r in table["candidates"]}
    recommended = table["recommended"]
    headline = {name: {"final_acc": rows[name]["final"], "noise": rows[name]["noise"]} for name in ("raw", recommended)}
    auto = _auto_results(ema.auto) if ema.auto is not None else None
    if auto is not None:  # the headline's EMA is the pick; its gain is over the raw weights at the end
        recommended = auto["pick"]
    pick_final = auto["values"][auto["pick"]] if auto else rows[recommended]["final"]
    calm = rows[ema.board.primary] if auto else rows[recommended]
    return {
        "settings": {k: getattr(args, k) for k in ("steps", "eval_every", "batch_size", "lr", "decay", "half_lives",
                                                   "schedule", "eval_size", "train_size", "seed")},
        "candidates": [r["candidate"] for r in table["candidates"]],
        "recommended": recommended,
        "recommendation_rule": table["recommendation_rule"],
        "headline": headline,
        "gain_points": round(100 * (pick_final - rows["raw"]["final"]), 6),
        "calmer": (rows["raw"]["noise"] / calm["noise"] if calm["noise"] and rows["raw"]["noise"] is not None
                   else None),
        "auto": auto,
        "steps": [step for step, _ in rows["raw"]["curve"]],
        "curves": {name: [value for _, value in r["curve"]] for name, r in rows.items()},
        "summary": {name: {"final_acc": r["final"], "best_acc": r["best"], "noise": r["noise"],
                           "noise_evaluations": r["noise_evaluations"],
                           "half_weight_images": r.get("half_weight_images")} for name, r in rows.items()},
        "posthoc": posthoc,
        "machine": f"{cpu_model()}, paddle {fitted['paddle']}",
        "seconds": round(time.time() - fitted["started"], 1),
    }


def cpu_model() -> str:
    """``Intel(R) Xeon(R) ... (x86_64, 2 cores)``: the CPU a timing or a figure that depends on it came from."""
    name = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        pass
    return f"{name or platform.processor() or 'unknown CPU'} ({platform.machine()}, {os.cpu_count()} cores)"


def _auto_results(auto) -> Dict:
    """What length: auto picked at the end: the decision, every candidate's value and length."""
    decision = auto.decision.as_dict()
    return {"pick": decision["label"], "default": decision["default"], "decision": decision,
            "values": {label: e.value for label, e in auto.evaluated.items()},
            "lengths": {label: auto.length_of(label) for label in auto.evaluated},
            "default_half_life_images": auto.plan.half_life_steps * auto.plan.global_batch}


def _posthoc_sweep(fitted, folder: str, rows: Dict, progress) -> Dict:
    """Post-hoc EMA after the EMA run: sigma_rel 0.01..0.25 reconstructed from the snapshots at the last step and
    evaluated with the run's own evaluation (``Model.evaluate``), beside the EMAs and the raw weights."""
    from ema_callback.posthoc.snapshots import PostHocEMA

    model, valid_loader = fitted
    post = PostHocEMA(folder)
    progress(f"post-hoc EMA sweep: {post.disk_use()}")
    sigmas = [round(0.01 * i, 2) for i in range(1, 26)]

    def evaluate(_network) -> float:
        return float(np.mean(model.evaluate(valid_loader, verbose=0)["acc"]))

    swept = post.sweep(model.network, evaluate, sigmas, progress=progress)
    for row in swept:
        row["extrapolated"] = post.extrapolated(row["sigma_rel"])
    best = max(swept, key=lambda r: r["metric"])
    return {"rows": swept, "best": best, "tracked_sigma_rels": post.sigma_rels, "at_step": post.steps[-1],
            "compare_final_acc": {name: r["final"] for name, r in rows.items()}}


def _label(name: str) -> str:
    if name.startswith("sigma"):
        return f"EMA sigma_rel {name[5:]}"
    return "raw weights" if name == "raw" else f"EMA {_pretty(name)}" if name != "ema" else "EMA"


def _noise(value: Optional[float]) -> str:
    return f"{value:.4f}" if value is not None else "-"


def headline_table(results: Dict) -> str:
    """The seed's comparison: raw against the automatic pick (or, with stated lengths, the recommended EMA)."""
    if results.get("auto"):
        return _auto_headline(results)
    rec = results["recommended"]
    rows = ["| weights | final val acc | validation noise, last quarter |", "|---|---|---|"]
    for name in ("raw", rec):
        r = results["summary"][name]
        rows.append(f"| {_label(name)}{' (recommended)' if name == rec and rec != 'raw' else ''} | "
                    f"{r['final_acc']:.3f} | {_noise(r['noise'])} |")
    calmer = f"{results['calmer']:.1f}x calmer" if results.get("calmer") else "noise not measured"
    rows += ["", f"{_label(rec)}: {results['gain_points']:+.1f} points of final accuracy, {calmer} than the raw "
                 f"weights of the same run."]
    return "\n".join(rows)


def _auto_headline(results: Dict) -> str:
    """raw weights, the default length (its curve, its noise) and the automatic pick, at the end of one run."""
    auto, summary = results["auto"], results["summary"]
    d, default, pick = auto["decision"], auto["default"], auto["pick"]

    def row(name: str, text: str, final: float, noise: str) -> str:
        return f"| {text}{' **(length auto)**' if name == pick else ''} | {final:.3f} | {noise} |"

    rows = ["| weights | final val acc | validation noise, last quarter |", "|---|---|---|",
            row("raw", "raw weights", summary["raw"]["final_acc"], _noise(summary["raw"]["noise"])),
            row(default, f"EMA, default length (half-life {auto['default_half_life_images']:,.0f} images)",
                summary[default]["final_acc"], _noise(summary[default]["noise"]))]
    if pick not in (default, "raw"):
        rows.append(row(pick, f"EMA, {auto['lengths'][pick]}", auto["values"][pick], "-"))
    se = f" +- {100 * d['se']:.1f}" if d.get("se") else ""
    raw_se = f" +- {100 * d['se_over_raw']:.1f}" if d.get("se_over_raw") else ""
    over_raw = (f", {100 * d['gain_over_raw']:+.1f}{raw_se} points over the raw weights"
                if d.get("gain_over_raw") is not None else "")
    calmer = f" The default length is {results['calmer']:.1f}x calmer than the raw weights." \
        if results.get("calmer") else ""
    picked = "the default length" if pick == default else "the raw weights" if pick == "raw" else _label(pick)
    rows += ["", f"Length auto picked {picked}: {100 * d['gain']:+.1f}{se} points over the default{over_raw} "
                 f"({d['reason']}).{calmer}"]
    return "\n".join(rows)


def candidates_table(results: Dict) -> str:
    """Every candidate of the run (the several-EMA comparison)."""
    rows = ["| weights | final val acc | best val acc | validation noise, last quarter | half its weight on the last |",
            "|---|---|---|---|---|"]
    for name in results["candidates"]:
        r = results["summary"][name]
        half = "-" if name == "raw" else f"{r['half_weight_images']:,} images" if r["half_weight_images"] else "> run"
        rows.append(f"| {_label(name)} | {r['final_acc']:.3f} | {r['best_acc']:.3f} | {_noise(r['noise'])} | {half} |")
    return "\n".join(rows)


def format_table(results: Dict) -> str:
    s = results["settings"]
    length = f"EMA decay {s['decay']}" if s.get("decay") is not None else \
        f"EMA half-lives {s['half_lives']} images" if s.get("half_lives") else "EMA length auto"
    noise_evals = results["summary"]["raw"]["noise_evaluations"]
    rows = [f"EMA demo: tiny CRNN + CTC on synthetic text lines (0-9A-Z, 4-8 chars), {s['steps']} steps, batch "
            f"{s['batch_size']}, Adam lr {s['lr']}, {length} (schedule {s['schedule']}), evaluation every "
            f"{s['eval_every']} steps, seed {s['seed']}", "", headline_table(results), "",
            "Every candidate:", "", candidates_table(results), "",
            f"recommended: {_label(results['recommended'])} (rule: {results['recommendation_rule']}); validation "
            f"noise: residual std of val acc around a linear trend over the last quarter ({noise_evals} evaluations)"]
    if results.get("auto"):
        auto = results["auto"]
        rows += ["", "length auto, at the end of the run (val acc): " + ", ".join(
            f"{_label(label)} {value:.3f}" for label, value in auto["values"].items())]
    if results.get("posthoc"):
        ph = results["posthoc"]
        rows += ["", f"post-hoc EMA (sigma_rel 0.01..0.25 reconstructed from the 0.05/0.10 snapshots at step "
                     f"{ph['at_step']}): best sigma_rel {ph['best']['sigma_rel']:.2f}, "
                     f"val acc {ph['best']['metric']:.3f}"
                     "; values outside 0.05-0.10 are extrapolations"]
    rows += ["", f"{results['seconds']}s on {results['machine']}"]
    return "\n".join(rows)


def _pretty(label: str) -> str:
    """``ema_hl4000img`` -> ``half-life 4000 images``."""
    if label.startswith("ema_hl") and label.endswith("img"):
        return f"half-life {label[6:-3]} images"
    return label


def plot(results: Dict, path: str) -> Optional[str]:
    """The headline picture: validation accuracy of the raw weights and of the recommended EMA, same run."""
    plt = pyplot()
    if plt is None:
        return None
    rec, auto = results["recommended"], results.get("auto")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(results["steps"], results["curves"]["raw"], "-o", ms=3, label="raw weights", color="#c44e52")
    shown = auto["default"] if auto else rec  # length auto: the default length's curve, the pick at the end
    if shown != "raw":
        text = f"EMA, default length (half-life {auto['default_half_life_images']:,.0f} images)" if auto \
            else _label(shown)
        ax.plot(results["steps"], results["curves"][shown], "-o", ms=3, label=text, color="#4c72b0")
    if auto and auto["pick"] not in (auto["default"], "raw"):
        ax.plot([results["steps"][-1]], [auto["values"][auto["pick"]]], "*", ms=12, color="#55a868",
                label=f"length auto's pick, {auto['lengths'][auto['pick']]}")
    cut = 0.75 * results["steps"][-1]
    ax.axvspan(cut, results["steps"][-1], color="0.92", zorder=0, label="last quarter (noise measured)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation sequence accuracy")
    ax.set_title("Tiny CRNN on synthetic text lines: raw weights and their EMA")
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
        from ema_callback.posthoc.cli import plot_sweep

        ph = results["posthoc"]
        extra = {_label(k): v for k, v in ph["compare_final_acc"].items()}
        plot_sweep(ph["rows"], ph["tracked_sigma_rels"], "validation accuracy at the last step",
                   os.path.join(args.out, "posthoc.png"), extra)
    print()
    print(table)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" + (f" and {picture}" if picture else ""))
    return 0
