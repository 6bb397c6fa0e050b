"""``make docs``: run the demo (and its post-hoc variant) with defaults, and regenerate every part of the README
and docs/ that quotes what the code prints or a script wrote.

Runs write docs/demo_results.json, docs/demo_curves.png, docs/demo_ema_candidates.json, docs/demo_candidates.png,
docs/demo_posthoc_results.json, docs/demo_posthoc.png (and with ``--seeds`` docs/demo_seeds.json). Then every
block between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in README.md and docs/*.md is
re-rendered (``blocks``): the demo's tables, the ``EMA:`` option table (from ``config.schema.OPTIONS``), start lines
the code prints for shipped blocks, and the tables the benchmarks wrote (``make bench`` copies them to
docs/bench_cpu.md, docs/bench_cpu_paddle26.md, docs/checkpoint_sizes.md), and the hostile-file corpus figures
(``make docs`` runs ``tests/test_hostile_files.py`` with ``HOSTILE_REPORT=docs/hostile_files.json``).
``tests/test_docs.py`` fails when a page differs from what this renders.

    python docs/regenerate.py                    # runs both demos (about 1 + 1.5 minutes on 2 cores)
    python docs/regenerate.py --seeds 1,2,3      # also the demo on other seeds (a minute each)
    python docs/regenerate.py --no-run           # only re-renders the pages from the files in docs/
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
README = os.path.join(REPO, "README.md")
PAGES = [README] + [os.path.join(DOCS, name) for name in sorted(os.listdir(DOCS)) if name.endswith(".md")
                    and not name.startswith(("bench_", "checkpoint_sizes"))]
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def _load(name: str) -> Dict:
    with open(os.path.join(DOCS, name), encoding="utf-8") as handle:
        return json.load(handle)


def _read(name: str) -> str:
    with open(os.path.join(DOCS, name), encoding="utf-8") as handle:
        return handle.read().rstrip() + "\n"


def option_table() -> str:
    """The ``EMA:`` keys from ``config.schema.OPTIONS``: name, default, type, meaning."""
    import yaml

    from ema_callback.config.schema import OPTIONS

    kinds = {"bool": "bool", "int": "int", "float": "number", "choice": "one of", "regex_list": "regex list",
             "decay_list": "list of decays", "positive_or_list": "number or list", "posthoc": "mapping"}
    rows = ["| key | default | type | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        default = yaml.safe_dump(o.default, default_flow_style=True).strip().removesuffix("...").strip()
        if isinstance(o.default, float) and not float(default).is_integer() and len(default) > 8:
            default = f"{o.default:.4g}"
        kind = kinds[o.kind] + (": " + ", ".join(f"`{c}`" for c in o.choices) if o.choices else "")
        rows.append(f"| `{o.name}` | `{default}` | {kind} | {o.doc} |")
    return "\n".join(rows) + "\n"


START_LINE_EXAMPLES = (  # (what, block, per-device batch, ranks, images per epoch)
    ("the `ppocrv4_rec` block on one card of 192 (PaddleOCR's recipe: 8 GPUs x 192)", "ppocrv4_rec", 192, 1, None),
    ("the `default` block (`decay: 0.9999`, threshold), 8 x 32 images", "default", 32, 8, None),
    ("the `short_run` block (exponential warm-up), batch 64", "short_run", 64, 1, None),
    ("`half_life_epochs: 0.5` on 50,000 images, 2 x 64", {"half_life_epochs": 0.5}, 64, 2, 50000),
)


def start_lines() -> str:
    """What ``run_report.log_start`` prints (its first line) for a few shipped blocks: the same function."""
    from ema_callback.config.files import read_block_file
    from ema_callback.config.schema import EMAConfig
    from ema_callback.core.horizon import BatchInfo, candidates, describe

    out = []
    for what, block, per_device, world, size in START_LINE_EXAMPLES:
        config = EMAConfig.from_block(read_block_file(block) if isinstance(block, str) else block)
        batch = BatchInfo(per_device, world, 1, size)
        out += [f"{what}:", "", f"    EMA: {describe(config, batch, candidates(config, batch))}", ""]
    return "\n".join(out).rstrip() + "\n"


def seeds_table(seeds: Dict) -> str:
    from ema_callback.demo.run import _label

    rows = ["| seed | raw final acc | recommended | its final acc | points over raw | raw noise | its noise | calmer |",
            "|---|---|---|---|---|---|---|---|"]
    for seed, r in sorted(seeds.items(), key=lambda item: int(item[0])):
        rec = r["recommended"]
        raw, ema = r["summary"]["raw"], r["summary"][rec]
        calmer = f"{r['calmer']:.1f}x" if r.get("calmer") else "-"
        rows.append(f"| {seed} | {raw['final_acc']:.3f} | {_label(rec)} | {ema['final_acc']:.3f} | {r['gain_points']:+.1f} | "
                    f"{raw['noise']:.4f} | {ema['noise']:.4f} | {calmer} |")
    held = sum(1 for r in seeds.values() if r["gain_points"] >= 1 and (r.get("calmer") or 0) >= 3)
    rows += ["", f"The claim holds on {held} of {len(seeds)} seeds."]
    return "\n".join(rows) + "\n"


def hostile_files(report: Dict) -> str:
    """The corpus figures ``tests/test_hostile_files.py`` wrote (``HOSTILE_REPORT=docs/hostile_files.json``)."""
    t, m = report["worst_seconds"], report["worst_peak_mib"]
    return (f"The corpus: **{report['hostile_files']:,} hostile files** in {len(report['categories'])} categories "
            f"({report['files']:,} loads with the valid controls), {report['violating_files']} breaking a promise, "
            f"{report['hung']} hung, {report['crashed']} crashed. Worst time **{t[0]:.2f} s** (`{t[1]}`), worst "
            f"tracemalloc peak **{m[0]:.1f} MiB** (`{m[1]}`); bounds {report['bounds']}. Measured on "
            f"{report['cpu']} (`docs/hostile_files.json`).\n")


def _ratio(stat: Dict) -> str:
    return f"{stat['median']:.2f}x [{stat['q25']:.2f}-{stat['q75']:.2f}]"


def bench_summary(bench: Dict) -> str:
    """The figures docs/performance.md quotes, from ``docs/bench_cpu.json`` (what ``make bench`` measured): each
    bound against its median, with the spread, the CPU and the load on the machine."""
    load = bench.get("load_average", [float("nan")] * 2)
    out = [f"Measured on {bench['machine']}, load average {load[0]:.1f} at the start and {load[1]:.1f} at the end "
           f"(`docs/bench_cpu.json`); each figure is the median over {bench['reps']} repetitions [interquartile "
           "range]."]
    rows = bench["update"]
    out += ["", "- **Guarded update over the floor** (bound 1.35x): " + "; ".join(
        f"{r['model']} {_ratio(r['ours_over_floor'])}, {'within' if r['within_bound'] else '**not within**'}"
        for r in rows) + ". Without the guard: " + "; ".join(
        f"{r['model']} {_ratio(r['ours_no_guard_over_floor'])}" for r in rows) + ". The same floor twice (A/A, the "
        "resolution of these ratios): " + "; ".join(
        f"{r['model']} {_ratio(r['floor_again_over_floor'])}" for r in rows if "floor_again_over_floor" in r) + "."]
    several = [r for r in bench["update"] if r.get("several")]
    if several:
        ks = sorted(several[0]["several"]["over_one"], key=int)
        bounds = " / ".join(f"{several[0]['several']['bound'][k]:.1f}" for k in ks)
        out += ["- **" + " / ".join(ks) + " EMAs in one pass over one EMA**, CPU default path (bounds " + bounds
                + "): " + "; ".join(
                    f"{r['model']} " + " / ".join(f"{r['several']['over_one'][k]['median']:.2f}" for k in ks)
                    + " (" + " / ".join("within" if r["several"]["within_bound"][k] else "**not within**" for k in ks)
                    + (f"; load average {r['several']['load']:.1f}" if "load" in r["several"] else "") + ")"
                    for r in several) + "."]
    autos = [r for r in bench["update"] if r.get("auto")]
    if autos:
        out += ["- **The automatic mode's update** (one EMA and two post-hoc profiles updated every 4th update) over "
                "one EMA's, per optimizer step (bound 1.3x): " + "; ".join(
                    f"{r['model']} {_ratio(r['auto']['over_one'])}, "
                    f"{'within' if r['auto']['within_bound'] else '**not within**'}" for r in autos) + ". It keeps "
                "three float32 shadows in memory (" + ", ".join(
                    f"{r['model']} {r['auto']['shadow_bytes'] / 2 ** 20:.1f} MiB" for r in autos) + ") and its 4 "
                "snapshots per run take " + ", ".join(
                    f"{r['model']} {r['auto']['run_bytes'] / 2 ** 20:.1f} MiB "
                    f"({r['auto']['run_in_float32_copies']:.2f} float32 copies of the averaged weights)"
                    for r in autos) + " on disk."]
    if bench.get("training"):
        out += ["- **On a training step** the automatic mode adds: " + "; ".join(
            f"{r['model']}, {r['step_ms']:.1f} ms without EMA: {o['median']:+.1f}% [{o['q25']:+.1f}, {o['q75']:+.1f}]"
            for r in bench["training"] for o in [r["overhead_pct"]["automatic mode"]]) + "."]
    return "\n".join(out) + "\n"


def blocks() -> Dict[str, str]:
    """Every generated block, from the files in docs/ and the code."""
    from ema_callback.demo.run import _label, candidates_table, headline_table

    results, posthoc = _load("demo_results.json"), _load("demo_posthoc_results.json")
    s = results["settings"]
    rec = results["recommended"]
    ph = posthoc["posthoc"]
    best = ph["best"]
    compare = ph["compare_final_acc"]
    outside = [r["sigma_rel"] for r in ph["rows"] if r["extrapolated"]]
    seeds = _load("demo_seeds.json") if os.path.exists(os.path.join(DOCS, "demo_seeds.json")) else {}
    return {
        "demo-headline": headline_table(results) + "\n",
        "demo-run": (f"One `Model.fit` run of {s['steps']} Adam steps (batch {s['batch_size']}, lr {s['lr']}, seed "
                     f"{s['seed']}), evaluated every {s['eval_every']} steps, took **{results['seconds']} s** on "
                     f"{results['machine']} (`docs/demo_results.json`). The raw weights come from the same run: "
                     "with the plugin they are bit-identical to a run without it (`tests/test_demo.py`).\n"),
        "demo-candidates": candidates_table(results) + "\n",
        "demo-seeds": seeds_table(seeds) if seeds else "Not measured yet: `python docs/regenerate.py --seeds ...`.\n",
        "demo-posthoc": (f"`ema-callback demo --posthoc` tracks two power-function profiles (sigma_rel 0.05 and "
                         f"0.10) in the same run and reconstructs sigma_rel 0.01 to 0.25 from their snapshots at step "
                         f"{ph['at_step']}, each evaluated with `Model.evaluate` "
                         f"({posthoc['seconds']} s in all, `docs/demo_posthoc_results.json`): the best is "
                         f"**sigma_rel {best['sigma_rel']:.2f}, val acc {best['metric']:.3f}**, against "
                         f"{compare[rec]:.3f} for the recommended {_label(rec)} and {compare['raw']:.3f} for the raw "
                         f"weights. {len(outside)} of the {len(ph['rows'])} values lie outside the tracked "
                         f"profiles and are extrapolations (flagged in the sweep).\n"),
        "options": option_table(),
        "start-lines": start_lines(),
        "bench-cpu": _read("bench_cpu.md"),
        "bench-summary": bench_summary(_load("bench_cpu.json")),
        "bench-paddle26": _read("bench_cpu_paddle26.md"),
        "checkpoint-sizes": _read("checkpoint_sizes.md"),
        "hostile-files": hostile_files(_load("hostile_files.json")),
    }


def render(text: str, rendered: Dict[str, str]) -> str:
    """``text`` with each generated block it holds replaced by ``rendered[name]``."""
    def replace(match):
        name = match.group("name")
        if name not in rendered:
            raise SystemExit(f"generated block {name!r}: nothing renders it")
        return match.group(1) + rendered[name] + match.group(4)

    return BLOCK.sub(replace, text)


def render_pages(rendered: Dict[str, str]) -> Dict[str, str]:
    """``{path: new text}`` of every page; every block rendered must stand in some page."""
    out, used = {}, set()
    for path in PAGES:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        used |= {m.group("name") for m in BLOCK.finditer(text)}
        out[path] = render(text, rendered)
    missing = set(rendered) - used
    if missing:
        raise SystemExit(f"no page holds the generated block(s) {', '.join(sorted(missing))}")
    return out


def _demo(out: str, *extra: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "ema_callback.cli", "demo", "--out", out, *extra], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-run", action="store_true", help="re-render the pages from docs/ only")
    p.add_argument("--seeds", default="", help="also run the default demo on these seeds (a,b,c)")
    p.add_argument("--work", default=os.path.join(REPO, "build", "docs"), help="where the demos write")
    args = p.parse_args()
    if not args.no_run:
        plain, posthoc = os.path.join(args.work, "demo"), os.path.join(args.work, "demo_posthoc")
        _demo(plain)
        _demo(posthoc, "--posthoc")
        for source, target in ((f"{plain}/results.json", "demo_results.json"), (f"{plain}/curves.png", "demo_curves.png"),
                               (f"{plain}/ema_candidates.json", "demo_ema_candidates.json"),
                               (f"{plain}/ema_candidates.png", "demo_candidates.png"),
                               (f"{posthoc}/results.json", "demo_posthoc_results.json"),
                               (f"{posthoc}/posthoc.png", "demo_posthoc.png")):
            shutil.copy(source, os.path.join(DOCS, target))
    if args.seeds:
        found = {}
        for seed in [int(v) for v in args.seeds.split(",") if v.strip()]:
            out = os.path.join(args.work, f"seed{seed}")
            _demo(out, "--seed", str(seed))
            found[str(seed)] = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
            found[str(seed)].pop("curves")
        with open(os.path.join(DOCS, "demo_seeds.json"), "w", encoding="utf-8") as handle:
            json.dump(found, handle, indent=1)
    changed = []
    for path, text in render_pages(blocks()).items():
        with open(path, encoding="utf-8") as handle:
            old = handle.read()
        if text != old:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            changed.append(os.path.relpath(path, REPO))
    print("regenerated: " + (", ".join(changed) if changed else "nothing changed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
