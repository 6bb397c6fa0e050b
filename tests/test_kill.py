"""SIGKILL at random points, checkpoint writes included: nothing under a final name is ever corrupt, and resuming
from the newest complete set reaches the same EMA as a run that was never killed."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import kill_fit_script as script
import numpy as np
import paddle
import pytest
from conftest import needs_paddleocr

from ema_callback import EMACallback
from ema_callback.files.state_file import read_state

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = 20


def final_files(folder):
    return [p for p in glob.glob(os.path.join(folder, "*")) if os.path.isfile(p)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("straight"))
    callback = EMACallback(decay=0.9, final_weights="raw", posthoc=script.POSTHOC, save_dir=folder)
    script.fit(script.build(), callback, script.EPOCHS)
    state = callback.ema.state_dict()
    state["snapshots"] = snapshot_bytes(folder)
    return state


def snapshot_bytes(folder):
    from ema_callback.posthoc.snapshots import load_snapshots

    return {s.step: (s.profile(0).tobytes(), s.profile(1).tobytes())
            for s in load_snapshots(os.path.join(folder, "posthoc"))}


@pytest.mark.slow
def test_model_fit_survives_sigkill_anywhere(tmp_path, uninterrupted):
    rng = np.random.default_rng(2026)
    corrupt, resumed, report = 0, 0, []
    for kill in range(KILLS):
        folder = str(tmp_path / f"run{kill}")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "kill_fit_script.py"), folder],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait for the first checkpoint, then kill at a random point of the following epochs
        deadline = time.time() + 120
        while not glob.glob(os.path.join(folder, "0.pdema")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        for path in final_files(folder):  # every file under a final name loads
            try:
                paddle.load(path, return_numpy=True)
            except Exception:
                corrupt += 1
        complete = sorted(int(os.path.basename(p)[:-6]) for p in glob.glob(os.path.join(folder, "*.pdema"))
                          if os.path.basename(p)[:-6].isdigit())
        assert complete == list(range(len(complete))), complete  # no earlier set lost
        newest = complete[-1]
        for ext in (".pdparams", ".pdopt"):
            assert os.path.exists(os.path.join(folder, f"{newest}{ext}"))
        model = script.build()
        model.load(os.path.join(folder, str(newest)))
        callback = EMACallback(decay=0.9, resume=os.path.join(folder, str(newest)), final_weights="raw",
                               posthoc=script.POSTHOC, save_dir=folder)
        script.fit(model, callback, script.EPOCHS - newest - 1)
        state = callback.ema.state_dict()
        # the post-hoc series: a write cut by the kill left at most a temporary file; resumed, the series has every
        # step once, each snapshot as the uninterrupted run wrote it
        same = state["num_steps"] == uninterrupted["num_steps"] and all(
            state["shadow"][k].tobytes() == uninterrupted["shadow"][k].tobytes() for k in state["shadow"]) and \
            snapshot_bytes(folder) == uninterrupted["snapshots"]
        resumed += same
        report.append((newest, len(glob.glob(os.path.join(folder, ".ema-staging-*")))))
    print(f"\nkill points: {KILLS}, corrupt files: {corrupt}, exact resumes: {resumed}, "
          f"(newest complete epoch, staging folders left): {report}")
    assert corrupt == 0 and resumed == KILLS


def set_files(folder, prefix, extra=()):
    """The bytes of every file of the checkpoint set ``prefix`` in ``folder`` (absent files left out)."""
    names = [prefix + s for s in (".pdparams", ".pdopt", ".states", ".pdema")] + list(extra)
    return {n: open(os.path.join(folder, n), "rb").read() for n in names if os.path.isfile(os.path.join(folder, n))}


def leftovers(folder):
    """Staging folders holding anything (an empty one of a writer killed before its lock file is allowed)."""
    return [p for p in glob.glob(os.path.join(folder, ".ema-*")) if os.path.isdir(p) and os.listdir(p)]


def check_kill_points(kills, old_folder, prefix, extra=()):
    """Every copy, once recovered, holds the old or the new set whole, and a resume reads it back bit for bit:
    the checked reads of a resume pass and the .pdema's state equals the old or the new one."""
    from ema_callback.files.checkpoint_set import recover
    from ema_callback.integrations.checkpoints import check_checkpoint_files

    assert kills and not kills[-1]["killed"] and sum(k["killed"] for k in kills) >= 15, kills
    old, new = set_files(old_folder, prefix, extra), set_files(kills[-1]["folder"], prefix, extra)
    assert old.keys() == new.keys() and all(old[n] != new[n] for n in old if n.endswith((".pdparams", ".pdema")))
    states = {"old": read_state(os.path.join(old_folder, prefix + ".pdema")),
              "new": read_state(os.path.join(kills[-1]["folder"], prefix + ".pdema"))}
    outcomes = []
    for entry in kills:
        folder = entry["folder"]
        recover(folder)
        found = set_files(folder, prefix, extra)
        which = "old" if found == old else "new" if found == new else None
        assert which is not None, (entry["k"], sorted((n, n in old and found.get(n) == old[n]) for n in found))
        assert leftovers(folder) == [], entry["k"]
        for name in [prefix] + [e[:-len(".pdema")] for e in extra if e.endswith(".pdema")]:
            check_checkpoint_files(os.path.join(folder, name), (".pdparams", ".pdopt", ".states", ".pdema"), "resume")
        state = read_state(os.path.join(folder, prefix + ".pdema"))
        assert canonical(state) == canonical(states[which]), entry["k"]
        outcomes.append(which)
    first_new = outcomes.index("new")
    assert set(outcomes[first_new:]) == {"new"} and "old" in outcomes, outcomes
    return outcomes


def canonical(state):
    from ema_callback.files.state_file import payload_digest

    return payload_digest({k: v for k, v in state.items() if k != "digest"})


@pytest.mark.slow
def test_model_fit_save_killed_after_every_file_operation_leaves_the_old_or_the_new_set(tmp_path):
    """Model.save over an existing set (fit's ``final``), stopped after each of its file operations in turn:
    recovered, the folder holds the old or the new set whole, and a resume reads it back bit for bit."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "kill_points_fit_script.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kills = json.load(open(tmp_path / "kills.json"))
    outcomes = check_kill_points(kills, str(tmp_path / "old"), "final")
    print(f"\nModel.fit kill points: {len(kills)} ({outcomes.count('old')} old set, {outcomes.count('new')} new)")


@pytest.mark.slow
@needs_paddleocr
def test_paddleocr_saves_killed_after_every_file_operation_leave_the_old_or_the_new_set(tmp_path):
    """PaddleOCR's ``latest`` and ``best_accuracy`` (with ``best_model/model``) saved over the sets of an earlier
    run, each stopped after every one of its file operations: the old or the new set whole, read back exactly."""
    from ocr_helpers import REC_CFG, data_overrides, env, ocr_train

    from ema_callback.demo.text_lines import write_rec_dataset

    data = str(tmp_path / "data")
    write_rec_dataset(os.path.join(data, "rec_train"), 32, seed=1, min_len=1, max_len=3)
    write_rec_dataset(os.path.join(data, "rec_val"), 8, seed=2, min_len=1, max_len=3)
    out = str(tmp_path / "out")
    # 4 steps an epoch, an evaluation (and a best_accuracy save) every 2: the next run saves over these sets
    common = ["Train.loader.shuffle=false", "Global.eval_batch_step=[0,2]", "Global.save_epoch_step=1000",
              "Global.epoch_num=1", "EMA.decay=0.9"]
    rc, log = ocr_train(REC_CFG, out, data, "rec", [*common, "Global.epoch_num=2"])  # other weights than the next run
    assert rc == 0, log[-3000:]
    work = tmp_path / "kills"
    work.mkdir()
    opts = [f"Global.save_model_dir={out}/", *common] + data_overrides(data, "rec")
    done = subprocess.run([sys.executable, os.path.join(HERE, "kill_points_ocr_script.py"), str(work), "-c", REC_CFG,
                           "-o", *opts], cwd=str(tmp_path), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    kills = json.load(open(work / "kills.json"))
    report = []
    for prefix, extra in (("latest", ()), ("best_accuracy", ("best_model/model.pdparams", "best_model/model.pdopt",
                                                             "best_model/model.pdema"))):
        mine = [k for k in kills if k["prefix"] == prefix]
        outcomes = check_kill_points(mine, str(work / f"{prefix}-old"), prefix, extra)
        report.append(f"{prefix}: {len(mine)} kill points ({outcomes.count('old')} old set, "
                      f"{outcomes.count('new')} new)")
    # a real resume from a copy rolled forward after its commit
    rolled = next(k["folder"] for k in kills if k["prefix"] == "latest" and k["killed"]
                  and set_files(k["folder"], "latest") == set_files(kills[-1]["folder"] if kills[-1]["prefix"] ==
                                                                    "latest" else mine[-1]["folder"], "latest"))
    rc, log = ocr_train(REC_CFG, rolled, data, "rec", [*common[:-2], "Global.epoch_num=2",
                                                       f"Global.checkpoints={rolled}/latest"])
    assert rc == 0 and "EMA: resumed from" in log, log[-3000:]
    print("\nPaddleOCR kill points: " + "; ".join(report))


@pytest.mark.soak
@needs_paddleocr
def test_paddleocr_launcher_survives_sigkill_anywhere(tmp_path):
    """make soak: 20 kill points of ema-callback ocr-train (several minutes)."""
    from ocr_helpers import REC_CFG, env, ocr_train

    from ema_callback.demo.text_lines import write_rec_dataset

    data = str(tmp_path / "data")
    write_rec_dataset(os.path.join(data, "rec_train"), 128, seed=1, min_len=1, max_len=3)
    write_rec_dataset(os.path.join(data, "rec_val"), 16, seed=2, min_len=1, max_len=3)
    common = ["Train.loader.shuffle=false", "Global.eval_batch_step=[0,8]", "Global.save_epoch_step=1",
              "Global.epoch_num=6"]
    rc, log = ocr_train(REC_CFG, str(tmp_path / "straight"), data, "rec", common)
    assert rc == 0, log[-3000:]
    reference = read_state(str(tmp_path / "straight" / "latest.pdema"))
    rng = np.random.default_rng(7)
    corrupt = resumed = 0
    for kill in range(KILLS):
        out = str(tmp_path / f"kill{kill}")
        opts = [f"Global.save_model_dir={out}/", *common] + __import__("ocr_helpers").data_overrides(data, "rec")
        proc = subprocess.Popen([sys.executable, "-m", "ema_callback.cli", "ocr-train", "-c", REC_CFG, "-o", *opts],
                                cwd=str(tmp_path), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(out, "iter_epoch_1.pdema")) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 6.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        for path in glob.glob(os.path.join(out, "*.pd*")) + glob.glob(os.path.join(out, "best_model", "*.pd*")):
            try:
                paddle.load(path, return_numpy=True)
            except Exception:
                corrupt += 1
        epochs = sorted(int(p.split("iter_epoch_")[1][:-6]) for p in glob.glob(os.path.join(out, "iter_epoch_*.pdema")))
        assert epochs == list(range(1, len(epochs) + 1)), epochs
        rc, log = ocr_train(REC_CFG, out, data, "rec",
                            [*common, f"Global.checkpoints={out}/iter_epoch_{epochs[-1]}"], cwd=str(tmp_path))
        assert rc == 0, log[-3000:]
        state = read_state(os.path.join(out, "latest.pdema"))
        resumed += state["num_steps"] == reference["num_steps"] and all(
            np.asarray(state["shadow"][k]).tobytes() == np.asarray(reference["shadow"][k]).tobytes()
            for k in reference["shadow"])
    print(f"\nPaddleOCR kill points: {KILLS}, corrupt files: {corrupt}, exact resumes: {resumed}")
    assert corrupt == 0 and resumed == KILLS
