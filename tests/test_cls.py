"""PaddleClas's own tools/train.py loop and Engine with EMA (``ema-callback cls-train``), end to end on a synthetic
image folder (CPU): MobileNetV3_small_x0_35 from PaddleClas's upstream config, shrunk to 32x32 images."""
import glob
import hashlib
import os
import re
import sys

import numpy as np
import paddle
import pytest
import yaml
from cls_helpers import CLS_CFG, cls_train, data_overrides, eval_lines, paddleclas_tool, run, write_cls_dataset
from conftest import PADDLECLAS_ROOT, needs_paddleclas

from ema_callback.config.schema import EMAConfigError
from ema_callback.integrations.paddleclas import resolve_cls_config


def end_to_end(test):
    """A run of PaddleClas's checkout: slow, on the module's one xdist worker, skipped loudly without a checkout."""
    return pytest.mark.slow(pytest.mark.xdist_group("paddleclas")(needs_paddleclas(test)))


def load(path):
    return {k: np.asarray(v) for k, v in paddle.load(path, return_numpy=True).items() if not isinstance(v, dict)}


def same_tensors(a, b):
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def file_hashes(folder):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True, include_hidden=True)):
        if os.path.isfile(path) and not path.endswith(".log"):
            out[os.path.relpath(path, folder)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ the EMA: block
def test_native_decay_is_constant_and_our_keys_are_checked():
    assert resolve_cls_config({"EMA": {"decay": 0.9995}}, None, []).effective_schedule == "constant"
    config = resolve_cls_config({"EMA": {"decay": 0.9995}}, None, [])
    assert not config.effective_bias_correction and config.eval_raw  # PaddleClas's loop always evaluates raw
    warm = resolve_cls_config({"EMA": {"decay": 0.9995, "schedule": "threshold", "bias_correction": True}}, None, [])
    assert warm.effective_schedule == "threshold" and warm.effective_bias_correction
    with pytest.raises(EMAConfigError, match="decya"):
        resolve_cls_config({"EMA": {"decya": 0.99}}, None, [])
    assert resolve_cls_config({"EMA": {}}, None, []).auto  # ema-callback's rule: no length stated -> length auto
    from ema_callback.config.files import split_overrides

    by_option = resolve_cls_config({}, None, split_overrides(["EMA.decay=0.99"])[0])
    assert by_option.effective_schedule == "constant" and by_option.decay == 0.99  # -o EMA.decay: the same meaning
    with pytest.raises(EMAConfigError, match="save_as"):
        resolve_cls_config({"EMA": {"decay": 0.99, "save_as": "raw"}}, None, [])
    assert not resolve_cls_config({"EMA": {"decay": 0.99, "enable": False}}, None, []).enable
    # the raw weights are always a candidate: select: best with one EMA chooses between the two
    assert resolve_cls_config({"EMA": {"decay": 0.99, "select": "best"}}, None, []).select == "best"
    with pytest.raises(EMAConfigError, match=r"^EMA.eval_raw: false cannot act in cls-train"):
        resolve_cls_config({"EMA": {"decay": 0.99, "eval_raw": False}}, None, [])
    with pytest.raises(EMAConfigError, match=r"^EMA.tau: a parameter of schedule: exponential; in cls-train a decay "
                                             r"without a schedule is PaddleClas's constant decay"):
        resolve_cls_config({"EMA": {"decay": 0.99, "tau": 100}}, None, [])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls_data")
    write_cls_dataset(str(root / "train"), 16, seed=1)
    write_cls_dataset(str(root / "val"), 8, seed=2)
    return str(root)


@pytest.fixture(scope="module")
def no_ema_cfg(tmp_path_factory):
    """The same config without its EMA: section (what PaddleClas trains without any EMA)."""
    with open(CLS_CFG) as handle:
        cfg = yaml.safe_load(handle)
    cfg.pop("EMA")
    path = tmp_path_factory.mktemp("cls_cfg") / "no_ema.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def ema_run(data, tmp_path_factory):
    """cls-train with the config's native EMA: {decay: 0.9}, 3 epochs (24 optimizer steps)."""
    out = str(tmp_path_factory.mktemp("cls") / "ema")
    rc, log = cls_train(out, data)
    assert rc == 0, log[-4000:]
    return out, log


@end_to_end
def test_disabled_ema_is_bit_identical_to_paddleclas_own_run(tmp_path, data, no_ema_cfg):
    rc, log = cls_train(str(tmp_path / "own"), data, cfg=no_ema_cfg, launcher=False)
    assert rc == 0, log[-4000:]
    rc, log = cls_train(str(tmp_path / "off"), data, ["EMA.enable=false"])
    assert rc == 0, log[-4000:]
    assert "EMA: off for this run (-o EMA.enable=false)" in log
    own, off = file_hashes(str(tmp_path / "own")), file_hashes(str(tmp_path / "off"))
    assert "latest.pdparams" in own and not any(name.endswith(".pdema") for name in off)
    assert own == off  # every file, hidden ones too, byte for byte (PaddleClas's own EMA is not built either)


@end_to_end
def test_ema_matches_paddleclas_own_ema_and_raw_weights_are_untouched(tmp_path, data, ema_run):
    """PaddleClas's own EMA (ppcls/utils/ema.py, its decay constant) is the independent reference: its .pdparams
    and ours agree to float32 rounding, its raw weights (.pdema) and ours are bit-identical, and so is every metric
    PaddleClas logged."""
    out, log = ema_run
    rc, own_log = cls_train(str(tmp_path / "own"), data, launcher=False)
    assert rc == 0, own_log[-4000:]
    ours, theirs = load(f"{out}/latest.pdparams"), load(f"{tmp_path}/own/latest.pdparams")
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == np.float32 for k in ours)
    assert all(np.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6) for k in ours)
    raw = load(f"{out}/latest.pdema")
    assert same_tensors(raw, load(f"{tmp_path}/own/latest.pdema"))
    assert any(not np.array_equal(raw[k], ours[k]) for k in ours)  # the EMA is not the raw weights
    assert eval_lines(log) == eval_lines(own_log)


@end_to_end
def test_raw_and_ema_side_by_side_and_eval_reproduces_best_model(tmp_path, data, ema_run):
    out, log = ema_run
    lines = eval_lines(log)
    assert [epoch for epoch, _ in lines] == [1, 1, 2, 2, 3, 3]  # PaddleClas's raw evaluation, then the EMA's
    compared = re.findall(r"EMA: top1 at optimizer step (\d+): raw ([\d.e-]+), ema ([\d.e-]+)", log)
    assert [int(step) for step, _, _ in compared] == [8, 16, 24]
    for (step, raw, ema), epoch in zip(compared, (1, 2, 3)):
        raw_line, ema_line = [m for e, m in lines if e == epoch]
        assert float(raw) == pytest.approx(raw_line["top1"], abs=5e-6)
        assert float(ema) == pytest.approx(ema_line["top1"], abs=5e-6)
    saved = re.findall(r"EMA: saved \S+/best_model \(best_model.pdparams hold (\w+), top1 [\d.e-]+ at epoch (\d)",
                       log)
    label, epoch = saved[-1]
    assert label == "ema"
    with open(f"{out}/train.log") as handle:  # PaddleClas's own log names the candidate before its [Avg] line
        assert len(re.findall(r"the next evaluation is ema-callback's candidate ema \(", handle.read())) == 3
    logged = [m for e, m in lines if e == int(epoch)][1]
    rc, eval_log = paddleclas_tool("eval.py", data, [f"Global.pretrained_model={out}/best_model"], str(tmp_path))
    assert rc == 0, eval_log[-4000:]
    assert eval_lines(eval_log)[-1][1] == logged  # PaddleClas's own eval of best_model: the logged EMA line
    assert same_tensors(load(f"{out}/best_model.pdparams"), load(f"{out}/best_model/model.pdparams"))


@end_to_end
def test_resume_is_exact(tmp_path, data, ema_run):
    out, _ = ema_run
    resumed = str(tmp_path / "resumed")
    rc, log = cls_train(resumed, data, [f"Global.checkpoints={out}/epoch_2"])
    assert rc == 0, log[-4000:]
    assert re.search(r"EMA: resumed from \S+epoch_2.pdema at optimizer step 16 \(16 updates\)", log), log[-3000:]
    assert same_tensors(load(f"{resumed}/latest.pdparams"), load(f"{out}/latest.pdparams"))  # the EMA
    assert same_tensors(load(f"{resumed}/latest.pdema"), load(f"{out}/latest.pdema"))  # the raw weights
    ours = paddle.load(f"{resumed}/latest.pdema", return_numpy=True)["ema_callback_state"]
    theirs = paddle.load(f"{out}/latest.pdema", return_numpy=True)["ema_callback_state"]
    assert ours["num_updates"] == theirs["num_updates"] == 24


@end_to_end
def test_paddleclas_own_tools_use_the_files(tmp_path, data, ema_run):
    """PaddleClas's own export_model.py exports best_model's EMA weights, and its own tools/train.py resumes from our
    set: raw weights from the .pdema (our state rides beside them), its EMA from the .pdparams."""
    out, log = ema_run
    assert ".ema-staging" not in log  # PaddleClas's own 'Already save model in ...' names the final folder
    rc, export_log = paddleclas_tool("export_model.py", data, [f"Global.pretrained_model={out}/best_model",
                                                               f"Global.save_inference_dir={tmp_path}/inference"],
                                      str(tmp_path))
    assert rc == 0, export_log[-4000:]
    digest = lambda a: hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()  # noqa: E731
    exported = [digest(v.numpy()) for v in paddle.jit.load(f"{tmp_path}/inference/inference").state_dict().values()]
    ema = {digest(v) for v in load(f"{out}/best_model.pdparams").values()}
    raw = {digest(v) for v in load(f"{out}/best_model.pdema").values()}
    assert len(exported) == len(ema) > 100 and all(h in ema for h in exported) and not any(h in raw for h in exported)
    rc, own_log = cls_train(str(tmp_path / "own_resume"), data, [f"Global.checkpoints={out}/epoch_2"], launcher=False)
    assert rc == 0, own_log[-4000:]
    assert same_tensors(load(f"{tmp_path}/own_resume/latest.pdema"), load(f"{out}/latest.pdema"))
    theirs, ours = load(f"{tmp_path}/own_resume/latest.pdparams"), load(f"{out}/latest.pdparams")
    assert all(np.allclose(theirs[k], ours[k], rtol=1e-5, atol=1e-6) for k in ours)  # same constant decay


@end_to_end
def test_before_eval_start_step_best_model_holds_the_raw_weights(tmp_path, data):
    out = str(tmp_path / "raw_best")
    rc, log = cls_train(out, data, ["Global.epochs=1", "EMA.eval_start_step=1000"])
    assert rc == 0, log[-4000:]
    assert "EMA: evaluating raw weights until optimizer step 1000 (eval_start_step)" in log
    assert "best_model.pdparams hold raw" in log
    raw = load(f"{out}/best_model.pdema")
    held = load(f"{out}/best_model.pdparams")
    assert same_tensors(held, {k: raw[k] for k in held})
    assert same_tensors(load(f"{out}/best_model/model.pdparams"), held)


@end_to_end
def test_start_files_are_read_safely_before_paddleclas_unpickles_them(tmp_path, data):
    import pickle

    from conftest import RunsCode

    marker = tmp_path / "ran"
    (tmp_path / "ckpt.pdparams").write_bytes(pickle.dumps({"w": RunsCode(str(marker))}))
    rc, log = cls_train(str(tmp_path / "out"), data, [f"Global.checkpoints={tmp_path}/ckpt"])
    assert rc == 2 and not marker.exists()
    assert log.strip().splitlines()[-1].startswith(f"ema-callback: error: Global.checkpoints: {tmp_path}/ckpt.pdparams")


def test_cls_train_command_line():
    import subprocess
    import sys

    from cls_helpers import REPO

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "ema_callback.cli", *args], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
        return done.returncode, done.stdout, done.stderr

    rc, out, _ = cli("script-path", "cls")
    assert rc == 0 and out.strip().endswith("launch_cls.py") and os.path.isfile(out.strip())
    rc, out, _ = cli("cls-train", "--help")
    assert rc == 0 and "--paddleclas-root" in out
    rc, out, _ = cli("--help")
    assert "cls-train -c cfg.yaml" in out
    rc, _, err = cli("cls-train", "-c", CLS_CFG, "--paddleclas-root", "/nonexistent")
    assert rc == 2 and err.strip() == "ema-callback: error: --paddleclas-root /nonexistent: no such folder"


@end_to_end
def test_resume_with_ema_off_trains_on_from_the_raw_weights(tmp_path, data, ema_run):
    """PaddleClas alone would load the EMA weights of epoch_2.pdparams as the weights to train on; with
    EMA.enable=false cls-train puts the raw ones back from the .pdema, so the run ends on the raw weights of the
    uninterrupted EMA run (the EMA never changes the raw weights), bit for bit."""
    out, _ = ema_run
    off = str(tmp_path / "off")
    rc, log = cls_train(off, data, [f"Global.checkpoints={out}/epoch_2", "EMA.enable=false"])
    assert rc == 0, log[-4000:]
    assert "training continues from the raw weights in" in log
    raw = load(f"{out}/latest.pdema")
    mine = load(f"{off}/latest.pdparams")
    assert same_tensors(mine, {k: raw[k] for k in mine})
    assert not os.path.exists(f"{off}/latest.pdema")


@end_to_end
@pytest.mark.distributed
@pytest.mark.xdist_group("launch")  # 2-process launches one at a time
def test_two_process_cls_train_keeps_equal_shadows(tmp_path, data):
    """2 CPU ranks through the script form (``ema-callback script-path cls``): the global batch counts both ranks and
    the shadows stay identical. Without evaluation: PaddleClas's own evaluation with 2 ranks on CPU stops in
    ``paddle.distributed.ParallelEnv().device_id`` (classification.py, line 76), with or without cls-train."""
    import subprocess
    import sys

    from cls_helpers import REPO, TIMEOUT, data_overrides, each_o, env

    script = os.path.join(REPO, "ema_callback", "integrations", "launch_cls.py")
    out = str(tmp_path / "dist")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), script, "-c", CLS_CFG,
           *each_o([f"Global.output_dir={out}/", "Global.eval_during_train=False"] + data_overrides(data))]
    done = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=TIMEOUT, env=env())
    logs = {r: open(tmp_path / "log" / f"workerlog.{r}").read() for r in (0, 1)}
    assert done.returncode == 0, done.stdout[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    assert "EMA: global batch 16 (8 x 2 ranks x 1)" in logs[0]
    finals = [re.findall(r"EMA: finished: optimizer step (\d+), .* shadow sha1 (\w+) \(rank (\d)\)", logs[r])[-1]
              for r in (0, 1)]
    assert finals[0][0] == finals[1][0] == "12" and finals[0][1] == finals[1][1]
    state = paddle.load(f"{out}/latest.pdema", return_numpy=True)["ema_callback_state"]
    assert state["num_updates"] == 12


@end_to_end
@pytest.mark.gpu
def test_amp_o2_shadow_is_float32(tmp_path, data):
    """Needs a GPU (benchmarks/gpu_check.sh): on CPU, Paddle's paddle.amp.decorate(level='O2') leaves the
    parameters float32, so there is no float16 network to average. Under O2 PaddleClas's own EMA is a copy of the
    float16 network; ours is float32 (not all of it representable in float16) and its .pdparams are float32."""
    opts = ["Global.device=gpu", "AMP.use_amp=True", "AMP.level=O2", "EMA.decay=0.999"]
    out = str(tmp_path / "amp")
    rc, log = cls_train(out, data, opts)
    assert rc == 0, log[-4000:]
    ours = {k: v for k, v in load(f"{out}/latest.pdparams").items() if v.dtype.kind == "f"}
    assert all(v.dtype == np.float32 for v in ours.values())
    assert any(not np.array_equal(v.astype(np.float16).astype(np.float32), v) for v in ours.values())


@end_to_end
def test_length_auto_picks_through_paddleclas_eval_and_saves_the_pick(tmp_path, data):
    """``EMA: {}`` (no length): ema-callback's length auto; the candidates go through PaddleClas's own evaluation at
    the end, and best_model and latest hold the pick, which PaddleClas's own tools/eval.py scores as logged."""
    import json

    with open(CLS_CFG) as handle:
        cfg = yaml.safe_load(handle)
    cfg["EMA"] = {}
    path = tmp_path / "auto.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = str(tmp_path / "auto")
    rc, log = cls_train(out, data, cfg=str(path))
    assert rc == 0, log[-4000:]
    picked = json.load(open(f"{out}/ema_auto.json"))
    assert len(picked["rows"]) >= 6 and picked["label"] in {row["candidate"] for row in picked["rows"]}
    assert picked["method"] == "paired bootstrap over 32 evaluation units"  # top-1 compared image by image
    assert f"EMA: length auto: {picked['label']} written as best_model and latest" in log
    best, latest = load(f"{out}/best_model.pdparams"), load(f"{out}/latest.pdparams")
    assert same_tensors(best, latest)
    state = paddle.load(f"{out}/best_model.pdema", return_numpy=True)["ema_callback_state"]
    assert state["pdparams_hold"] == picked["label"]
    rc, eval_log = paddleclas_tool("eval.py", data, [f"Global.pretrained_model={out}/best_model"], str(tmp_path),
                                   cfg=str(path))
    assert rc == 0, eval_log[-4000:]
    assert eval_lines(eval_log)[-1][1]["top1"] == pytest.approx(picked["value"], abs=5e-6)
    # posthoc sweep through PaddleClas's own tools/eval.py (its adapter): a length length auto evaluated at the
    # end is rebuilt from the same snapshots and scores as it did there
    row = next(r for r in picked["rows"] if r["candidate"] == "sigma0.06")
    cmd = [sys.executable, "-m", "ema_callback.cli", "posthoc", "sweep", "--paddleclas-root", PADDLECLAS_ROOT,
           "--snapshots", f"{out}/posthoc", "--sigma-rel", "0.06", "--out", str(tmp_path / "sweep"),
           "-c", str(path), "-o", *data_overrides(data), f"Global.output_dir={tmp_path}/sweep_eval/"]
    rc, sweep_log = run(cmd, str(tmp_path))
    assert rc == 0, sweep_log[-4000:]
    sweep = json.load(open(tmp_path / "sweep" / "sweep.json"))
    assert sweep["evaluation"] == "PaddleClas tools/eval.py" and sweep["metric"] == "top1"
    assert next(r["metric"] for r in sweep["rows"] if r["sigma_rel"] == 0.06) == pytest.approx(row["value"], abs=5e-6)


@needs_paddleclas
def test_a_dataset_path_that_does_not_exist_is_named_at_start_up(tmp_path, data):
    """PaddleClas opens its label files relative to the working directory; a wrong one stops cls-train before
    anything is built, in one line naming the key."""
    rc, log = cls_train(str(tmp_path / "out"), data, ["DataLoader.Train.dataset.cls_label_path=./nowhere/train.txt"])
    assert rc == 2
    assert log.strip().splitlines()[-1] == (
        f"ema-callback: error: DataLoader.Train.dataset.cls_label_path: ./nowhere/train.txt does not exist from the "
        f"working directory {tmp_path}; PaddleClas opens relative paths from there: run from the folder they are "
        f"relative to (PaddleClas's docs: its checkout, cd {PADDLECLAS_ROOT}) or give an absolute path")


@end_to_end
def test_resume_is_exact_with_warm_up_and_bias_correction(tmp_path, data):
    """Where PaddleClas's own resume (its EMA from the .pdparams) could not be exact: a decay that depends on the
    update count and a bias-corrected average need the count and the uncorrected shadow, which ride in the .pdema."""
    opts = ["EMA.schedule=threshold", "EMA.bias_correction=true"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    rc, log = cls_train(full, data, opts)
    assert rc == 0, log[-4000:]
    rc, log = cls_train(resumed, data, opts + [f"Global.checkpoints={full}/epoch_2"])
    assert rc == 0, log[-4000:]
    assert same_tensors(load(f"{resumed}/latest.pdparams"), load(f"{full}/latest.pdparams"))
    assert same_tensors(load(f"{resumed}/latest.pdema"), load(f"{full}/latest.pdema"))
    state = paddle.load(f"{full}/epoch_2.pdema", return_numpy=True)["ema_callback_state"]
    assert state["num_updates"] == 16 and state["config"]["bias_correction"] is True


@needs_paddleclas
def test_a_new_best_paddleclas_did_not_save_is_written_at_the_next_save(tmp_path):
    """The save seam over PaddleClas's own save_model: PaddleClas asks for best_model when the raw or its EMA metric
    is a new best, cls-train when the selected candidate's is. A request of PaddleClas's without a new best of ours
    writes nothing; a new best of ours PaddleClas did not ask for is written at its next save (latest)."""
    import sys

    from conftest import make_net

    from ema_callback.config.schema import EMAConfig
    from ema_callback.core.horizon import BatchInfo
    from ema_callback.integrations.paddleclas import ClsEMA, _staged_save_model

    sys.path.insert(0, PADDLECLAS_ROOT)
    try:
        import ppcls.utils.save_load as save_load
        from ppcls.utils.logger import init_logger
    finally:
        sys.path.remove(PADDLECLAS_ROOT)
    init_logger()  # as PaddleClas's Engine does first (to the console only)
    net = make_net(seed=3)
    optimizer = paddle.optimizer.Momentum(learning_rate=0.1, parameters=net.parameters())
    ema = ClsEMA(net, EMAConfig(decay=0.5, schedule="constant"), optimizer, BatchInfo(4), None, 1, str(tmp_path))
    try:
        rng = np.random.default_rng(0)
        for _ in range(3):
            x = paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32"))
            loss = net(x).mean()
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            ema.update(net)
        assert ema.engine.num_updates == 3
        save = _staged_save_model(save_load.save_model)
        out = str(tmp_path / "out")
        save(net, [optimizer], {"metric": 0.9, "epoch": 1}, out, ema=ema.module, prefix="best_model")
        assert not os.path.exists(f"{out}/best_model.pdparams")  # PaddleClas asked; no new best of ours
        ema._note_best("ema", 0.7, 2)  # the selected candidate's new best, below PaddleClas's raw best of 0.9
        save(net, [optimizer], {"metric": 0.3, "epoch": 2}, out, ema=ema.module, prefix="latest")
        averaged = ema.engine.ema_state_dict(net)
        for name in ("best_model", "latest", "best_model/model"):
            assert same_tensors(load(f"{out}/{name}.pdparams"), averaged), name
        assert paddle.load(f"{out}/best_model.pdstates") == {"metric": 0.7, "epoch": 2}
        raw = load(f"{out}/latest.pdema")
        assert same_tensors({k: raw[k] for k in averaged}, {k: v.numpy() for k, v in net.state_dict().items()})
    finally:
        ema.counter.close()
