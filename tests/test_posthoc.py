"""Post-hoc EMA on real training: tracked profiles, snapshots, reconstruction, resume."""
import os
import shutil

import numpy as np
import paddle
import pytest
from conftest import make_net
from fit_helpers import loaders, make_model

from ema_callback import EMACallback
from ema_callback.config.schema import EMAConfig, EMAConfigError
from ema_callback.core.engine import ExponentialMovingAverage
from ema_callback.errors import EMAFileError
from ema_callback.posthoc.snapshots import PostHocEMA, load_snapshots


def track(trajectory, folder, sigma_rels, steps=240, every=20, update_every=1, dtype="float32", backend="auto"):
    init, states = trajectory
    model = make_net()
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in init.items()})
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.99, update_every=update_every, posthoc={
        "sigma_rels": sigma_rels, "snapshot_every": every, "snapshot_dtype": dtype, "dir": str(folder)}),
        backend=backend)
    for state in states[:steps]:
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        ema.step()
    return model, ema


def rel(a, b):
    return max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-12)) for k in b)


def test_a_tracked_profile_reconstructs_its_own_snapshot(trajectory, tmp_path):
    _, ema = track(trajectory, tmp_path, [0.05, 0.10])
    post = PostHocEMA(str(tmp_path))
    assert post.steps == list(range(20, 241, 20))
    snap = next(s for s in post.snapshots if s.step == 120)
    got = post.reconstruct(0.10, at_step=120)
    own = np.concatenate([got[n].reshape(-1) for n in post.names])
    assert np.linalg.norm(own - snap.profile(1)) / np.linalg.norm(snap.profile(1)) < 1e-4
    # the last snapshot's profile is the engine's shadow at that step
    final = ema.averaged_numpy(ema.num_candidates + 0)
    assert rel(post.reconstruct(0.05), {k: final[k] for k in post.names}) < 1e-4


def test_reconstructing_0_07_from_0_05_and_0_10_matches_a_tracked_0_07(trajectory, tmp_path):
    _, ema = track(trajectory, tmp_path, [0.05, 0.10, 0.07], every=10)
    tracked = ema.averaged_numpy(ema.num_candidates + 2)
    post = PostHocEMA(str(tmp_path), use_sigma_rels=[0.05, 0.10])
    error = rel(post.reconstruct(0.07), {k: tracked[k] for k in post.names})
    print(f"relative error of the 0.07 reconstruction from 24 snapshots x 2 profiles: {error:.2e}")
    assert error < 2e-3, error


def flat(values, names):
    return np.concatenate([np.asarray(values[n], np.float64).reshape(-1) for n in names])


def test_update_every_4_gives_the_same_profile_as_every_step(trajectory, tmp_path):
    """dt = 4 steps per update keeps the profile of time t; ema-pytorch's one-step beta (dt = 1 while updating every
    4 steps) averages a different profile. Measured as ||a - b|| / ||b|| over all averaged tensors."""
    from ema_callback.posthoc.power_math import gamma_of

    _, every1 = track(trajectory, tmp_path / "a", [0.10], every=240)
    _, every4 = track(trajectory, tmp_path / "b", [0.10], every=240, update_every=4)
    names = [e.name for e in every1._averaged]
    a = flat(every1.averaged_numpy(every1.num_candidates), names)
    b = flat(every4.averaged_numpy(every4.num_candidates), names)
    ours = np.linalg.norm(b - a) / np.linalg.norm(a)
    gamma = float(gamma_of(0.10))
    wrong = None
    for u, state in enumerate(trajectory[1][3:240:4], start=1):  # updates at steps 4, 8, ..., 240
        beta = (1 - 1 / (4 * u)) ** (gamma + 1)  # t in steps, but dt = 1 step for an update covering 4
        w = flat(state, names)
        wrong = w if wrong is None else beta * wrong + (1 - beta) * w
    naive = np.linalg.norm(wrong - a) / np.linalg.norm(a)
    print(f"update_every 4 against every step: ours {ours:.2e}, one-step beta {naive:.2e}")
    assert ours < 5e-3 and naive > 10 * ours


def test_device_path_tracks_the_same_profiles(trajectory, tmp_path):
    _, host = track(trajectory, tmp_path / "h", [0.05, 0.10], steps=60, every=30)
    _, device = track(trajectory, tmp_path / "d", [0.05, 0.10], steps=60, every=30, backend="paddle")
    for j in range(2):
        a, b = host.averaged_numpy(host.num_candidates + j), device.averaged_numpy(device.num_candidates + j)
        assert rel(b, a) < 1e-6


def test_fit_snapshots_continue_across_resume_and_survive_an_interrupted_write(tmp_path, monkeypatch):
    train, _ = loaders()
    block = {"sigma_rels": [0.05, 0.10], "snapshot_every": 5, "snapshot_dtype": "float32"}
    guard = paddle.utils.unique_name.guard
    with guard():
        straight = make_model()
        straight.fit(train, epochs=4, verbose=0, save_dir=str(tmp_path / "straight"),
                     callbacks=[EMACallback(decay=0.9, posthoc=block, save_dir=str(tmp_path / "straight"))])
    with guard():
        first = make_model()
        first.fit(train, epochs=2, verbose=0, save_dir=str(tmp_path / "run"),
                  callbacks=[EMACallback(decay=0.9, posthoc=block, save_dir=str(tmp_path / "run"))])
    # a kill while writing the next snapshot: its temporary file stays behind, the series stays readable
    import ema_callback.posthoc.snapshots as posthoc

    def killed(src, dst):
        raise KeyboardInterrupt("killed during the snapshot write")

    with guard():
        doomed = make_model()
        doomed.load(str(tmp_path / "run" / "1"))
        monkeypatch.setattr(posthoc.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            doomed.fit(train, epochs=1, verbose=0,
                       callbacks=[EMACallback(decay=0.9, posthoc=block, save_dir=str(tmp_path / "run"))])
        monkeypatch.undo()
    assert [s.step for s in load_snapshots(str(tmp_path / "run" / "posthoc"))] == [5, 10, 15, 20]
    with guard():
        second = make_model(seed=4)
        second.load(str(tmp_path / "run" / "1"))
        second.fit(train, epochs=2, verbose=0,
                   callbacks=[EMACallback(decay=0.9, posthoc=block, save_dir=str(tmp_path / "run"))])
    resumed = load_snapshots(str(tmp_path / "run" / "posthoc"))
    full = load_snapshots(str(tmp_path / "straight" / "posthoc"))
    assert [s.step for s in resumed] == [s.step for s in full] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    for a, b in zip(resumed, full):
        assert all(a.profile(j).tobytes() == b.profile(j).tobytes() for j in range(2)), a.step


def test_bad_posthoc_input_is_a_one_line_error(tmp_path):
    with pytest.raises(EMAConfigError, match=r"^EMA\.posthoc\.sigma_rel: unknown key, did you mean 'sigma_rels'\?$"):
        EMAConfig.from_block({"posthoc": {"sigma_rel": [0.1], "snapshot_every": 5}})
    with pytest.raises(EMAConfigError, match=r"^EMA\.posthoc\.sigma_rels: expected a non-empty list"):
        EMAConfig.from_block({"posthoc": {"sigma_rels": [0.3], "snapshot_every": 5}})
    with pytest.raises(EMAConfigError, match=r"^EMA\.posthoc\.snapshot_every: give how often"):
        EMAConfig.from_block({"posthoc": {"sigma_rels": [0.1]}})
    with pytest.raises(EMAFileError, match=r"no post-hoc snapshots \(phema-<step>\.safetensors\) in this folder"):
        PostHocEMA(str(tmp_path))


def test_a_fresh_run_starts_its_own_series_and_a_mixed_folder_is_refused(trajectory, tmp_path, caplog):
    """Issue 19.4: a fresh run into a folder holding a 60-step run's snapshots used to rewrite steps 5-20 and keep
    25-60 of the old run. Now the old run's snapshots are moved aside (nothing deleted), and a folder that mixes
    runs is refused, naming the files."""
    folder = tmp_path / "posthoc"
    _, old = track(trajectory, folder, [0.05, 0.10], steps=60, every=5)
    with caplog.at_level("INFO", logger="ema_callback"):
        _, new = track(trajectory, folder, [0.05, 0.10], steps=20, every=5)
    old_id, new_id = old.features["posthoc"].run_id, new.features["posthoc"].run_id
    assert new_id != old_id
    aside = tmp_path / f"posthoc-run-{old_id}"
    assert sorted(os.listdir(folder)) == [f"phema-{s:09d}.safetensors" for s in (5, 10, 15, 20)]
    assert sorted(os.listdir(aside)) == [f"phema-{s:09d}.safetensors" for s in range(5, 61, 5)]
    assert f"held 12 snapshot(s) of another run (run {old_id}, steps 5..60): moved to {aside}" in caplog.text
    assert f"EMA: post-hoc snapshot at optimizer step 5: {folder}/phema-000000005.safetensors (" in caplog.text
    assert PostHocEMA(str(folder)).steps == [5, 10, 15, 20] and PostHocEMA(str(aside)).steps[-1] == 60
    shutil.copy(aside / "phema-000000060.safetensors", folder)  # mixed by hand
    with pytest.raises(EMAFileError, match=rf"snapshots of 2 runs mixed \(run {new_id}: phema-000000005.safetensors, "
                                           rf"phema-000000010.safetensors, phema-000000015.safetensors \(\+1 more\); "
                                           rf"run {old_id}: phema-000000060.safetensors\); keep one run's snapshots "
                                           r"per folder"):
        load_snapshots(str(folder))


def test_a_resumed_run_continues_its_own_series(trajectory, tmp_path):
    init, states = trajectory
    folder = tmp_path / "posthoc"
    model, first = track(trajectory, folder, [0.05, 0.10], steps=20, every=5)
    state = first.state_dict()
    second = ExponentialMovingAverage(model, EMAConfig(decay=0.99, posthoc={"sigma_rels": [0.05, 0.10],
                                                                          "snapshot_every": 5, "dir": str(folder)}))
    second.set_state_dict(state)
    assert second.features["posthoc"].run_id == first.features["posthoc"].run_id
    for s in states[20:30]:
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in s.items()})
        second.step()
    assert sorted(os.listdir(tmp_path)) == ["posthoc"]  # nothing moved aside
    assert PostHocEMA(str(folder)).steps == [5, 10, 15, 20, 25, 30]


def test_reconstruct_names_the_snapshots_it_uses_and_flags_extrapolation(trajectory, tmp_path, capsys):
    from ema_callback.posthoc.cli import main

    track(trajectory, tmp_path, [0.05, 0.10], steps=60, every=5)
    assert main(["reconstruct", "--snapshots", str(tmp_path), "--sigma-rel", "0.07", "--at-step", "30",
                 "-o", str(tmp_path / "a.pdparams")]) == 0
    out = capsys.readouterr().out
    assert "sigma_rel 0.07 at optimizer step 30 from 6 snapshots (steps 5..30);" in out
    assert main(["reconstruct", "--snapshots", str(tmp_path), "--sigma-rel", "0.02", "--at-step", "31",
                 "-o", str(tmp_path / "b.pdparams")]) == 0
    out = capsys.readouterr().out
    assert "at optimizer step 30 (--at-step 31: the last snapshot at or before it) from 6 snapshots (steps 5..30); " \
           "extrapolated: outside the tracked profiles, unreliable;" in out


def test_load_average_sets_every_shadow_profiles_included(tmp_path):
    """ppdet's resume from its own EMA weights (load_average) on an engine with post-hoc profiles."""
    layer = paddle.nn.Linear(3, 3)
    ema = ExponentialMovingAverage(layer, EMAConfig(decays=[0.9, 0.99], bias_correction=True, posthoc={
        "sigma_rels": [0.05, 0.10], "snapshot_every": 5, "dir": str(tmp_path)}))
    values = {k: np.full(v.shape, 2.0, "float32") for k, v in layer.state_dict().items()}
    ema.load_average(values, num_steps=7)
    assert ema.decay_products == [0.0] * 4
    for j in range(ema.num_shadows):
        assert all(np.array_equal(v, values[k]) for k, v in ema.averaged_numpy(j).items())
