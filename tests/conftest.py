import os
import subprocess
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message="No ccache found")
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "third_party"))
PADDLEOCR_ROOT = os.environ.get("PADDLEOCR_ROOT", os.path.join(SHARED, "PaddleOCR-2.10"))
PADDLEDET_ROOT = os.environ.get("PADDLEDET_ROOT", os.path.join(SHARED, "PaddleDetection-develop"))
PADDLECLAS_ROOT = os.environ.get("PADDLECLAS_ROOT", os.path.join(SHARED, "PaddleClas-develop"))
HAS_PADDLEOCR = os.path.isfile(os.path.join(PADDLEOCR_ROOT, "tools", "train.py"))
HAS_PADDLEDET = os.path.isfile(os.path.join(PADDLEDET_ROOT, "tools", "train.py"))
HAS_PADDLECLAS = os.path.isfile(os.path.join(PADDLECLAS_ROOT, "tools", "train.py"))
NO_PADDLEOCR = (f"SKIPPED: no PaddleOCR checkout at {PADDLEOCR_ROOT}: every test that trains with or reads PaddleOCR "
                "is skipped; set PADDLEOCR_ROOT=/path/to/PaddleOCR (release/2.10 or 3.x)")
NO_PADDLEDET = (f"SKIPPED: no PaddleDetection checkout at {PADDLEDET_ROOT}: every test that trains with or reads "
                "PaddleDetection is skipped; set PADDLEDET_ROOT=/path/to/PaddleDetection")
NO_PADDLECLAS = (f"SKIPPED: no PaddleClas checkout at {PADDLECLAS_ROOT}: every test that trains with or reads "
                 "PaddleClas is skipped; set PADDLECLAS_ROOT=/path/to/PaddleClas")
needs_paddleocr = pytest.mark.skipif(not HAS_PADDLEOCR, reason=NO_PADDLEOCR)
needs_paddledet = pytest.mark.skipif(not HAS_PADDLEDET, reason=NO_PADDLEDET)
needs_paddleclas = pytest.mark.skipif(not HAS_PADDLECLAS, reason=NO_PADDLECLAS)
# PaddleNLP (tests/test_nlp.py): the [nlp] extra; found without importing it (importing it takes seconds).
import importlib.util  # noqa: E402

HAS_PADDLENLP = importlib.util.find_spec("paddlenlp") is not None
NO_PADDLENLP = ("SKIPPED: paddlenlp is not installed: every PaddleNLP Trainer test (tests/test_nlp.py) is skipped; "
                "pip install -e '.[nlp]' (make venv does)")
needs_paddlenlp = pytest.mark.skipif(not HAS_PADDLENLP, reason=NO_PADDLENLP)


def import_paddlenlp():
    """Import PaddleNLP with Hugging Face's ``datasets``, not ``tests/datasets.py`` (``pythonpath = tests`` puts that
    first): this folder leaves ``sys.path`` for the import, and afterwards the name ``datasets`` is the suite's module
    again (PaddleNLP keeps its own references to Hugging Face's). Called where PaddleNLP is used (test_nlp.py, and
    test_docs.py's check of the names docs/paddlenlp.md cites)."""
    import sys

    if "paddlenlp.trainer" in sys.modules:
        return
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched
    os.environ.setdefault("PPNLP_HOME", os.path.join(tempfile.gettempdir(), "ema_callback_ppnlp"))  # not ~ or the repo
    own = sys.modules.get("datasets")
    if own is not None and os.path.dirname(os.path.abspath(getattr(own, "__file__", "") or "")) == HERE:
        del sys.modules["datasets"]
    else:
        own = None
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]
    try:
        import paddlenlp.datasets  # noqa: F401
        import paddlenlp.metrics  # noqa: F401
        import paddlenlp.trainer  # noqa: F401
        import paddlenlp.transformers  # noqa: F401
    finally:
        sys.path[:] = saved
        sys.modules.pop("datasets", None)
        if own is not None:
            sys.modules["datasets"] = own


def pytest_terminal_summary(terminalreporter):
    """The one loud line per missing suite checkout, at the end of the run; PaddleNLP's when this run skipped a test
    for it (the Paddle 2.6 subset has none: it is installed into .venv only)."""
    skipped = " ".join(str(getattr(report, "longrepr", "")) for report in terminalreporter.stats.get("skipped", []))
    for missing, line in ((not HAS_PADDLEOCR, NO_PADDLEOCR), (not HAS_PADDLEDET, NO_PADDLEDET),
                          (not HAS_PADDLECLAS, NO_PADDLECLAS),
                          (not HAS_PADDLENLP and NO_PADDLENLP.split(":")[1] in skipped, NO_PADDLENLP)):
        if missing:
            terminalreporter.write_line(line, yellow=True, bold=True)


class RunsCode:
    """Pickles as a call of ``os.system`` that touches ``marker``: loading it with plain pickle runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tool_command(script):
    """A suite's own tool as `python SCRIPT` (zlib imported first under Paddle 2.6: Paddle#70538)."""
    from ema_callback.paddle_compat import suite_tool_command

    return suite_tool_command(script)


def has_gpu():
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def pytest_runtest_setup(item):
    """PaddleNLP is imported (with the right ``datasets``) before test_docs.py checks the names the PaddleNLP page and
    example cite; only there and in test_nlp.py, so other tests' processes do not import it."""
    if os.path.basename(str(item.fspath)) == "test_docs.py" and "cites" in item.name and (
            "paddlenlp" in item.name or "uie" in item.name):
        if not HAS_PADDLENLP:  # the names they cite (ema_callback.integrations.paddlenlp_trainer) need PaddleNLP
            pytest.skip(NO_PADDLENLP)
        import_paddlenlp()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where a GPU is (benchmarks/gpu_check.sh runs them); skipped, and said so, elsewhere."""
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU (paddlepaddle-gpu and a CUDA device): "
                                   "run benchmarks/gpu_check.sh there")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_net(seed=0, num_classes=3):
    """A real layer stack with BatchNorm: Conv-BN-ReLU-Conv-BN-ReLU-Pool-Linear."""
    import paddle
    from paddle import nn

    paddle.seed(seed)
    return nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(),
        nn.Conv2D(8, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(),
        nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(8, num_classes))


def snapshot(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def train_steps(model, steps, seed=0, lr=0.05):
    """Real SGD-momentum training on random data; returns the state after each optimizer step."""
    import paddle

    rng = np.random.default_rng(seed)
    opt = paddle.optimizer.Momentum(learning_rate=lr, parameters=model.parameters())
    states = []
    model.train()
    for _ in range(steps):
        x = paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32"))
        y = paddle.to_tensor(rng.integers(0, 3, size=(4, 1)).astype("int64"))
        loss = paddle.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        states.append(snapshot(model))
    return states


@pytest.fixture(scope="session")
def trajectory():
    """(initial state, 240 states of a real training run), recorded once."""
    model = make_net()
    init = snapshot(model)
    return init, train_steps(model, 240)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount, as on this project's machines; skipped elsewhere)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + done.stderr.decode().strip())
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
