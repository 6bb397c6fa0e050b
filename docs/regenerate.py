"""``make docs``: run the demo (length auto, and its several-EMA and post-hoc variants) with defaults, and
regenerate every part of the README and docs/ that quotes what the code prints or a script wrote.

Runs write docs/demo_results.json, docs/demo_curves.png, docs/demo_auto.json, docs/demo_auto.png (the default run:
length auto), docs/demo_several_results.json, docs/demo_candidates.png (``--half-lives 2000,4000,16000``),
docs/demo_posthoc_results.json, docs/demo_posthoc.png (``--posthoc``) and with ``--seeds`` docs/demo_seeds.json
(the default run on each seed; the default seed's is the default run's). Then every block between
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in README.md and docs/*.md is re-rendered
(``blocks``): the demo's tables, the ``EMA:`` option table (from ``config.schema.OPTIONS``), start lines the code
prints for shipped blocks, and the tables the benchmarks wrote (``make bench`` copies them to docs/bench_cpu.md,
docs/bench_cpu_paddle26.md, docs/checkpoint_sizes.md; ``make bench-auto`` docs/auto_length.md), and the
hostile-file corpus figures (``make docs`` runs ``tests/test_hostile_files.py`` with
``HOSTILE_REPORT=docs/hostile_files.json``). ``tests/test_docs.py`` fails when a page differs from what this
renders.

    python docs/regenerate.py                      # runs the three demos (about 1 + 1 + 1.5 minutes on 2 cores)
    python docs/regenerate.py --seeds 1,2,3,4,5,6,7  # also the default demo on other seeds (a minute each)
    python docs/regenerate.py --no-run             # only re-renders the pages from the files in docs/
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

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
             "decay_list": "list of decays", "positive_or_list": "number or list", "posthoc": "mapping",
             "period": "steps or epochs"}
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


def claim_holds(results: Dict) -> bool:
    """The demo's claim on one run: the automatic pick at least 1 point of final accuracy above the raw weights,
    and the default length's EMA at least 2.5x calmer than them (validation noise, last quarter). The demo with
    stated half-lives claimed 3x for its 2000-image EMA; length auto's default (about 1,400 images on this run) is
    shorter, so it averages less noise away."""
    return results["gain_points"] >= 1 and (results.get("calmer") or 0) >= 2.5


def seeds_table(seeds: Dict) -> str:
    """The default demo (length auto) on each seed: raw, the default length, the pick and the claim."""
    rows = ["| seed | raw final acc | default length | pick | pick's acc | over raw | over the default (+- se) | "
            "raw noise | default's noise | calmer | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for seed, r in sorted(seeds.items(), key=lambda item: int(item[0])):
        auto, summary = r["auto"], r["summary"]
        d, default, pick = auto["decision"], auto["default"], auto["pick"]
        se = f" +- {100 * d['se']:.1f}" if d.get("se") else ""
        picked = "default" if pick == default else "raw" if pick == "raw" else auto["lengths"][pick]
        rows.append(f"| {seed} | {summary['raw']['final_acc']:.3f} | {summary[default]['final_acc']:.3f} | {picked} | "
                    f"{auto['values'][pick]:.3f} | {r['gain_points']:+.1f} | {100 * d['gain']:+.1f}{se} | "
                    f"{summary['raw']['noise']:.4f} | {summary[default]['noise']:.4f} | {r['calmer']:.1f}x | "
                    f"{r['seconds']:.0f} |")
    held = sum(1 for r in seeds.values() if claim_holds(r))
    rows += ["", f"The claim holds on {held} of {len(seeds)} seeds."]
    return "\n".join(rows) + "\n"


def seed_files() -> List[Tuple[str, Dict]]:
    """The default demo's runs over seeds, one file per machine: ``demo_seeds.json`` (the machine the other figures
    come from) first, then ``demo_seeds_<cpu>.json`` of other machines (``--seeds-file``)."""
    names = ["demo_seeds.json"] * os.path.exists(os.path.join(DOCS, "demo_seeds.json"))
    names += sorted(os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "demo_seeds_*.json")))
    return [(name, _load(name)) for name in names]


def _span(values, fmt) -> str:
    return f"{fmt.format(min(values))} to {fmt.format(max(values))}"


def _seed_figures(seeds: Dict) -> str:
    """One machine's range over seeds: raw, the pick, the gain and the calm."""
    rows = list(seeds.values())
    return (f"raw {_span([r['summary']['raw']['final_acc'] for r in rows], '{:.3f}')}, the pick "
            f"{_span([r['auto']['values'][r['auto']['pick']] for r in rows], '{:.3f}')}, "
            f"**{_span([r['gain_points'] for r in rows], '{:+.1f}')} points** over raw, the default length "
            f"**{_span([r['calmer'] for r in rows], '{:.1f}')}x calmer**")


def spread(seeds: Dict, results: Dict, others: Sequence[Tuple[str, Dict]] = ()) -> str:
    """The README's line on what varies: the seeds' range of each figure, and the time as a range, on this machine
    and on every other machine measured (``others``: file name, seeds)."""
    if not seeds:
        return "Other seeds: not measured yet (`python docs/regenerate.py --seeds 1,2,3,4,5,6,7`).\n"
    rows = list(seeds.values())
    held = sum(1 for r in rows if claim_holds(r))
    seconds = [r["seconds"] for r in rows] + [results["seconds"]]
    names = ", ".join(str(k) for k in sorted(seeds, key=int))
    text = (f"Seeds {names} ([the demo](docs/demo.md), `docs/demo_seeds.json`): {_seed_figures(seeds)}; the claim "
            f"(at least +1 point and 2.5x calmer) holds on {held} of {len(rows)}, and `tests/test_docs.py` asserts "
            f"it on each. A run takes **{min(seconds):.0f} to {max(seconds):.0f} s** on {results['machine']}.")
    for name, other in others:
        runs = list(other.values())
        text += (f" On {runs[0]['machine']}, the same seeds (`docs/{name}`): {_seed_figures(other)}; the claim holds "
                 f"on {sum(1 for r in runs if claim_holds(r))} of {len(runs)}; a run takes "
                 f"**{_span([r['seconds'] for r in runs], '{:.0f}')} s**.")
    return text + (" Paddle's CPU kernels choose code paths by instruction set, so each CPU gives its own digits; the "
                   "claim is what is tested.\n")


def auto_table(results: Dict) -> str:
    """Every candidate length auto evaluated at the end of the default run, with the decision."""
    auto = results["auto"]
    d = auto["decision"]
    rows = ["| candidate | length | val acc at the end |", "|---|---|---|"]
    for label, value in auto["values"].items():
        mark = " **(picked)**" if label == auto["pick"] else ""
        rows.append(f"| {label}{mark} | {auto['lengths'][label]} | {value:.4f} |")
    rows += ["", f"Decision: {d['reason']} (`docs/demo_auto.json`)."]
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
        gap = autos[0]["auto"].get("profile_every", 4)  # bench files before the field: every 4th
        out += ["- **The automatic mode's update** (one EMA and two post-hoc profiles updated every "
                f"{gap}th update, the smallest gap, which runs of up to {(gap + 1) * 1000 - 1:,} optimizer steps use; "
                "longer runs update the profiles less often) over "
                "one EMA's, per optimizer step (bound 1.3x): " + "; ".join(
                    f"{r['model']} {_ratio(r['auto']['over_one'])}, "
                    f"{'within' if r['auto']['within_bound'] else '**not within**'}" for r in autos) + ". It keeps "
                "three float32 shadows in memory (" + ", ".join(
                    f"{r['model']} {r['auto']['shadow_bytes'] / 2 ** 20:.1f} MiB" for r in autos) + ") and its "
                f"{autos[0]['auto']['snapshots_per_run']} snapshots per run (runs of 48 steps or more; a shorter run "
                "writes up to 6) take " + ", ".join(
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
    several = _load("demo_several_results.json")
    s = results["settings"]
    ph, pa = posthoc["posthoc"], posthoc["auto"]
    best = ph["best"]
    outside = [r["sigma_rel"] for r in ph["rows"] if r["extrapolated"]]
    machines = seed_files()
    seeds = dict(machines[0][1]) if machines and machines[0][0] == "demo_seeds.json" else {}
    others = [(name, found) for name, found in machines if name != "demo_seeds.json"]
    bench_auto = ""
    for what, name in (("The demo's task", "auto_length"), ("A PaddleOCR recognizer", "auto_length_ocr")):
        found = os.path.exists(os.path.join(DOCS, f"{name}.md"))
        bench_auto += (f"**{what}** (`docs/{name}.json`):\n\n{_read(name + '.md')}\n" if found else
                       f"**{what}**: not measured yet (`make bench-auto`).\n\n")
    bench_auto = bench_auto.rstrip() + "\n"
    return {
        "demo-headline": headline_table(results) + "\n",
        "demo-run": (f"One `Model.fit` run of {s['steps']} Adam steps (batch {s['batch_size']}, lr {s['lr']}, seed "
                     f"{s['seed']}), evaluated every {s['eval_every']} steps, then {len(results['auto']['values'])} "
                     f"evaluations at the end for length auto, took **{results['seconds']} s** on "
                     f"{results['machine']} (`docs/demo_results.json`). The raw weights come from the same run: "
                     "with the plugin they are bit-identical to a run without it (`tests/test_demo.py`).\n\n"
                     + spread(seeds, results, others)),
        "demo-auto": auto_table(results),
        "demo-candidates": candidates_table(several) + "\n\n" + (
            f"Recommended by the one rule: {_label(several['recommended'])} "
            f"(`docs/demo_several_results.json`, {several['seconds']} s).\n"),
        "demo-seeds": (seeds_table(seeds) if seeds else "Not measured yet: `python docs/regenerate.py --seeds ...`.\n")
        + "".join(f"\nThe same seeds on {list(found.values())[0]['machine']} (`docs/{name}`):\n\n{seeds_table(found)}"
                  for name, found in others),
        "demo-posthoc": (f"`ema-callback demo --posthoc` runs length auto with two stated power-function profiles "
                         f"(sigma_rel 0.05 and 0.10, a snapshot every {posthoc['settings']['eval_every']} steps) and "
                         f"then reconstructs sigma_rel 0.01 to 0.25 from their snapshots at step {ph['at_step']}, each "
                         f"evaluated with `Model.evaluate` ({posthoc['seconds']} s in all, "
                         f"`docs/demo_posthoc_results.json`): the best of the 25 is **sigma_rel "
                         f"{best['sigma_rel']:.2f}, val acc {best['metric']:.3f}**; length auto's pick in the same run "
                         f"({_label(pa['pick']) if pa['pick'] != pa['default'] else 'the default length'}) scores "
                         f"{pa['values'][pa['pick']]:.3f} and the raw weights {pa['values']['raw']:.3f}. "
                         "The best of 25 "
                         f"is the maximum of 25 noisy values, which is why length auto keeps the default unless a "
                         f"candidate beats it by more than the noise. {len(outside)} of the {len(ph['rows'])} values "
                         "lie outside the tracked profiles and are extrapolations (flagged in the sweep).\n"),
        "auto-length": bench_auto,
        "options": option_table(),
        "start-lines": start_lines(),
        "bench-cpu": _read("bench_cpu.md"),
        "bench-summary": bench_summary(_load("bench_cpu.json")),
        "bench-paddle26": _read("bench_cpu_paddle26.md"),
        "checkpoint-sizes": _read("checkpoint_sizes.md"),
        "hostile-files": hostile_files(_load("hostile_files.json")),
        "uie-benchmark": (f"`docs/uie_ema.json`:\n\n{_read('uie_ema.md')}"
                          if os.path.exists(os.path.join(DOCS, "uie_ema.md"))
                          else "Not measured yet: `make bench-nlp`.\n"),
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
    p.add_argument("--seeds-file", default="demo_seeds.json",
                   help="where --seeds go in docs/: demo_seeds.json (this machine's figures), or 'machine': "
                        "demo_seeds_<this cpu>.json, another machine's runs beside them (with --no-run)")
    p.add_argument("--work", default=os.path.join(REPO, "build", "docs"), help="where the demos write")
    args = p.parse_args()
    if args.seeds_file == "machine":
        from ema_callback.demo.run import cpu_model

        args.seeds_file = "demo_seeds_" + re.sub(r"[^a-z0-9]+", "_", cpu_model().lower()).strip("_")[:48] + ".json"
    if not re.fullmatch(r"demo_seeds(_[a-z0-9_]+)?\.json", args.seeds_file):
        p.error(f"--seeds-file {args.seeds_file}: expected demo_seeds.json or demo_seeds_<cpu>.json")
    if not args.no_run:
        plain, several = os.path.join(args.work, "demo"), os.path.join(args.work, "demo_several")
        posthoc = os.path.join(args.work, "demo_posthoc")
        _demo(plain)
        _demo(several, "--half-lives", "2000,4000,16000")
        _demo(posthoc, "--posthoc")
        for source, target in ((f"{plain}/results.json", "demo_results.json"),
                               (f"{plain}/curves.png", "demo_curves.png"),
                               (f"{plain}/ema_auto.json", "demo_auto.json"), (f"{plain}/ema_auto.png", "demo_auto.png"),
                               (f"{several}/results.json", "demo_several_results.json"),
                               (f"{several}/ema_candidates.png", "demo_candidates.png"),
                               (f"{posthoc}/results.json", "demo_posthoc_results.json"),
                               (f"{posthoc}/posthoc.png", "demo_posthoc.png")):
            shutil.copy(source, os.path.join(DOCS, target))
    if args.seeds:
        from ema_callback.demo.run import DEFAULTS

        found = {}
        for seed in [int(v) for v in args.seeds.split(",") if v.strip()]:
            out = os.path.join(args.work, f"seed{seed}")
            if seed == DEFAULTS["seed"] and not args.no_run and args.seeds_file == "demo_seeds.json":
                out = os.path.join(args.work, "demo")  # the default run is this seed's
            else:
                _demo(out, "--seed", str(seed))
            found[str(seed)] = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
            found[str(seed)].pop("curves")
        with open(os.path.join(DOCS, args.seeds_file), "w", encoding="utf-8") as handle:
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
