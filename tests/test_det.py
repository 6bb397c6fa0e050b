"""PaddleDetection: our engine in ppdet's Trainer, against ppdet's own ModelEMA, end to end (CPU)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import paddle
import pytest
from conftest import PADDLEDET_ROOT, RunsCode, make_net, needs_paddledet, tool_command
from datasets import write_coco_dataset

from ema_callback import EMAConfig
from ema_callback.config.schema import EMAConfigError
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.files.state_file import read_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(PADDLEDET_ROOT, "configs", "picodet", "picodet_xs_320_coco_lcnet.yml")


def _write_tiny() -> str:
    """tests/tiny_picodet_xs.yml with _BASE_ pointing at the checkout these tests use (issue 19.11: nothing
    depends on this repository's own folder layout)."""
    folder = tempfile.mkdtemp(prefix="tiny_picodet_")
    path = os.path.join(folder, "tiny_picodet_xs.yml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"_BASE_: ['{BASE}']\n" + open(os.path.join(REPO, "tests", "tiny_picodet_xs.yml")).read())
    return path


TINY = _write_tiny()
TIMEOUT = 420  # ppdet's loader hangs if a transform raises: every run is bounded

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("paddledet"),  # one worker: the module's fixtures once
              needs_paddledet]


def ppdet():
    if PADDLEDET_ROOT not in sys.path:
        sys.path.insert(0, PADDLEDET_ROOT)
    import ppdet.optimizer.ema as ema_module
    from ppdet.core.workspace import create, load_config
    return ema_module, create, load_config


@pytest.fixture(scope="module")
def picodet():
    """A real ppdet model: PicoDet-XS built from the checkout's own config."""
    _, create, load_config = ppdet()
    paddle.seed(0)
    cfg = load_config(os.path.join(PADDLEDET_ROOT, "configs", "picodet", "picodet_xs_320_coco_lcnet.yml"))
    return create(cfg.architecture)


def perturb(model, rng, scale=0.01):
    with paddle.no_grad():
        for t in model.state_dict().values():
            if t.dtype == paddle.float32:
                t.set_value(t.numpy() + scale * rng.normal(size=t.shape).astype("float32"))


@pytest.mark.parametrize("kind,decay,steps", [("threshold", 0.9, 300), ("exponential", 0.9998, 200)])
def test_our_ema_equals_ppdet_model_ema_where_ppdet_is_right(picodet, kind, decay, steps):
    ema_module, _, _ = ppdet()
    from ema_callback.integrations.paddledet import from_ppdet_flat_keys
    rng = np.random.default_rng(0)
    theirs = ema_module.ModelEMA(picodet, decay=decay, ema_decay_type=kind)
    ours = ExponentialMovingAverage(picodet, EMAConfig.from_block(
        from_ppdet_flat_keys({"ema_decay": decay, "ema_decay_type": kind})))
    for _ in range(steps):
        perturb(picodet, rng)
        theirs.update()
        ours.step()
    expected = {k: v.numpy() for k, v in theirs.apply().items()}
    got = ours.ema_state_dict(picodet)
    # float32 over hundreds of steps: compare relative to the magnitude (BatchNorm variances reach ~10)
    worst = max(float((np.abs(got[k] - expected[k]) / np.maximum(1.0, np.abs(expected[k]))).max()) for k in expected)
    assert worst <= 1e-6, worst


def test_ppdet_normal_resume_is_50x_too_large_and_ours_is_exact():
    ema_module, _, _ = ppdet()
    from ema_callback.integrations.paddledet import from_ppdet_flat_keys
    rng = np.random.default_rng(1)
    model = make_net()
    theirs = ema_module.ModelEMA(model, decay=0.9998, ema_decay_type="normal")
    cfg = EMAConfig.from_block(from_ppdet_flat_keys({"ema_decay": 0.9998, "ema_decay_type": "normal"}))
    ours = ExponentialMovingAverage(model, cfg)
    for _ in range(100):
        perturb(model, rng)
        theirs.update()
        ours.step()
    saved_theirs = {k: v.clone() for k, v in theirs.apply().items()}  # what ppdet writes to .pdparams
    saved_ours = ours.state_dict()
    perturb(model, rng)
    theirs.update()
    ours.step()
    straight = ours.averaged_numpy()["8.weight"]
    resumed_theirs = ema_module.ModelEMA(model, decay=0.9998, ema_decay_type="normal")
    resumed_theirs.resume(saved_theirs, step=100)  # ppdet's load_weight -> ema.resume(.pdparams, step)
    resumed_theirs.update()
    resumed_ours = ExponentialMovingAverage(model, cfg)
    resumed_ours.set_state_dict(saved_ours)
    resumed_ours.decay_product, resumed_ours.num_updates = saved_ours["decay_product"], 100
    resumed_ours.num_steps = 100
    resumed_ours.step()
    ratio = np.abs(resumed_theirs.apply()["8.weight"].numpy()).mean() / np.abs(straight).mean()
    assert 40 < ratio < 60  # ppdet's failure: about 1 / (1 - 0.9998**101)
    np.testing.assert_array_equal(resumed_ours.averaged_numpy()["8.weight"], straight)


def test_ppdet_black_list_stops_training_and_ours_does_not():
    ema_module, _, _ = ppdet()
    from ema_callback.integrations.paddledet import PpdetEMA

    def train(model, steps, seed):
        opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            model(paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32"))).mean().backward()
            opt.step()
            opt.clear_grad()
        return opt

    results = {}
    for who in ("ppdet", "ours"):
        model = make_net()
        if who == "ppdet":
            ema = ema_module.ModelEMA(model, decay=0.9, ema_black_list=["8.bias"])
        else:
            ema = PpdetEMA(model, EMAConfig(decay=0.9, exclude=[re.escape("8.bias")]))
        train(model, 3, 0)
        ema.update()
        model.set_dict(ema.apply())  # ppdet's snapshot: apply the EMA weights
        before = model[8].bias.numpy().copy()
        train(model, 3, 1)
        results[who] = (model[8].bias.stop_gradient, np.array_equal(before, model[8].bias.numpy()))
    assert results["ppdet"] == (True, True)  # ppdet's failure: the black-listed bias stopped training
    assert results["ours"] == (False, False)  # ours keeps training it


def test_flat_keys_translate_and_an_ema_section_replaces_them(caplog):
    from ema_callback.integrations.paddledet import resolve_det_config
    flat = {"use_ema": True, "ema_decay": 0.9998, "ema_decay_type": "exponential", "ema_black_list": ["head.conv"],
            "cycle_epoch": 5}
    cfg, extra = resolve_det_config(flat, None, [])
    assert (cfg.decay, cfg.schedule, cfg.tau, cfg.exclude, extra["cycle_epoch"]) == (
        0.9998, "exponential", 2000.0, [re.escape("head.conv")], 5)
    with caplog.at_level("INFO", logger="ema_callback"):  # the explicit EMA: request wins (issue 19.11)
        cfg, extra = resolve_det_config(dict(flat, EMA={"decay": 0.99}), None, [])
    assert (cfg.decay, cfg.exclude, extra["cycle_epoch"]) == (0.99, [], -1)
    assert "EMA: the EMA: section replaces PaddleDetection's own EMA: use_ema: True, ema_decay: 0.9998, " \
           "ema_decay_type: exponential, cycle_epoch: 5, ema_black_list: ['head.conv'] ignored" in caplog.text
    with pytest.raises(EMAConfigError, match=r"^EMA.save_as: det-train keeps ppdet's convention"):
        resolve_det_config({"EMA": {"save_as": "raw"}}, None, [])
    assert resolve_det_config({"EMA": {"eval_raw": True}}, None, [])[0].eval_raw  # a candidate beside the EMAs
    assert resolve_det_config({"use_ema": False}, None, [])[0].enable is False


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    write_coco_dataset(str(root / "dataset" / "tiny_coco"), 16, seed=5, split="train")
    write_coco_dataset(str(root / "dataset" / "tiny_coco"), 8, seed=6, split="val")
    return root


def env():
    return dict(os.environ, PYTHONPATH=REPO, PADDLEDET_ROOT=PADDLEDET_ROOT, PYTHONUNBUFFERED="1")


def det_train(cwd, *args):
    cmd = [sys.executable, "-m", "ema_callback.cli", "det-train", "-c", TINY, *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env())
    return done.returncode, done.stdout + done.stderr


def ppdet_tool(cwd, tool, *args):
    cmd = tool_command(os.path.join(PADDLEDET_ROOT, "tools", tool)) + ["-c", TINY, *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env())
    return done.returncode, done.stdout + done.stderr


AP = r"Average Precision  \(AP\) @\[ IoU=0\.50:0\.95 \| area=   all \| maxDets=100 \] = ([-\d.]+)"


def detections(path):
    return sorted((d["image_id"], round(d["score"], 6), tuple(round(v, 3) for v in d["bbox"]))
                  for d in json.load(open(path)))


def test_det_train_end_to_end(coco):
    """--eval on EMA weights: ppdet's own eval.py on the saved .pdparams gives the same detections and mAP."""
    cwd = str(coco)
    rc, log = det_train(cwd, "--eval", "-o", "save_dir=output/straight", "EMA.exclude=['head.head_reg']",
                        "EMA.recompute_bn=2")
    assert rc == 0, log[-4000:]
    aps = [float(v) for v in re.findall(AP, log)]
    assert len(aps) == 3, log[-4000:]
    shutil.copy(coco / "bbox.json", coco / "train_bbox.json")  # the last evaluation during training
    out = coco / "output" / "straight"
    final = read_state(str(out / "model_final.pdema"), key="ema_callback_state")
    state = final.pop("ema_callback_state")
    assert state["num_steps"] == 12 and state["num_updates"] == 12 and state["recompute_bn_batches"] == 2
    rc, eval_log = ppdet_tool(cwd, "eval.py", "-o", f"weights={out}/model_final")
    assert rc == 0, eval_log[-4000:]
    assert float(re.findall(AP, eval_log)[-1]) == aps[-1]
    assert detections(coco / "bbox.json") == detections(coco / "train_bbox.json")
    # ... and those are not the raw weights' detections
    paddle.save(final, str(coco / "raw.pdparams"))
    rc, raw_log = ppdet_tool(cwd, "eval.py", "-o", f"weights={coco}/raw")
    assert rc == 0, raw_log[-4000:]
    assert detections(coco / "bbox.json") != detections(coco / "train_bbox.json")
    # .pdparams = EMA weights, .pdema = raw weights (ppdet's convention); the excluded head follows the raw
    ema_weights = paddle.load(str(out / "model_final.pdparams"), return_numpy=True)
    name = next(k for k in final if k.startswith("head.head_reg") and k.endswith("weight"))
    other = next(k for k in final if k.startswith("backbone") and np.asarray(final[k]).ndim == 4)
    np.testing.assert_array_equal(ema_weights[name], final[name])
    assert not np.array_equal(ema_weights[other], final[other])
    # the excluded (black-listed) trainable parameter kept training after the first snapshot
    first = read_state(str(out / "0.pdema"), key="ema_callback_state")
    assert not np.array_equal(first[name], final[name])


def test_det_resume_continues_the_update_count(coco):
    cwd = str(coco)
    rc, log = det_train(cwd, "-o", "save_dir=output/part")
    assert rc == 0, log[-4000:]
    straight = read_state(str(coco / "output/part/model_final.pdema"), key="ema_callback_state")
    rc, log = det_train(cwd, "-r", "output/part/1", "-o", "save_dir=output/part2")
    assert rc == 0, log[-4000:]
    assert "EMA: resumed from" in log and "at optimizer step 8 (8 updates)" in log
    resumed = read_state(str(coco / "output/part2/model_final.pdema"), key="ema_callback_state")
    a, b = straight["ema_callback_state"], resumed["ema_callback_state"]
    assert a["num_steps"] == b["num_steps"] == 12 and a["num_updates"] == b["num_updates"] == 12
    worst = max(float(np.abs(np.asarray(a["shadow"][k]) - np.asarray(b["shadow"][k])).max()) for k in a["shadow"])
    assert worst == 0.0, worst  # ppdet is deterministic here (no random transforms), so the EMA is bit-exact
    # the EMA forgotten on resume (-r with EMA off): ppdet would load the EMA weights of 1.pdparams as raw; the
    # run goes on from the raw weights in 1.pdema instead, and ends on the raw weights of the uninterrupted run
    rc, log = det_train(cwd, "-r", "output/part/1", "-o", "save_dir=output/forgot", "EMA.enable=false")
    assert rc == 0, log[-4000:]
    assert "EMA: off for this run (-o EMA.enable=false)" in log
    assert "training continues from the raw weights in output/part/1.pdema" in log, log[-4000:]
    raw = {k: v for k, v in straight.items() if k != "ema_callback_state"}
    final = paddle.load(str(coco / "output/forgot/model_final.pdparams"), return_numpy=True)
    assert set(final) == set(raw) and all(np.asarray(final[k]).tobytes() == raw[k].tobytes() for k in raw)
    # a new run from an EMA run's weights says which weights it starts from
    rc, log = det_train(cwd, "-o", "save_dir=output/ft", "epoch=1", "pretrain_weights=output/part/model_final")
    assert rc == 0, log[-4000:]
    assert "EMA: pretrain_weights=output/part/model_final: this run starts from the EMA weights of that run " \
           "(model_final.pdparams; its raw weights are in model_final.pdema)" in log


def test_det_bad_input_is_a_one_line_error(coco, tmp_path):
    bad = tmp_path / "bad.yml"
    text = re.sub(r"_BASE_: \[.*\]", f"_BASE_: ['{PADDLEDET_ROOT}/configs/picodet/picodet_xs_320_coco_lcnet.yml']",
                  open(TINY).read())
    bad.write_text(text.replace("  decay: 0.9\n", "  decya: 0.9\n"))
    cmd = [sys.executable, "-m", "ema_callback.cli", "det-train", "-c", str(bad)]
    done = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "ema-callback: error: EMA.decya: unknown key, did you mean 'decay'?"
    assert not (tmp_path / "output").exists()


COUNT_MODEL_EMA = """import os, sys
sys.path.insert(0, os.environ["PADDLEDET_ROOT"])
import ppdet.optimizer.ema as ema_module
built = []
original = ema_module.ModelEMA.__init__
def counting(self, *args, **kwargs):
    built.append(1)
    original(self, *args, **kwargs)
ema_module.ModelEMA.__init__ = counting
from ema_callback.cli import main
code = main(sys.argv[1:])
print(f"ppdet ModelEMA objects built: {len(built)}")
sys.exit(code)
"""


def test_cycle_epoch_counts_epochs_and_ppdet_builds_no_model_ema_of_its_own(coco):
    """cycle_epoch 1 with snapshot_epoch 2: the EMA restarts at every epoch, not only at snapshots (ppdet's
    apply()); det-train never lets ppdet build its own ModelEMA (a full copy of the weights)."""
    cmd = [sys.executable, "-c", COUNT_MODEL_EMA, "det-train", "-c", TINY, "-o", "save_dir=output/cycle",
           "cycle_epoch=1", "snapshot_epoch=2"]
    done = subprocess.run(cmd, cwd=str(coco), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "ppdet ModelEMA objects built: 0" in log
    assert len(re.findall(r"EMA: cycle_epoch 1 reached after epoch (\d)", log)) == 2, log[-4000:]  # epochs 1, 2
    for name in ("1", "model_final"):  # 4 updates an epoch: each saved state holds one epoch since its restart
        state = read_state(str(coco / "output" / "cycle" / f"{name}.pdema"), key="ema_callback_state")
        assert state["ema_callback_state"]["num_updates"] == 4, name


@pytest.mark.distributed
@pytest.mark.xdist_group("launch")  # 2-process launches one at a time
def test_two_process_det_train_keeps_equal_shadows_with_cycle_epoch(coco, tmp_path):
    """2 CPU ranks, cycle_epoch 1, snapshot_epoch 2: every rank restarts its EMA at the same epochs (ppdet's own
    restart runs on rank 0 only), so the shadows stay identical."""
    script = os.path.join(REPO, "ema_callback", "integrations", "launch_det.py")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), script, "-c", TINY, "-o", "save_dir=output/dist", "cycle_epoch=1", "snapshot_epoch=2"]
    done = subprocess.run(cmd, cwd=str(coco), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    logs = {r: open(tmp_path / "log" / f"workerlog.{r}").read() for r in (0, 1)}
    assert done.returncode == 0, done.stdout[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    finals = {r: re.findall(r"EMA: finished: optimizer step (\d+), .* shadow sha1 (\w+) \(rank (\d)\)", logs[r])
              for r in (0, 1)}
    (steps0, sha0, rank0), (steps1, sha1, rank1) = finals[0][-1], finals[1][-1]
    assert (rank0, rank1) == ("0", "1") and steps0 == steps1 and sha0 == sha1
    assert all(len(re.findall(r"EMA: cycle_epoch 1 reached after epoch", logs[r])) == 2 for r in (0, 1))


def test_use_cot_and_ssod_configs_are_refused_not_silently_run_without_our_ema(coco):
    rc, log = det_train(str(coco), "-o", "use_cot=true")
    assert rc == 2 and log.strip().splitlines()[-1].startswith(
        "ema-callback: error: use_cot: True trains through ppdet's own semi-supervised or co-tuning trainer")


def test_ppdet_threshold_debias_approximation_differs_from_the_exact_one(picodet):
    """ppdet's threshold EMA starts from zeros and divides by 1 - d_last**step; the exact zero-debias divides by
    1 - prod(d_i). After 16 updates of threshold 0.99 the two differ by the relative amount README quotes."""
    ema_module, _, _ = ppdet()
    rng = np.random.default_rng(0)
    theirs = ema_module.ModelEMA(picodet, decay=0.99, ema_decay_type="threshold")
    ours = ExponentialMovingAverage(picodet, EMAConfig(decay=0.99, schedule="threshold", bias_correction=True))
    exact = {k: np.zeros_like(v.numpy(), dtype=np.float64) for k, v in picodet.state_dict().items()
             if v.dtype == paddle.float32}
    product = 1.0
    for t in range(16):
        perturb(picodet, rng)
        theirs.update()
        ours.step()
        d = min(0.99, (1 + t) / (10 + t))
        product *= d
        live = picodet.state_dict()
        for k in exact:
            exact[k] = d * exact[k] + (1 - d) * live[k].numpy().astype(np.float64)
    exact = {k: v / (1 - product) for k, v in exact.items()}
    got, expected = ours.ema_state_dict(picodet), {k: v.numpy() for k, v in theirs.apply().items()}

    def relative(a):
        return float(np.sqrt(sum(np.sum((a[k] - exact[k]) ** 2) for k in exact)) /
                     np.sqrt(sum(np.sum(exact[k] ** 2) for k in exact)))
    assert relative(got) < 1e-6  # ours is the exact zero-debias
    print(f"ppdet threshold 0.99, 16 updates: relative difference from the exact EMA {relative(expected):.2e}")
    assert 1e-4 < relative(expected) < 5e-3


def test_det_train_messages(coco, tmp_path):
    # --help shows ppdet's own arguments after ours
    cmd = [sys.executable, "-m", "ema_callback.cli", "det-train", "--help"]
    done = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert done.returncode == 0 and "--ema-config" in done.stdout and "ppdet's own arguments" in done.stdout
    assert all(flag in done.stdout.split("), passed through:")[1] for flag in ("--eval", "--resume", "--amp"))
    # a mistyped ppdet argument: ppdet's argparse line, then ours saying where it came from
    rc, log = det_train(str(coco), "--evl")
    assert rc == 2 and "unrecognized arguments: --evl" in log and log.strip().splitlines()[-1] == (
        "ema-callback det-train: the error above is from PaddleDetection's tools/train.py argument parser; "
        "`ema-callback det-train --help` lists its arguments")
    # an overlay whose relative _BASE_ does not resolve from where it is
    moved = tmp_path / "picodet_s_416_ema.yml"
    moved.write_text("_BASE_: ['../../configs/picodet/picodet_s_416_coco_lcnet.yml']\nEMA:\n  decay: 0.9998\n")
    cmd = [sys.executable, "-m", "ema_callback.cli", "det-train", "-c", str(moved)]
    done = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith(f"ema-callback: error: {moved}: _BASE_ entry ") and \
        "_BASE_ paths are relative to the file that names them" in last, last
    # a lowercase section
    lower = tmp_path / "lower.yml"
    lower.write_text(f"_BASE_: ['{TINY}']\nema:\n  decay: 0.9\n")
    cmd = [sys.executable, "-m", "ema_callback.cli", "det-train", "-c", str(lower)]
    done = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        f"ema-callback: error: {lower}: top-level 'ema:' is not read; the section is 'EMA:' (upper case)"


def test_merge_into_a_ppdet_config_with_its_own_ema_turns_that_off(tmp_path):
    from ema_callback.integrations.paddledet import load_ppdet_yaml, resolve_det_config
    suite = os.path.join(PADDLEDET_ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_80e_coco.yml")  # use_ema in _BASE_
    out = tmp_path / "ppyoloe_plus_crn_s_80e_coco.yml"  # beside nothing: its _BASE_ must still resolve
    overlay = tmp_path / "overlay.yml"
    overlay.write_text(f"_BASE_: ['{suite}']\n")
    cmd = [sys.executable, "-m", "ema_callback.cli", "merge-config", str(overlay),
           os.path.join(REPO, "configs", "ema", "ppdet_threshold.yml"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode == 0, done.stderr
    assert f"merge-config: set use_ema: false in {out}" in done.stdout
    merged = load_ppdet_yaml(str(out))
    assert merged["use_ema"] is False
    ema, _ = resolve_det_config(merged, None, [])  # what det-train does with it: no "both set" refusal
    assert ema.enable


BLOCKS = sorted(glob.glob(os.path.join(REPO, "configs", "ppdet", "ema_*.yml")))


@pytest.mark.parametrize("block", BLOCKS, ids=os.path.basename)
def test_shipped_blocks_apply_to_the_users_own_config_in_their_checkout(block, caplog):
    """Issue 19.11: the ppdet recipes are EMA: blocks for --ema-config on the user's own config (use_ema: true
    there): ours replaces ppdet's EMA and one line names the keys it replaced."""
    from ema_callback.integrations.paddledet import load_ppdet_yaml, resolve_det_config
    text = open(block).read()
    named = re.search(r"PaddleDetection's (configs/\S+\.yml)", text).group(1)
    suite = load_ppdet_yaml(os.path.join(PADDLEDET_ROOT, named))
    assert suite["use_ema"] is True and "architecture" in suite
    with caplog.at_level("INFO", logger="ema_callback"):
        ema, extra = resolve_det_config(suite, block, [])
    assert ema.enable and ema.decay == 0.9998 and extra["cycle_epoch"] == -1
    assert "EMA: the --ema-config block replaces PaddleDetection's own EMA: use_ema: True" in \
        caplog.text


def test_flat_use_ema_config_runs_on_our_engine_with_the_ppdet_black_list():
    from ema_callback.integrations.paddledet import load_ppdet_yaml, resolve_det_config
    cfg = load_ppdet_yaml(os.path.join(PADDLEDET_ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_80e_coco.yml"))
    ema, _ = resolve_det_config(cfg, None, [])
    assert (ema.decay, ema.schedule, ema.exclude) == (0.9998, "threshold", [re.escape("proj_conv.weight")])


def test_det_select_best_keeps_the_raw_weights_when_they_win(coco):
    """40 epochs from scratch: an EMA of horizon 1e5 steps stays at the random start (mAP 0), the raw weights detect
    a little. select: best takes raw when it leads by more than 2 standard errors of the difference (ppdet's mAP has
    no per-image units: the two candidates' validation noise over the last quarter, combined), checked here against
    the candidates table's own figures with numpy; the files then hold the winner and ppdet's own eval.py reproduces
    the logged mAP. (ppdet's CPU training is not bit-reproducible from run to run, so how far raw leads varies.)"""
    cwd = str(coco)
    rc, log = det_train(cwd, "--eval", "-o", "save_dir=output/select", "epoch=40", "snapshot_epoch=4",
                        "EMA.decays=[0.99999]", "EMA.schedule=constant", "EMA.eval_raw=true", "EMA.select=best")
    assert rc == 0, log[-4000:]
    assert "EMA: global batch 4 (4 x 1 rank x 1), decay 0.99999 per optimizer step" in log
    picked = re.search(r"EMA: bbox_mAP at optimizer step 160: raw ([\d.e-]+), ema 0 \(select: best -> (raw|ema)\)", log)
    assert picked and float(picked.group(1)) > 0, log[-4000:]
    out = coco / "output" / "select"
    table = json.load(open(out / "ema_candidates.json"))
    rows = {r["candidate"]: r for r in table["candidates"]}
    assert rows["raw"]["final"] == pytest.approx(float(picked.group(1)), rel=1e-5) and rows["ema"]["final"] == 0
    # the pick at step 160 judges the lead by the raw weights' noise over the evaluations before it (the EMA's is
    # 0): residuals around a line through those of the last quarter (after 3/4 of step 144), ddof 2, with numpy
    before = [(int(st), float(v)) for st, v in re.findall(r"bbox_mAP at optimizer step (\d+): raw ([\d.e-]+), ema 0",
                                                          log) if int(st) < 160]
    tail = [(st, v) for st, v in before if st > 0.75 * before[-1][0]]
    x, y = np.array([t[0] for t in tail], float), np.array([t[1] for t in tail], float)
    se = float(np.sqrt(np.sum((y - np.polyval(np.polyfit(x, y, 1), x)) ** 2) / (len(tail) - 2)))
    lead = float(picked.group(1))
    winner = "raw" if se > 0 and lead > 2 * se else "ema"
    assert picked.group(2) == winner, (lead, se, picked.group(0))
    final_se = float(np.hypot(rows["raw"]["noise"] or 0.0, rows["ema"]["noise"] or 0.0))  # the table: step 160 too
    assert table["recommended"] == ("raw" if final_se > 0 and lead > 2 * final_se else "ema")
    # best_model: ppdet's Checkpointer keeps the last evaluation whose logged (selected) mAP is the highest (>=)
    evals = [(int(step), float(raw) if chosen == "raw" else 0.0, chosen) for step, raw, chosen in re.findall(
        r"EMA: bbox_mAP at optimizer step (\d+): raw ([\d.e-]+), ema 0 \(select: best -> (raw|ema)\)", log)]
    top = max(value for _, value, _ in evals)
    step, value, held = [e for e in evals if e[1] == top][-1]
    state = read_state(str(out / "best_model.pdema"), key="ema_callback_state")
    assert state["ema_callback_state"]["pdparams_hold"] == held, (evals, state["ema_callback_state"]["pdparams_hold"])
    best = paddle.load(str(out / "best_model.pdparams"), return_numpy=True)
    if held == "raw" and step == 160:
        raw = read_state(str(out / "model_final.pdema"), key="ema_callback_state")
        assert all(np.array_equal(best[k], raw[k]) for k in best)  # best_model = the raw weights at the end
    rc, eval_log = ppdet_tool(cwd, "eval.py", "-o", f"weights={out}/best_model")
    assert rc == 0, eval_log[-4000:]
    assert float(re.findall(AP, eval_log)[-1]) == round(value, 3)


def test_posthoc_sweep_through_ppdet_eval(coco, tmp_path):
    cwd = str(coco)
    rc, log = det_train(cwd, "-o", "save_dir=output/posthoc",
                        "EMA.posthoc={'sigma_rels': [0.05, 0.1], 'snapshot_every': 4, 'snapshot_dtype': 'float32'}")
    assert rc == 0, log[-4000:]
    folder = coco / "output" / "posthoc" / "posthoc"
    assert sorted(os.listdir(folder)) == [f"phema-{s:09d}.safetensors" for s in (4, 8, 12)]
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ema_callback.cli", "posthoc", "sweep", "--snapshots", str(folder),
           "--sigma-rel", "0.05,0.1", "--out", str(out), "--paddledet-root", PADDLEDET_ROOT, "-c", TINY]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    table = json.load(open(out / "sweep.json"))
    assert table["metric"] == "bbox_mAP" and [r["sigma_rel"] for r in table["rows"]] == [0.05, 0.1]
    assert (out / "sweep.png").exists() and "3 snapshots" in done.stdout
    rc, eval_log = ppdet_tool(cwd, "eval.py", "-o", f"weights={out}/best")
    assert rc == 0, eval_log[-4000:]
    assert float(re.findall(AP, eval_log)[-1]) == table["best"]["metric"]


def test_merge_config_elsewhere_rewrites_a_relative_base_and_says_what_det_train_does(tmp_path):
    """Issue 25.5: the merged file kept ppdet's relative _BASE_ ('../datasets/coco_detection.yml') without a word, so
    det-train failed on it from another folder; and the note said det-train refuses both EMAs (it replaces ppdet's)."""
    from ema_callback.integrations.paddledet import load_ppdet_yaml, resolve_det_config
    suite = os.path.join(PADDLEDET_ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_80e_coco.yml")
    out = tmp_path / "other" / "merged.yml"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "ema_callback.cli", "merge-config", suite, "ppdet_threshold", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode == 0, done.stderr
    notes = done.stdout.splitlines()
    assert notes[0] == (f"merge-config: set use_ema: false in {out} (use_ema: true in {suite} or its _BASE_): the "
                        "EMA: section replaces ppdet's own EMA, as det-train does with such a config; the file now "
                        "says so (ppdet's own tools/train.py runs it with no EMA)")
    moved = os.path.relpath(os.path.join(PADDLEDET_ROOT, "configs", "datasets", "coco_detection.yml"), out.parent)
    assert notes[1] == (f"merge-config: rewrote _BASE_ relative to {out.parent} (ppdet reads it from the folder of "
                        f"the file that names it): ../datasets/coco_detection.yml -> {moved} and 4 more")
    merged, original = load_ppdet_yaml(str(out)), load_ppdet_yaml(suite)  # every _BASE_ resolves from there
    assert merged["use_ema"] is False and merged["EMA"]["decay"] == 0.9998
    assert {k: v for k, v in merged.items() if k not in ("use_ema", "EMA")} == \
        {k: v for k, v in original.items() if k != "use_ema"}
    assert resolve_det_config(merged, None, [])[0].enable
    (tmp_path / "base.yml").write_text("epoch: 3\n")  # written beside the suite: nothing to rewrite
    (tmp_path / "suite.yml").write_text("_BASE_: ['base.yml']\nsnapshot_epoch: 1\n")
    cmd = [sys.executable, "-m", "ema_callback.cli", "merge-config", str(tmp_path / "suite.yml"), "ppdet_threshold",
           "-o", str(tmp_path / "beside.yml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode == 0 and done.stdout == f"wrote {tmp_path / 'beside.yml'}\n", done.stdout + done.stderr
    assert (tmp_path / "beside.yml").read_text().startswith("_BASE_: ['base.yml']\nsnapshot_epoch: 1\n")



@pytest.mark.parametrize("suffix", [".pdema", ".pdopt"])
def test_det_train_refuses_a_crafted_resume_file_before_ppdet_loads_it(coco, tmp_path, suffix):
    """ppdet's checkpoint.py calls paddle.load on X.pdema and X.pdopt (which runs any code a file names) before our
    resume sees them: det-train reads the whole -r set with the checked reader first (issue 24.7)."""
    import pickle

    cwd = str(coco)
    rc, log = det_train(cwd, "-o", "save_dir=output/crafted", "epoch=1")
    assert rc == 0, log[-4000:]
    marker = tmp_path / "pwned"
    with open(coco / "output" / "crafted" / f"model_final{suffix}", "wb") as handle:
        pickle.dump({"x": RunsCode(marker)}, handle)
    rc, log = det_train(cwd, "-r", "output/crafted/model_final", "-o", "save_dir=output/crafted2")
    last = log.strip().splitlines()[-1]
    assert rc == 2 and last == (f"ema-callback: error: -r: output/crafted/model_final{suffix}: refused to load: it "
                                "names the global posix.system, which a file of weights never needs (loading it "
                                "would run code); nothing of it was executed"), log[-3000:]
    assert not marker.exists() and not (coco / "output" / "crafted2").exists()


def test_det_length_auto_saves_the_pick_as_best_model_and_model_final(coco):
    """No length stated (issue 26): the pick through ppdet's own evaluation (mAP: the noise over lengths is the
    uncertainty), written as best_model and model_final; ppdet's eval.py scores best_model as logged."""
    cwd = str(coco)
    rc, log = det_train(cwd, "--eval", "-o", "save_dir=output/auto", "epoch=8", "snapshot_epoch=2",
                        "EMA.decay=null", "EMA.eval_raw=true")
    assert rc == 0, log[-4000:]
    assert "length auto: the default length, half-life" in log and "EMA: length auto picked" in log, log[-4000:]
    out = coco / "output" / "auto"
    auto = json.load(open(out / "ema_auto.json"))
    assert auto["metric"] == "bbox_mAP" and len(auto["rows"]) <= 10
    best = paddle.load(str(out / "best_model.pdparams"), return_numpy=True)
    final = paddle.load(str(out / "model_final.pdparams"), return_numpy=True)
    assert all(np.array_equal(best[k], final[k]) for k in best)
    state = read_state(str(out / "best_model.pdema"), key="ema_callback_state")
    assert state["ema_callback_state"]["pdparams_hold"] == auto["label"]
    picked = next(r["value"] for r in auto["rows"] if r["candidate"] == auto["label"])
    rc, eval_log = ppdet_tool(cwd, "eval.py", "-o", f"weights={out}/best_model")
    assert rc == 0, eval_log[-4000:]
    assert float(re.findall(AP, eval_log)[-1]) == round(picked, 3)


def test_a_black_list_entry_in_no_tensor_name_is_refused_naming_ppdets_key(coco, tmp_path):
    """ppdet's flat keys: an ``ema_black_list`` entry that is in no tensor name (ppdet's ModelEMA ignores it; here it
    would silently average what the user meant to leave out) is refused at start-up, naming ``ema_black_list``."""
    flat = tmp_path / "flat.yml"
    text = open(TINY).read().replace("use_ema: false", "use_ema: true\nema_black_list: ['head.no_such_layer']")
    flat.write_text(re.sub(r"\nEMA:\n  decay: 0.9\n  schedule: threshold\n", "\n", text))
    cmd = [sys.executable, "-m", "ema_callback.cli", "det-train", "-c", str(flat), "-o", "save_dir=output/black"]
    done = subprocess.run(cmd, cwd=str(coco), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "ema-callback: error: ema_black_list: 'head.no_such_layer' is in no tensor name of the model (names like ")
    assert not (coco / "output" / "black" / "0.pdparams").exists()
