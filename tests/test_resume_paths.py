"""Every way a Model.fit user resumes restores the same, or is refused at the start in one line (issue 24.6), and
one run writes a folder at a time (24.5). Each case is compared bit for bit with a run that was never stopped."""
import glob
import logging
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest
from conftest import RunsCode
from fit_helpers import loaders, make_model, weights

from ema_callback import EMACallback
from ema_callback.errors import EMAConfigError, EMAFileError

HERE = os.path.dirname(os.path.abspath(__file__))
guard = paddle.utils.unique_name.guard  # optimizer accumulators get the same names in every run


def same(a, b):
    return set(a) == set(b) and all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


@pytest.fixture(scope="module")
def straight():
    """4 epochs (48 optimizer steps) never stopped: the raw weights and the EMA every resume must reach."""
    train, _ = loaders()
    with guard():
        model = make_model()
        callback = EMACallback(decay=0.9, final_weights="raw")
        model.fit(train, epochs=4, verbose=0, callbacks=[callback])
    return weights(model.network), callback.ema.state_dict()


@pytest.fixture
def first_half(tmp_path):
    """2 epochs into tmp_path/A: sets 0, 1 and final (final.pdparams hold the EMA weights, final.pdema the raw)."""
    train, _ = loaders()
    with guard():
        make_model().fit(train, epochs=2, verbose=0, save_dir=str(tmp_path / "A"), callbacks=[EMACallback(decay=0.9)])
    return tmp_path / "A"


def finish(model, callback):
    train, _ = loaders()
    with guard():
        model.fit(train, epochs=2, verbose=0, callbacks=[callback])
    return weights(model.network), callback.ema.state_dict()


@pytest.mark.parametrize("where", ["another folder", "a subfolder", "no save_dir"])
def test_after_model_load_the_ema_continues_from_the_loaded_sets_pdema_wherever_save_dir_points(
        straight, first_half, tmp_path, where, caplog):
    """Before: with save_dir elsewhere no .pdema matched, nothing was said, and training went on from the EMA weights
    as if they were raw, the EMA restarted at update 0."""
    save_dir = {"another folder": str(tmp_path / "B"), "a subfolder": str(first_half / "sub"), "no save_dir": None}
    with guard():
        model = make_model(seed=4)
        model.load(str(first_half / "final"))
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        raw, ema = finish(model, EMACallback(decay=0.9, save_dir=save_dir[where], final_weights="raw"))
    assert same(raw, straight[0]) and same(ema["shadow"], straight[1]["shadow"]) and ema["num_steps"] == 48
    assert any(f"resumed from {first_half / 'final.pdema'} at optimizer step 24" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_resume_alone_loads_the_weights_the_optimizer_state_and_the_ema(straight, first_half, caplog):
    """Before: resume= alone restored the raw weights and the EMA but not the .pdopt: raw weights 0.056 off."""
    with guard():
        model = make_model(seed=4)
    with caplog.at_level(logging.INFO, logger="ema_callback"):
        raw, ema = finish(model, EMACallback(decay=0.9, resume=str(first_half / "final"), final_weights="raw"))
    assert same(raw, straight[0]) and same(ema["shadow"], straight[1]["shadow"])
    assert any("weights and optimizer state loaded from" in r.getMessage() for r in caplog.records)


def test_model_load_of_one_set_and_resume_of_another_is_refused_before_any_step(first_half):
    with guard():
        model = make_model(seed=4)
        model.load(str(first_half / "0"))
    before = weights(model.network)
    train, _ = loaders()
    with pytest.raises(EMAConfigError) as info, guard():
        model.fit(train, epochs=1, verbose=0,
                  callbacks=[EMACallback(decay=0.9, resume=str(first_half / "final"))])
    message = str(info.value)
    assert "\n" not in message and "a run continues one checkpoint" in message and "/A/0" in message, message
    assert same(weights(model.network), before)


def test_a_resume_from_an_older_step_moves_the_abandoned_snapshots_aside(tmp_path, caplog):
    """Before: resumed from step 12 of a run that reached 36, the snapshots 16-36 stayed with the same run id, and
    reconstruct reported a step the resumed run never reached."""
    from ema_callback.posthoc.snapshots import load_snapshots

    train, _ = loaders()
    block = {"sigma_rels": [0.05, 0.1], "snapshot_every": 4}
    with guard():
        model = make_model()
        model.fit(train, epochs=3, verbose=0, save_dir=str(tmp_path / "run"),
                  callbacks=[EMACallback(decay=0.9, posthoc=block, final_weights="raw")])
    with guard():
        reference = make_model()
        reference.fit(train, epochs=3, verbose=0, save_dir=str(tmp_path / "straight"),
                      callbacks=[EMACallback(decay=0.9, posthoc=block, final_weights="raw")])
    with guard(), caplog.at_level(logging.INFO, logger="ema_callback"):
        again = make_model(seed=4)
        again.load(str(tmp_path / "run" / "0"))
        again.fit(train, epochs=2, verbose=0, save_dir=str(tmp_path / "run"),
                  callbacks=[EMACallback(decay=0.9, posthoc=block, final_weights="raw")])
    aside = glob.glob(str(tmp_path / "run" / "posthoc-run-*-after-12"))
    assert len(aside) == 1 and sorted(os.listdir(aside[0])) == [f"phema-{s:09d}.safetensors" for s in range(16, 37, 4)]
    resumed, full = load_snapshots(str(tmp_path / "run" / "posthoc")), load_snapshots(str(tmp_path / "straight" /
                                                                                         "posthoc"))
    assert [s.step for s in resumed] == [s.step for s in full] == list(range(4, 37, 4))
    assert all(a.profile(j).tobytes() == b.profile(j).tobytes() for a, b in zip(resumed, full) for j in range(2))
    assert any("later than the step it resumed from (steps 16..36, resumed at 12)" in r.getMessage()
               for r in caplog.records)


def test_an_ema_off_resume_removes_the_stale_pdema_and_a_second_resume_works(tmp_path, caplog):
    """Before: the EMA-off run overwrote final.pdparams and left the old final.pdema; the next resume crashed with an
    EMAFileError naming 0.pdema. Now that save removes final.pdema, and the EMA restarts with one line saying so;
    the raw weights equal a run never stopped."""
    train, _ = loaders()
    folder = str(tmp_path / "A")
    with guard():
        straight = make_model()
        straight.fit(train, epochs=3, verbose=0)
    with guard():
        make_model().fit(train, epochs=1, verbose=0, save_dir=folder, callbacks=[EMACallback(decay=0.9)])
    with guard():
        off = make_model(seed=4)
        off.load(os.path.join(folder, "final"))
        off.fit(train, epochs=1, verbose=0, save_dir=folder, callbacks=[EMACallback(enable=False)])
    assert not os.path.exists(os.path.join(folder, "final.pdema"))
    with guard(), caplog.at_level(logging.INFO, logger="ema_callback"):
        third = make_model(seed=5)
        third.load(os.path.join(folder, "final"))
        callback = EMACallback(decay=0.9, save_dir=folder, final_weights="raw")
        third.fit(train, epochs=1, verbose=0, callbacks=[callback])
    assert same(weights(third.network), weights(straight.network))
    assert callback.ema.num_updates == 12
    assert any("has no EMA state beside it" in r.getMessage() and "final.pdparams" in r.getMessage()
               for r in caplog.records)


def test_a_second_run_into_a_folder_a_live_run_is_writing_is_refused(tmp_path):
    folder, started, go = str(tmp_path / "out"), str(tmp_path / "started"), str(tmp_path / "go")
    live = subprocess.Popen([sys.executable, os.path.join(HERE, "live_fit_script.py"), folder, started, go],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(started) and live.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(started), live.communicate()[1][-3000:]
        train, _ = loaders()
        with guard(), pytest.raises(EMAFileError) as info:
            make_model().fit(train, epochs=1, verbose=0, save_dir=folder, callbacks=[EMACallback(decay=0.9)])
        message = str(info.value)
        assert message.startswith(os.path.realpath(folder)) and "another run is writing into this folder" in message
        assert f"pid {live.pid}" in message and "live_fit_script.py" in message and "\n" not in message
    finally:
        open(go, "w").close()
        out, err = live.communicate(timeout=120)
    assert live.returncode == 0 and "finished" in out, err[-3000:]
    with guard():  # the lock went with its run
        make_model().fit(loaders()[0], epochs=1, verbose=0, save_dir=folder, callbacks=[EMACallback(decay=0.9)])



def test_model_load_reads_the_set_with_the_checked_reader_first(first_half, tmp_path):
    """hapi's Model.load unpickles with paddle.load; the files are checked before it does."""
    marker = tmp_path / "pwned"
    with open(first_half / "1.pdopt", "wb") as handle:
        pickle.dump({"x": RunsCode(marker)}, handle)
    with guard():
        model = make_model(seed=4)
    before = weights(model.network)
    with pytest.raises(EMAFileError) as info:
        model.load(str(first_half / "1"))
    assert f"{first_half / '1.pdopt'}: refused to load: it names the global posix.system" in str(info.value)
    assert not marker.exists() and same(weights(model.network), before)


def test_a_missing_pdema_beside_ema_weights_is_refused_naming_the_choice(straight, first_half, caplog):
    """final.pdparams hold EMA weights; without final.pdema a resume would train on them as raw. The folder's set
    index (written with every set) says what they hold: refused in one line naming EMA.restart; with it, the EMA
    starts anew from them, said in one line."""
    os.remove(first_half / "final.pdema")
    train, _ = loaders()
    with guard():
        model = make_model(seed=4)
        model.load(str(first_half / "final"))
    before = weights(model.network)
    with guard(), pytest.raises(EMAFileError) as info:
        model.fit(train, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9)])
    message = str(info.value)
    assert message.startswith(f"{first_half / 'final'}.pdparams: hold the EMA weights (ema) of the run that saved")
    assert "EMA.restart: true" in message and "\n" not in message
    assert same(weights(model.network), before)
    with guard(), caplog.at_level(logging.INFO, logger="ema_callback"):
        model.fit(train, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9, restart=True)])
    assert any("(EMA.restart: they are the EMA weights of the run that saved them)" in r.getMessage()
               for r in caplog.records)


def test_resume_without_the_optimizer_state_is_refused_and_reset_optimizer_continues_the_ema(first_half, caplog):
    os.remove(first_half / "final.pdopt")
    train, _ = loaders()
    with guard():
        model = make_model(seed=4)
    with guard(), pytest.raises(EMAFileError) as info:
        model.fit(train, epochs=1, verbose=0, callbacks=[EMACallback(decay=0.9, resume=str(first_half / "final"))])
    assert "final.pdopt: no such file; a resume restores the weights and the optimizer state" in str(info.value)
    assert "model.load(path, reset_optimizer=True)" in str(info.value)
    with guard(), caplog.at_level(logging.INFO, logger="ema_callback"):
        model.load(str(first_half / "final"), reset_optimizer=True)
        callback = EMACallback(decay=0.9, final_weights="raw")
        model.fit(train, epochs=1, verbose=0, callbacks=[callback])
    assert callback.ema.num_steps == 36 and any("resumed from" in r.getMessage() for r in caplog.records)


def test_ema_off_over_ema_weights_without_their_pdema_is_refused(first_half):
    """With the EMA off the raw weights come from the .pdema; when it is missing and the folder's set index says the
    .pdparams hold EMA weights, training on them as raw is refused (EMA.restart: true allows it)."""
    os.remove(first_half / "final.pdema")
    train, _ = loaders()
    with guard():
        model = make_model(seed=4)
        model.load(str(first_half / "final"))
    with guard(), pytest.raises(EMAFileError, match=r"hold the EMA weights of the run that saved them"):
        model.fit(train, epochs=1, verbose=0, callbacks=[EMACallback(enable=False)])
    with guard():
        model.fit(train, epochs=1, verbose=0, callbacks=[EMACallback(enable=False, restart=True)])


def test_a_second_resume_from_the_same_step_keeps_both_abandoned_series(tmp_path):
    from ema_callback.posthoc.snapshots import load_snapshots

    train, _ = loaders()
    block = {"sigma_rels": [0.05, 0.1], "snapshot_every": 4}
    folder = str(tmp_path / "run")
    with guard():
        make_model().fit(train, epochs=2, verbose=0, save_dir=folder,
                         callbacks=[EMACallback(decay=0.9, posthoc=block)])
    for _ in range(2):  # fit writes no checkpoint here, so 0 stays the set of step 12
        with guard():
            again = make_model(seed=4)
            again.load(os.path.join(folder, "0"))
            again.fit(train, epochs=1, verbose=0,
                      callbacks=[EMACallback(decay=0.9, posthoc=block, save_dir=folder)])
    aside = sorted(glob.glob(folder + "/posthoc-run-*-after-12*"))
    assert len(aside) == 2 and all(sorted(os.listdir(a)) == [f"phema-{s:09d}.safetensors" for s in (16, 20, 24)]
                                   for a in aside), aside
    assert [s.step for s in load_snapshots(os.path.join(folder, "posthoc"))] == [4, 8, 12, 16, 20, 24]
