"""The supported Paddle range, and what the installed Paddle offers, detected once.

Supported: PaddlePaddle 2.6.x (PyPI's only ``paddlepaddle-gpu`` is 2.6.2) and 3.x. Paddle 2.6's wheels are
built against numpy 1.x, so under 2.6 numpy must be < 2. Both are checked from the installed packages'
metadata *before* ``import paddle``, so an unsupported set-up gets one line saying what to install instead
of a traceback from inside Paddle.

The fast host path needs a zero-copy numpy view of a CPU tensor's memory. Paddle 3.x offers it through the
DLPack protocol and ``data_ptr``; Paddle 2.6 has no ``Tensor.__dlpack__`` and its ``paddle.utils.dlpack.to_dlpack``
drops strides (a transposed tensor comes back in storage order), but it has ``data_ptr``, ``strides`` and
``is_contiguous``, which is all ``host_view`` needs. The capability is read off ``paddle.Tensor`` once
(``HAS_POINTER_VIEWS``), not off the version string; without it, tensors are read with one ``numpy()`` copy.
"""
from __future__ import annotations

import ctypes
import math
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ema_callback.errors import UnsupportedPaddleError

MIN_PADDLE = (2, 6)
SUPPORTED = "paddlepaddle 2.6.x or 3.x"


def _release(version: str) -> Tuple[int, ...]:
    """``'2.6.2'`` -> ``(2, 6, 2)``; ``'3.0.0rc1'`` -> ``(3, 0, 0)``; unreadable -> ``()``."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    return tuple(int(g) for g in match.groups() if g is not None) if match else ()


def check_versions(paddle_version: Optional[str], numpy_version: str) -> None:
    """Raise ``UnsupportedPaddleError`` unless Paddle >= 2.6 (any 3.x) and, under Paddle 2.x, numpy < 2.

    ``paddle_version`` None means no Paddle is installed. A development build (``0.0.0``) passes.
    """
    if paddle_version is None:
        raise UnsupportedPaddleError(f"ema-callback: no PaddlePaddle installed; install {SUPPORTED} "
                                     "(pip install paddlepaddle, or paddlepaddle-gpu)")
    release = _release(paddle_version)
    if release and release != (0, 0, 0) and release[:2] < MIN_PADDLE:
        raise UnsupportedPaddleError(f"ema-callback: paddlepaddle {paddle_version} is installed; supported is "
                                     f"{SUPPORTED} (pip install 'paddlepaddle>=2.6', or 'paddlepaddle-gpu==2.6.2')")
    if release and release[0] == 2 and _release(numpy_version)[:1] >= (2,):
        raise UnsupportedPaddleError(f"ema-callback: paddlepaddle {paddle_version} needs numpy 1.x, found numpy "
                                     f"{numpy_version}; install it with pip install 'numpy<2'")


def installed_paddle_version() -> Optional[str]:
    """The version of the installed Paddle distribution (CPU or GPU build), from its metadata."""
    from importlib import metadata

    for dist in ("paddlepaddle", "paddlepaddle-gpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _import_checked_paddle():
    version = installed_paddle_version()
    if version is not None:  # a source build has no metadata: let its import speak for itself
        check_versions(version, np.__version__)
    # Paddle 2.6.2's libpaddle exports its own zlib symbols: Python's zlib module, when first imported after
    # paddle, binds to them and segfaults in inflateReset2 (PaddlePaddle/Paddle#70538; seen here with Debian 12's
    # zlib 1.2.13 on `import paddle; import albumentations`). Importing zlib first binds it to the system's.
    import zlib  # noqa: F401

    import paddle

    return paddle


paddle = _import_checked_paddle()

# A suite's own tool (tools/train.py, eval.py, ...) as `python SCRIPT`. Under Paddle 2.6 it runs with Python's zlib
# module imported first: the README's workaround for PaddlePaddle/Paddle#70538 (see ``_import_checked_paddle``).
ZLIB_FIRST = "import zlib, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def suite_tool_command(script: str) -> list:
    """The command that runs a suite's ``script`` as ``python script`` would, safely under Paddle 2.6."""
    import sys

    if paddle.__version__.startswith("2."):
        return [sys.executable, "-c", ZLIB_FIRST, script]
    return [sys.executable, script]

HAS_POINTER_VIEWS = all(hasattr(paddle.Tensor, name) for name in ("data_ptr", "strides", "is_contiguous"))


def _is_cpu_float32(tensor: "paddle.Tensor") -> bool:
    return tensor.place.is_cpu_place() and tensor.dtype == paddle.float32


def data_pointers(tensors: Sequence["paddle.Tensor"]) -> List[int]:
    """``data_pointer`` of each tensor, in one C-level loop where Paddle has ``data_ptr`` (a list of hundreds of
    tensors is read every update)."""
    return list(map(paddle.Tensor.data_ptr, tensors)) if HAS_POINTER_VIEWS else [id(t) for t in tensors]


def data_pointer(tensor: "paddle.Tensor") -> int:
    """The tensor's data address (its identity for view caches); ``id`` where Paddle offers no ``data_ptr``."""
    return tensor.data_ptr() if HAS_POINTER_VIEWS else id(tensor)


def host_view(tensor: "paddle.Tensor") -> Optional[np.ndarray]:
    """A *writable* zero-copy numpy view (the tensor's shape and strides) of a CPU float32 tensor, else None.

    Made from the tensor's data pointer: DLPack imports are read-only in numpy, and Paddle 2.6's DLPack
    export loses strides. Strided tensors (a transposed buffer) get a strided view. The view does not keep
    the tensor alive: use it only while the tensor is referenced and its ``data_pointer`` is unchanged.
    """
    if not (HAS_POINTER_VIEWS and _is_cpu_float32(tensor)):
        return None
    shape = list(tensor.shape)
    if math.prod(shape) == 0:
        return np.zeros(shape, np.float32)
    strides = list(tensor.strides) if not tensor.is_contiguous() else None
    extent = (sum((n - 1) * st for n, st in zip(shape, strides)) + 1) if strides else math.prod(shape)
    pointer = ctypes.cast(tensor.data_ptr(), ctypes.POINTER(ctypes.c_float))
    base = np.ctypeslib.as_array(pointer, shape=(extent,))
    if strides is None:
        return base.reshape(shape)
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=[4 * st for st in strides])


def host_flat(tensor: "paddle.Tensor") -> np.ndarray:
    """The values of a CPU float32 tensor as a flat float32 array: a zero-copy view where the tensor is
    contiguous and pointer views exist, else one copy (strided tensors, no ``data_ptr``)."""
    view = host_view(tensor)
    if view is None:
        return np.ascontiguousarray(tensor.numpy(), dtype=np.float32).reshape(-1)
    return view.reshape(-1)


def _cpu_cast_rounds_to_nearest() -> bool:
    """Whether Paddle's CPU float32 -> float16/bfloat16 cast rounds to nearest (3.x) or truncates (2.6)."""
    probe = paddle.to_tensor(np.array([1.0 + 6e-4, 1.0 + 3 * 2.0 ** -9], np.float32), place=paddle.CPUPlace())
    half = probe.astype("float16").astype("float32").numpy()[0]
    brain = probe.astype("bfloat16").astype("float32").numpy()[1]
    return bool(half == np.float32(np.float16(1.0 + 6e-4)) and brain == np.float32(1.0 + 2.0 ** -7))


CPU_CAST_ROUNDS_TO_NEAREST = _cpu_cast_rounds_to_nearest()


def cast_rounded(tensor: "paddle.Tensor", dtype: str) -> "paddle.Tensor":
    """``tensor.astype(dtype)`` rounded to nearest even, also where Paddle's CPU cast truncates toward zero.

    Paddle 2.6's CPU cast to float16/bfloat16 truncates (seen: half of random normal values differ by one
    ulp from numpy's ``astype(np.float16)``); a truncating cast drags a reduced-precision EMA toward zero by
    one ulp per update. There the cast goes through numpy: ``astype(np.float16)``, and for bfloat16 the
    round-to-nearest-even of the top 16 bits (Paddle reads uint16 arrays as bfloat16 bits).
    """
    if dtype not in ("float16", "bfloat16") or CPU_CAST_ROUNDS_TO_NEAREST or not tensor.place.is_cpu_place():
        return tensor.astype(dtype)
    host = np.ascontiguousarray(tensor.astype("float32").numpy())
    if dtype == "float16":
        return paddle.to_tensor(host.astype(np.float16), place=paddle.CPUPlace())
    bits = host.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return paddle.to_tensor(rounded, dtype="bfloat16", place=paddle.CPUPlace())


def _specific_place(place):
    """A ``Place`` read off a tensor as the specific place class ``Tensor.to`` accepts on every version."""
    if place.is_cpu_place():
        return paddle.CPUPlace()
    if place.is_gpu_place():
        return paddle.CUDAPlace(place.gpu_device_id())
    return place


def move_to(tensor: "paddle.Tensor", place) -> "paddle.Tensor":
    """``tensor`` on ``place`` (itself when already there). Paddle 2.6's ``Tensor.to`` refuses the generic
    ``Place`` that ``tensor.place`` returns, so that one is turned into ``CPUPlace``/``CUDAPlace`` first."""
    if str(tensor.place) == str(place):
        return tensor
    return tensor.to(_specific_place(place) if type(place).__name__ == "Place" else place)


def numpy_dtype(tensor: "paddle.Tensor"):
    """The numpy dtype a tensor's values are exported in (bfloat16, which numpy lacks, as float32)."""
    if tensor.dtype == paddle.bfloat16:
        return np.float32  # set_state_dict casts back on load
    return {paddle.float16: np.float16, paddle.float32: np.float32, paddle.float64: np.float64}.get(
        tensor.dtype, tensor.numpy().dtype)


def copy_into(target: "paddle.Tensor", value) -> None:
    """In-place copy into ``target`` (same allocation, same ``stop_gradient``), casting (rounding) and moving as
    needed; ``value`` a tensor or a numpy array."""
    if isinstance(value, np.ndarray):
        value = paddle.to_tensor(value)
    if value.dtype != target.dtype:
        names = {paddle.float16: "float16", paddle.bfloat16: "bfloat16"}
        value = cast_rounded(value, names.get(target.dtype, target.dtype))
    value = move_to(value, target.place)
    paddle.assign(value.reshape(target.shape), output=target)
