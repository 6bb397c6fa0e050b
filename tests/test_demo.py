"""The main job, on a short setting: files written, raw weights untouched by the plugin, reproducible."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ema_callback.demo.run import build_parser, format_table, greedy_decode, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--steps", "40", "--eval-every", "20", "--train-size", "160", "--eval-size", "48", "--batch-size", "16"]


@pytest.mark.slow
def test_short_demo_writes_results_and_plot(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "ema_callback.cli", "demo", *SHORT, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| EMA half-life 1000 images |", "| EMA half-life 4000 images |", "| EMA half-life 16000 images |",
                "| raw (no EMA) |", "recommended (best val acc): "):
        assert row in done.stdout, done.stdout[-3000:]
    assert "step    20/40" in done.stdout and "EMA candidates (acc, higher is better):" in done.stderr
    table = json.loads((out / "ema_candidates.json").read_text())
    assert [r["candidate"] for r in table["candidates"]] == ["ema_hl1000img", "ema_hl4000img", "ema_hl16000img", "raw"]
    results = json.loads((out / "results.json").read_text())
    assert results["raw_weights_identical_with_plugin"] is True
    assert results["curves"]["raw"] == results["curves"]["raw_in_ema_run"]  # the plugin does not perturb training
    assert results["steps"] == [20, 40] and results["settings"]["steps"] == 40
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_same_seed_same_numbers():
    args = build_parser().parse_args(SHORT + ["--steps", "20"])
    first, second = run(args, progress=lambda *_: None), run(args, progress=lambda *_: None)
    assert first["curves"] == second["curves"]
    assert "| EMA half-life 4000 images |" in format_table(first)


def test_greedy_ctc_decoding_merges_repeats_and_drops_blanks():
    logits = np.eye(4)[[[1, 1, 0, 1, 2, 2, 0, 0, 3]]]
    assert greedy_decode(logits) == [[1, 1, 2, 3]]
