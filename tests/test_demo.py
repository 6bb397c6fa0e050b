"""The main job, on a short setting: its files and tables, reproducible across processes, and the proof it relies on
(the raw weights with the plugin are bit-identical to a run without it, so one run shows raw and EMA)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ema_callback.demo.run import greedy_decode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--steps", "40", "--eval-every", "10", "--train-size", "160", "--eval-size", "48", "--batch-size", "16"]


def demo(out, *extra):
    done = subprocess.run([sys.executable, "-m", "ema_callback.cli", "demo", *SHORT, *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_short_demo_prints_the_headline_and_every_candidate_twice_the_same(tmp_path):
    """The default demo runs length auto: raw, the default length and the pick; the same numbers in a second
    process, bit for bit."""
    first = demo(tmp_path / "a")
    for row in ("| weights | final val acc | validation noise, last quarter |", "| raw weights | ",
                "| EMA, default length (half-life ", "Length auto picked ", "points over the default",
                "length auto, at the end of the run (val acc): raw weights "):
        assert row in first.stdout, first.stdout[-3000:]
    assert "EMA candidates (acc, higher is better):" in first.stderr and "EMA: length auto picked" in first.stderr
    assert "To copy construct from a tensor" not in first.stderr  # issue 25.8: numpy batches, no copy of a tensor
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    auto = json.loads((tmp_path / "a" / "ema_auto.json").read_text())
    assert results["auto"]["pick"] == auto["label"] == results["recommended"]  # the headline's EMA is the pick
    assert len(results["auto"]["values"]) <= 10
    assert results["steps"] == [10, 20, 30, 40] and results["summary"]["raw"]["noise_evaluations"] == 1
    assert (tmp_path / "a" / "curves.png").stat().st_size > 10_000
    demo(tmp_path / "b")  # a second process: the same numbers, bit for bit
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    results.pop("seconds"), again.pop("seconds")
    assert results == again


@pytest.mark.slow
def test_the_several_ema_demo_compares_stated_lengths(tmp_path):
    first = demo(tmp_path / "a", "--half-lives", "2000,4000,16000")
    for row in ("| EMA half-life 2000 images |", "| EMA half-life 4000 images |", "| EMA half-life 16000 images |",
                "points of final accuracy", "recommended: "):
        assert row in first.stdout, first.stdout[-3000:]
    table = json.loads((tmp_path / "a" / "ema_candidates.json").read_text())
    assert [r["candidate"] for r in table["candidates"]] == ["ema_hl2000img", "ema_hl4000img", "ema_hl16000img", "raw"]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["recommended"] == table["recommended"]


@pytest.mark.slow
def test_the_demos_raw_weights_are_those_of_a_run_without_the_plugin():
    """What lets the demo train once: EMACallback (three EMAs, eval_raw) leaves the raw weights bit-identical."""
    import paddle

    from ema_callback import EMACallback
    from ema_callback.demo.run import DATA_STYLE, _modules, prepared_model
    from ema_callback.demo.text_lines import make_text_lines

    _, TextLines, TinyCRNN, _, _, CyclingBatches = _modules()
    images, labels = make_text_lines(96, 3, **DATA_STYLE)
    train, valid = TextLines(images[:64], labels[:64]), TextLines(images[64:], labels[64:])
    paddle.seed(3)
    initial = {k: v.numpy().copy() for k, v in TinyCRNN().state_dict().items()}
    finals = []
    for callbacks in ([], [EMACallback(half_life_images=[100, 400], eval_raw=True, final_weights="raw")]):
        model = prepared_model(initial, 3, 0.004)
        loader = paddle.io.DataLoader(train, batch_sampler=CyclingBatches(len(train), 16, 5, 3))
        model.fit(loader, paddle.io.DataLoader(valid, batch_size=32), epochs=4, verbose=0, callbacks=callbacks)
        finals.append({k: v.numpy() for k, v in model.network.state_dict().items()})
    assert all(finals[0][k].tobytes() == finals[1][k].tobytes() for k in finals[0])


def test_greedy_ctc_decoding_merges_repeats_and_drops_blanks():
    logits = np.eye(4)[[[1, 1, 0, 1, 2, 2, 0, 0, 3]]]
    assert greedy_decode(logits) == [[1, 1, 2, 3]]


def test_the_demos_batches_reach_fit_without_a_tensor_copy_warning(monkeypatch):
    """Issue 25.8: hapi copies each input with paddle.to_tensor, which warns (once per process) when given a tensor,
    as a DataLoader yields; the demo hands fit numpy batches (NumpyBatches), with the same values."""
    import warnings

    import paddle
    import paddle.tensor.creation as creation

    from ema_callback.demo.run import DATA_STYLE, NumpyBatches, _modules, prepared_model
    from ema_callback.demo.text_lines import make_text_lines

    _, TextLines, TinyCRNN, _, _, _ = _modules()
    images, labels = make_text_lines(48, 3, **DATA_STYLE)
    data = TextLines(images, labels)
    paddle.seed(3)
    initial = {k: v.numpy().copy() for k, v in TinyCRNN().state_dict().items()}
    losses = {}
    for wrap in (NumpyBatches, lambda loader: loader):
        monkeypatch.setattr(creation, "_warned_in_tensor", False)  # Paddle warns once per process
        model = prepared_model(initial, 3, 0.004)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(wrap(paddle.io.DataLoader(data, batch_size=16, shuffle=False)), epochs=1, verbose=0)
            losses[wrap] = model.evaluate(wrap(paddle.io.DataLoader(data, batch_size=16)), verbose=0)["loss"]
        copies = [w for w in caught if "To copy construct from a tensor" in str(w.message)]
        assert bool(copies) == (wrap is not NumpyBatches)  # the plain DataLoader does warn: the test can fail
    assert len(set(map(str, losses.values()))) == 1  # the same training, bit for bit
