"""Every exactness check of a shadow kind runs on both stores (host numpy, forced device path) at update_every 1
and > 1, against an independent numpy reference (issue 19, item 12): several EMAs with bias correction, post-hoc
profiles, Switch EMA and the NaN skip. A device-path profile update with a one-step dt at update_every 3 was 4.9%
off the host path and passed the old suite; here it fails."""
import numpy as np
import paddle
import pytest
from conftest import make_net
from reference import reference_ema

from ema_callback.config.schema import EMAConfig
from ema_callback.core.engine import ExponentialMovingAverage

STORES = ["numpy", "paddle"]
EVERY = [1, 3]


def run(trajectory, backend, steps, **kw):
    init, states = trajectory
    model = make_net()
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in init.items()})
    ema = ExponentialMovingAverage(model, EMAConfig.from_kwargs(**kw), backend=backend)
    assert ema.deferred == (backend == "paddle")
    for state in states[:steps]:
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        ema.step()
    return model, ema


def averaged_names(ema):
    return [e.name for e in ema.entries if e.role == "average"]


@pytest.mark.parametrize("update_every", EVERY)
@pytest.mark.parametrize("backend", STORES)
def test_several_emas_with_bias_correction(trajectory, backend, update_every):
    init, states = trajectory
    _, ema = run(trajectory, backend, 60, decays=[0.9, 0.99], schedule="threshold", bias_correction=True,
                 update_every=update_every)
    for j, decay in enumerate([0.9, 0.99]):
        expected = reference_ema(init, states[:60], averaged_names(ema), [], schedule="threshold", decay=decay,
                                 update_every=update_every, bias_correction=True)
        got = ema.averaged_numpy(j)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=2e-6, err_msg=f"shadow {j} {name}")
    assert ema.num_updates == 60 // update_every


def reference_profile(init, states, names, gamma, k):
    """EDM2's power-function EMA with one update every k optimizer steps: after update u (time t = (u+1) k, step
    dt = k), beta = (1 - dt/t)^(gamma+1), p = beta p + (1 - beta) w (numpy float64, from the formula)."""
    p = {n: init[n].astype(np.float64) for n in names}
    u = 0
    for step, weights in enumerate(states, start=1):
        if step % k:
            continue
        t = (u + 1) * k
        beta = (1.0 - k / t) ** (gamma + 1.0)
        p = {n: beta * p[n] + (1 - beta) * weights[n].astype(np.float64) for n in names}
        u += 1
    return p


@pytest.mark.parametrize("update_every", EVERY)
@pytest.mark.parametrize("backend", STORES)
def test_posthoc_profiles(trajectory, backend, update_every, tmp_path):
    init, states = trajectory
    _, ema = run(trajectory, backend, 60, decay=0.99, update_every=update_every,
                 posthoc={"sigma_rels": [0.05, 0.10], "snapshot_every": 999, "dir": str(tmp_path)})
    for j, gamma in enumerate(ema.features["posthoc"].gammas):
        expected = reference_profile(init, states[:60], averaged_names(ema), gamma, update_every)
        got = ema.averaged_numpy(ema.num_candidates + j)
        for name in expected:
            scale = max(float(np.abs(expected[name]).max()), 1e-3)
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=2e-6 * scale,
                                       err_msg=f"profile {j} {name}")


def reference_sparse_profile(init, states, names, gamma, k_engine, k_profile):
    """A profile updated every ``k_profile`` EMA updates (the EMA updating every ``k_engine`` steps): its v-th
    update at time t_v = (v k_profile + 1) k_engine steps, beta_v = (t_(v-1) / t_v)^(gamma+1) with t_(-1) = 0 (the
    power-function average of the weights it saw; numpy float64, from the formula)."""
    p = {n: init[n].astype(np.float64) for n in names}
    u, times = 0, [0.0]
    for step, weights in enumerate(states, start=1):
        if step % k_engine:
            continue
        if u % k_profile == 0:
            t = (u + 1) * k_engine
            beta = (times[-1] / t) ** (gamma + 1.0)
            p = {n: beta * p[n] + (1 - beta) * weights[n].astype(np.float64) for n in names}
            times.append(float(t))
        u += 1
    return p, times[-1]


@pytest.mark.parametrize("update_every", EVERY)
@pytest.mark.parametrize("backend", STORES)
def test_posthoc_profiles_updated_every_few_ema_updates(trajectory, backend, update_every, tmp_path):
    """``posthoc.update_every: 4`` (what length: auto tracks): exact against the formula on both stores, the EMAs
    untouched by it, and the snapshot's time is the profiles' last update."""
    from ema_callback.posthoc.snapshots import load_snapshots

    init, states = trajectory
    steps = 61 * update_every
    _, ema = run(trajectory, backend, steps, decay=0.99, update_every=update_every,
                 posthoc={"sigma_rels": [0.05, 0.10], "snapshot_every": steps, "dir": str(tmp_path),
                          "update_every": 4})
    for j, gamma in enumerate(ema.features["posthoc"].gammas):
        expected, time = reference_sparse_profile(init, states[:steps], averaged_names(ema), gamma, update_every, 4)
        got = ema.averaged_numpy(ema.num_candidates + j)
        for name in expected:
            scale = max(float(np.abs(expected[name]).max()), 1e-3)
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=2e-6 * scale,
                                       err_msg=f"profile {j} {name}")
    assert load_snapshots(str(tmp_path))[-1].time == time == (60 + 1) * update_every  # updates 0, 4, ..., 60
    plain = reference_ema(init, states[:steps], averaged_names(ema), [], schedule="threshold", decay=0.99,
                          update_every=update_every)
    np.testing.assert_allclose(ema.averaged_numpy(0)["4.weight"], plain["4.weight"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("update_every", EVERY)
@pytest.mark.parametrize("backend", STORES)
def test_switch_puts_the_ema_into_the_weights_bit_for_bit(trajectory, backend, update_every):
    init, states = trajectory
    model = make_net()
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in init.items()})
    ema = ExponentialMovingAverage(model, EMAConfig.from_kwargs(decay=0.9, schedule="constant", switch_every=6,
                                                                update_every=update_every), backend=backend)
    switched = []
    for step, state in enumerate(states[:24], start=1):
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        ema.step()
        if ema.features["switch"].count > len(switched):
            switched.append(step)
            averaged = ema.averaged_numpy(0)
            live = {k: v.numpy() for k, v in model.state_dict().items()}
            assert all(live[n].tobytes() == averaged[n].astype(live[n].dtype).tobytes()
                       for n in averaged_names(ema)), step
    assert switched == [6, 12, 18, 24]


@pytest.mark.parametrize("update_every", EVERY)
@pytest.mark.parametrize("backend", STORES)
def test_the_first_switch_takes_the_reference_ema(trajectory, backend, update_every):
    init, states = trajectory
    model, ema = run(trajectory, backend, 6, decay=0.9, schedule="constant", switch_every=6,
                     update_every=update_every)
    assert ema.features["switch"].count == 1
    expected = reference_ema(init, states[:6], averaged_names(ema), [], decay=0.9, update_every=update_every)
    live = {k: v.numpy() for k, v in model.state_dict().items()}
    for name in expected:
        np.testing.assert_allclose(live[name], expected[name], rtol=0, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("update_every", EVERY)
@pytest.mark.parametrize("backend", STORES)
def test_a_nan_update_is_skipped_exactly(trajectory, backend, update_every):
    init, states = trajectory
    model, ema = run(trajectory, backend, 30, decays=[0.9, 0.99], update_every=update_every, bias_correction=True,
                     posthoc={"sigma_rels": [0.05], "snapshot_every": 999, "dir": "unused"})
    before = ema.state_dict()
    poisoned = {k: v.copy() for k, v in states[30].items()}
    poisoned["4.weight"].flat[3] = np.nan
    for _ in range(update_every):  # the update_every-th of these steps is an update: skipped
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in poisoned.items()})
        ema.step()
    after = ema.state_dict()
    assert ema.num_skipped == 1 and ema.num_updates == before["num_updates"]
    assert after["decay_products"] == before["decay_products"]
    for key in ("shadow",):
        assert all(after[key][k].tobytes() == before[key][k].tobytes() for k in before[key])
    assert all(a[k].tobytes() == b[k].tobytes() for a, b in zip(after["shadows"], before["shadows"]) for k in a)
    # and the run goes on to the reference value of the unpoisoned steps
    clean = states[:30] + states[31:31 + 2 * update_every]
    for state in states[31:31 + 2 * update_every]:
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        ema.step()
    expected = reference_ema(init, clean, averaged_names(ema), [], schedule="threshold", decay=0.9,
                             update_every=update_every, bias_correction=True)
    np.testing.assert_allclose(ema.averaged_numpy(0)["4.weight"], expected["4.weight"], rtol=0, atol=2e-6)
