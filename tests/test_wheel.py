"""The wheel carries what the README uses (issue 21.5): built from this checkout, installed into a fresh virtual
environment, used from a folder outside the checkout, a preset is found by name."""
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_lists_and_uses_the_presets_by_name(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", REPO, "-w", str(tmp_path / "dist")], check=True, timeout=600,
                   cwd=str(tmp_path), capture_output=True)
    wheel = next((tmp_path / "dist").glob("ema_callback-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "fresh")], check=True, timeout=300)
    fresh = tmp_path / "fresh" / "bin"
    done = subprocess.run([str(fresh / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(wheel)], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    listed = subprocess.run([str(fresh / "ema-callback"), "presets"], capture_output=True, text=True, cwd=str(work),
                            env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if not line.startswith("(")]
    assert names == ["default", "ppdet_threshold", "short_run", "ppocrv4_det", "ppocrv4_rec", "svtr_rec",
                     "picodet_s_416", "ppyoloe_plus_s"]
    assert str(tmp_path / "fresh") in listed.stdout.splitlines()[-1]  # the installed files, not the checkout
    (work / "suite.yml").write_text("Global:\n  epoch_num: 3\n")
    merged = subprocess.run([str(fresh / "ema-callback"), "merge-config", "suite.yml", "ppocrv4_rec", "-o", "out.yml"],
                            capture_output=True, text=True, cwd=str(work), env=env, timeout=120)
    assert merged.returncode == 0, merged.stderr
    block = yaml.safe_load((work / "out.yml").read_text())["EMA"]
    assert block == yaml.safe_load(open(os.path.join(REPO, "configs", "paddleocr", "ema_ppocrv4_rec.yml")))["EMA"]
    bad = subprocess.run([str(fresh / "ema-callback"), "merge-config", "suite.yml", "ppocrv5", "-o", "x.yml"],
                         capture_output=True, text=True, cwd=str(work), env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith(
        "ema-callback: error: --ema-config ppocrv5: no such file and no preset of that name (presets: default, ")
