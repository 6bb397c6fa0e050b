"""Reading ``paddle.save`` files without running code: a restricted unpickler.

``paddle.load`` is ``pickle.load``: a crafted file runs any code it names when it is loaded. Every file this
project reads (``.pdema`` states, and the suite's ``.pdparams`` a ``.pdema`` refers to) goes through
``safe_load`` instead, which resolves only the globals ``paddle.save`` of plain data needs and refuses the rest
with one line naming the file and the refused global:

* containers and scalars (``builtins`` tuple, list, dict, set, frozenset, bytearray, complex, and
  ``collections.OrderedDict``);
* numpy arrays, dtypes and scalars (``numpy.core.multiarray._reconstruct`` / ``scalar``, ``numpy.ndarray``,
  ``numpy.dtype``, the ``numpy.dtypes`` classes; ``numpy._core`` under numpy 2);
* Paddle's tensor reductions (``paddle/framework/io.py``): an eager Tensor is saved as ``tuple((name, ndarray))``
  and comes back as the ndarray (``paddle.load(..., return_numpy=True)``); a DenseTensor is saved as
  ``eval('data', {'data': ndarray})``, and only that exact call is honoured, without ``eval``.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import numpy as np

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

_BUILTINS = {"tuple": tuple, "list": list, "dict": dict, "set": set, "frozenset": frozenset,
             "bytearray": bytearray, "complex": complex, "int": int, "float": float, "str": str, "bool": bool}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global that plain data never needs (a file that would run code when loaded)."""


def _dense_tensor(expression: Any, namespace: Any = None) -> Any:
    """Paddle's DenseTensor reduction ``eval('data', {'data': ndarray})``, without eval."""
    if expression == "data" and isinstance(namespace, dict) and isinstance(namespace.get("data"), np.ndarray):
        return namespace["data"]
    raise RefusedGlobal("builtins.eval with other arguments than Paddle's tensor reduction")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "builtins" and name == "eval":
            return _dense_tensor
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in _NUMPY_MODULES and name in ("_reconstruct", "scalar"):
            return getattr(_multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            import numpy.dtypes as dtypes  # numpy >= 1.25 pickles dtype classes by name

            found = getattr(dtypes, name, None)
            if isinstance(found, type) and issubclass(found, np.dtype):
                return found
        raise RefusedGlobal(f"{module}.{name}")


def _tensors_to_arrays(obj: Any) -> Any:
    """Paddle's ``tuple((name, ndarray))`` tensor reduction -> the ndarray, through dicts, lists and tuples."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _tensors_to_arrays(value)
        return obj
    if isinstance(obj, list):
        return [_tensors_to_arrays(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_tensors_to_arrays(v) for v in obj)
    return obj


NAME_TABLE = "StructuredToParameterName@@"  # paddle.save's table of parameter names (paddle.load drops it)
BIG_PARAMS = "UnpackBigParamInfor@@"  # protocol 2/3 saves split arrays over 4 GB into slices


def _unpack_top_level(obj: Any) -> Any:
    """What ``paddle.load`` does to a loaded dict (``io_utils._pack_loaded_dict`` and the name table)."""
    if not isinstance(obj, dict):
        return obj
    for key, info in (obj.pop(BIG_PARAMS, None) or {}).items():
        obj[key] = np.concatenate([obj.pop(part) for part in info["slices"]]).reshape(info["OriginShape"])
    obj.pop(NAME_TABLE, None)
    return obj


def safe_loads(data: bytes) -> Any:
    """Unpickle ``paddle.save`` bytes of plain data as ``paddle.load(..., return_numpy=True)`` would return them
    (tensors as numpy arrays); raises ``RefusedGlobal`` for any other global."""
    return _unpack_top_level(_tensors_to_arrays(_RestrictedUnpickler(io.BytesIO(data)).load()))
