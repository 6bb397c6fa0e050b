"""The Model.fit example runs as written and leaves EMA weights plus their .pdema beside them."""
import os
import subprocess
import sys

import paddle
import pytest

from ema_callback.files.state_file import read_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_model_fit_example_runs(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "model_fit_ema.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "acc" in done.stdout
    out = tmp_path / "output" / "model_fit_ema"
    state = read_state(str(out / "exported.pdema"))
    assert state["num_updates"] == 48 and set(state["raw_weights"]) == set(paddle.load(str(out / "exported.pdparams")))
    assert (out / "final.pdema").exists() and (out / "2.pdema").exists()


@pytest.mark.slow
def test_bn_and_switch_example_runs_short(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "bn_and_switch.py"), "--steps", "40",
                           "--eval-every", "20", "--train-size", "160", "--eval-size", "32", "--batch-size", "8",
                           "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| EMA + recompute_bn 16 |" in done.stdout and "| EMA + switch_every 250 |" in done.stdout
    assert (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_posthoc_model_fit_example_runs(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "posthoc_model_fit.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 0.24 |" in done.stdout and "best sigma_rel" in done.stdout and "6 snapshots" in done.stdout
    best = paddle.load(str(tmp_path / "output" / "posthoc_fit" / "best.pdparams"))
    assert "0.weight" in best and "1._mean" in best
