"""The supported Paddle range (2.6.x and 3.x): version checks, and what differs between them handled once."""
import subprocess
import sys

import numpy as np
import pytest

from ema_callback.errors import UnsupportedPaddleError
from ema_callback.paddle_compat import check_versions, host_flat, host_view, paddle


@pytest.mark.parametrize("paddle_version,numpy_version", [
    ("2.6.2", "1.26.4"), ("2.6.0", "1.24.0"), ("3.3.1", "2.4.6"), ("3.0.0rc1", "1.26.4"), ("0.0.0", "2.1.0")])
def test_supported_versions_pass(paddle_version, numpy_version):
    check_versions(paddle_version, numpy_version)


@pytest.mark.parametrize("paddle_version,numpy_version,says", [
    ("2.5.2", "1.26.4", "paddlepaddle 2.5.2 is installed; supported is paddlepaddle 2.6.x or 3.x"),
    ("2.4.0", "1.21.0", "pip install 'paddlepaddle>=2.6'"),
    ("2.6.2", "2.0.1", "paddlepaddle 2.6.2 needs numpy 1.x, found numpy 2.0.1; install it with pip install 'numpy<2'"),
    (None, "1.26.4", "no PaddlePaddle installed"),
])
def test_unsupported_versions_say_what_to_install(paddle_version, numpy_version, says):
    with pytest.raises(UnsupportedPaddleError) as info:
        check_versions(paddle_version, numpy_version)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_the_command_line_gives_one_line_for_an_unsupported_paddle(tmp_path):
    # the real import path, with the installed Paddle's metadata made to say 2.5.2
    script = ("import sys, importlib.metadata as m; real = m.version\n"
              "m.version = lambda d: '2.5.2' if d == 'paddlepaddle' else real(d)\n"
              "from ema_callback.cli import main\n"
              "sys.exit(main(['ocr-train', '-c', 'x.yml', '--paddleocr-root', '.']))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "paddlepaddle 2.5.2 is installed; supported is paddlepaddle 2.6.x or 3.x" in lines[0]


def test_zlib_after_paddle_does_not_crash():
    # Paddle 2.6.2 + Debian 12's zlib: `import paddle` then a first `import zlib` segfaults (Paddle#70538);
    # importing Paddle through ema_callback binds zlib first, so suites that import albumentations keep working
    code = ("from ema_callback.paddle_compat import paddle\nimport zlib\n"
            "assert zlib.decompress(zlib.compress(b'ema' * 1000)) == b'ema' * 1000\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_host_views_alias_the_tensor_and_follow_its_strides():
    base = paddle.to_tensor(np.arange(12, dtype="float32").reshape(3, 4))
    view = host_view(base)
    view[0, 0] = 42.0  # writable and zero-copy: the tensor sees it
    assert float(base.numpy()[0, 0]) == 42.0
    transposed = base.T  # strided on both Paddle 2.6 and 3.x; Paddle 2.6's DLPack export would lose this
    assert not transposed.is_contiguous()
    np.testing.assert_array_equal(host_view(transposed), base.numpy().T)
    np.testing.assert_array_equal(host_flat(transposed), base.numpy().T.reshape(-1))
    assert host_view(base.astype("float64")) is None
