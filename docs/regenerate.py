"""``make docs``: run the demo (and its post-hoc variant) with defaults and regenerate every figure the README and
docs/ quote from them: docs/demo_results.json, docs/demo_curves.png, docs/demo_ema_candidates.json,
docs/demo_candidates.png, docs/demo_posthoc_results.json, docs/demo_posthoc.png, and the README's blocks between
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``. ``tests/test_docs.py`` checks that the README's
blocks are what ``readme_blocks`` renders from the files in docs/.

    python docs/regenerate.py               # runs both demos (about 1 + 1.5 minutes on 2 cores)
    python docs/regenerate.py --no-run      # only re-renders the README from docs/*.json
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
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def _load(name: str) -> Dict:
    with open(os.path.join(DOCS, name), encoding="utf-8") as handle:
        return json.load(handle)


def readme_blocks(results: Dict, posthoc: Dict) -> Dict[str, str]:
    """The README's generated blocks, from the demo's ``results.json`` and the ``--posthoc`` run's."""
    from ema_callback.demo.run import _label, candidates_table, headline_table

    s = results["settings"]
    rec = results["recommended"]
    ph = posthoc["posthoc"]
    best = ph["best"]
    compare = ph["compare_final_acc"]
    outside = [r["sigma_rel"] for r in ph["rows"] if r["extrapolated"]]
    return {
        "demo-headline": headline_table(results) + "\n",
        "demo-run": (f"One `Model.fit` run of {s['steps']} Adam steps (batch {s['batch_size']}, lr {s['lr']}, seed "
                     f"{s['seed']}), evaluated every {s['eval_every']} steps, took **{results['seconds']} s** on "
                     f"{results['machine']} (`docs/demo_results.json`). The raw weights come from the same run: "
                     "with the plugin they are bit-identical to a run without it (`tests/test_demo.py`).\n"),
        "demo-candidates": candidates_table(results) + "\n",
        "demo-posthoc": (f"`ema-callback demo --posthoc` tracks two power-function profiles (sigma_rel 0.05 and "
                         f"0.10) in the same run and reconstructs sigma_rel 0.01 to 0.25 from their snapshots at step "
                         f"{ph['at_step']}, each evaluated with `Model.evaluate` "
                         f"({posthoc['seconds']} s in all, `docs/demo_posthoc_results.json`): the best is "
                         f"**sigma_rel {best['sigma_rel']:.2f}, val acc {best['metric']:.3f}**, against "
                         f"{compare[rec]:.3f} for the recommended {_label(rec)} and {compare['raw']:.3f} for the raw "
                         f"weights. {len(outside)} of the {len(ph['rows'])} values lie outside the tracked "
                         f"profiles and are extrapolations (flagged in the sweep).\n"),
    }


def render_readme(text: str, blocks: Dict[str, str]) -> str:
    """``text`` with each generated block replaced; every block named must be there."""
    found = set()

    def replace(match):
        name = match.group("name")
        found.add(name)
        return match.group(1) + blocks[name] + match.group(4) if name in blocks else match.group(0)

    out = BLOCK.sub(replace, text)
    missing = set(blocks) - found
    if missing:
        raise SystemExit(f"README.md: no generated block for {', '.join(sorted(missing))}")
    return out


def _demo(out: str, *extra: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "ema_callback.cli", "demo", "--out", out, *extra], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-run", action="store_true", help="re-render the README from docs/*.json only")
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
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    new = render_readme(text, readme_blocks(_load("demo_results.json"), _load("demo_posthoc_results.json")))
    with open(README, "w", encoding="utf-8") as handle:
        handle.write(new)
    print("README.md: generated blocks " + ("unchanged" if new == text else "rewritten"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
