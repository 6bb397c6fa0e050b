"""Hostile and damaged files for every reader of ema-callback (issue 24), and the guarded harness that loads them.

Three parts:

* generators (``build_<category>(root)``): write one category's files into ``root`` (a test's ``tmp_path``) and
  return its manifest: the files, the operation that reads them (``checked_load``, ``read_state``, ``engine_load``,
  ``snapshot``, ``load_snapshots``, ``read_yaml``, ...) and what is expected of each (``refuse``, ``load``,
  ``either`` or ``refuse_or_identical``). Nothing hostile is ever loaded in the process that generates.
* the child (``python hostile_corpus.py MANIFEST RESULTS START``): under ``RLIMIT_AS`` 4 GiB, one file at a time,
  with a watchdog (``faulthandler.dump_traceback_later(exit=True)``, which fires even inside a C loop) so that a
  load that hangs kills the child instead of the suite; per file it records the wall time, the tracemalloc peak,
  the exception and its message, and op-specific checks (engine and model unchanged, state identical, warnings,
  files outside touched); results are JSON lines, flushed after each file.
* the parent side (``run_manifest``, ``evaluate``): restarts the child after a file that hung or crashed it
  (that file is recorded as such), then checks every record against the contract and formats the table.

The contract (issue 24): a hostile file is refused with ``EMAFileError`` (``EMAConfigError`` for YAML) whose
message is one line, at most 600 characters, naming the file, within 1 s + 1 s per MB of file and a tracemalloc peak
of 3 x file size + 32 MiB; valid files still load; an engine/model is left exactly as it was on any error.
"""
from __future__ import annotations

import faulthandler
import gc
import glob
import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from typing import Any, Callable, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 2 ** 20
MAX_MESSAGE = 600
ADDRESS_SPACE = 4 * 2 ** 30  # RLIMIT_AS of the child
FILE_SIZE_LIMIT = 256 * MiB  # RLIMIT_FSIZE of the child: a reader never writes much
RUN_ID = "0123456789ab"
SETUP_TIMEOUT = 120.0  # an operation's set-up in the child (imports, a baseline fit)


def time_bound(nbytes: int) -> float:
    """Seconds a load may take: 1 s + 1 s per MB (10**6 bytes) of file."""
    return 1.0 + nbytes / 1e6


def memory_bound(nbytes: int) -> int:
    """tracemalloc peak a load may reach: 3 x file size + 32 MiB."""
    return 3 * nbytes + 32 * MiB


def kill_after(nbytes: int) -> float:
    """The watchdog: a load still running after this is recorded as hung (well past the bound, so a slow-but-bounded
    load is measured and reported as too slow rather than killed)."""
    return min(60.0, 2.0 * time_bound(nbytes) + 3.0)


# ====================================================================================== canonical forms (bit for bit)
def canon(obj: Any, depth: int = 0) -> Any:
    """A JSON-able form of plain data that differs whenever a bit of an array or a counter differs (lists and tuples,
    dicts and OrderedDicts are not told apart: paddle.load does not keep them apart either). Only for trusted
    values (valid files, engine states): never called on what a hostile file returned."""
    if depth > 100:
        raise ValueError("canon: nested deeper than 100")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            return ["ndarray-object", list(obj.shape), [canon(x, depth + 1) for x in obj.ravel().tolist()]]
        return ["nd", obj.dtype.str, list(obj.shape), hashlib.sha256(obj.tobytes()).hexdigest()]
    if isinstance(obj, np.generic):
        return ["np", obj.dtype.str, obj.tobytes().hex()]
    if isinstance(obj, bool):
        return ["b", obj]
    if isinstance(obj, int):
        return ["i", str(obj)]
    if isinstance(obj, float):
        return ["f", struct.pack("<d", obj).hex()]
    if isinstance(obj, complex):
        return ["c", struct.pack("<dd", obj.real, obj.imag).hex()]
    if isinstance(obj, str):
        return ["s", obj]
    if isinstance(obj, (bytes, bytearray)):
        return ["y", hashlib.sha256(bytes(obj)).hexdigest()]
    if obj is None:
        return ["n"]
    if isinstance(obj, dict):
        items = [[canon(k, depth + 1), canon(v, depth + 1)] for k, v in obj.items()]
        return ["m", sorted(items, key=lambda kv: json.dumps(kv[0]))]
    if isinstance(obj, (list, tuple)):
        return ["seq", [canon(x, depth + 1) for x in obj]]
    if isinstance(obj, (set, frozenset)):
        return ["set", sorted(json.dumps(canon(x, depth + 1)) for x in obj)]
    return ["obj", f"{type(obj).__module__}.{type(obj).__qualname__}"]


def canon_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(canon(obj), sort_keys=True).encode()).hexdigest()


def file_sha(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def tree_state(root: str) -> Dict[str, list]:
    """Every path under ``root`` (symlinks not followed, FIFOs not opened): kind, size, mtime, content hash."""
    out: Dict[str, list] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ["link", os.readlink(path)]
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ["file", st.st_size, st.st_mtime_ns, file_sha(path)]
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ["dir"]
            else:
                out[rel] = ["other", stat.S_IFMT(st.st_mode), st.st_mtime_ns]
    return out


def tree_diff(before: Dict[str, list], after: Dict[str, list]) -> List[str]:
    out = [f"created {p}" for p in sorted(set(after) - set(before))]
    out += [f"removed {p}" for p in sorted(set(before) - set(after))]
    out += [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return out


# ====================================================================================== pickle assembly by opcodes
class Op(bytes):
    """Opcodes already assembled (``emit`` copies them as they are)."""


def emit(value: Any) -> bytes:
    """The opcodes that push ``value`` (plain data, or ``Op`` pieces anywhere inside it)."""
    if isinstance(value, Op):
        return bytes(value)
    if value is None:
        return pickle.NONE
    if value is True:
        return pickle.NEWTRUE
    if value is False:
        return pickle.NEWFALSE
    if isinstance(value, int):
        if -2 ** 31 <= value < 2 ** 31:
            return pickle.BININT + struct.pack("<i", value)
        raw = pickle.encode_long(value)
        if len(raw) < 256:
            return pickle.LONG1 + bytes([len(raw)]) + raw
        return pickle.LONG4 + struct.pack("<i", len(raw)) + raw
    if isinstance(value, float):
        return pickle.BINFLOAT + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw
    if isinstance(value, (bytes, bytearray)):
        return pickle.BINBYTES + struct.pack("<I", len(value)) + bytes(value)
    if isinstance(value, tuple):
        return pickle.MARK + b"".join(emit(v) for v in value) + pickle.TUPLE
    if isinstance(value, list):
        return pickle.EMPTY_LIST + (pickle.MARK + b"".join(emit(v) for v in value) + pickle.APPENDS if value else b"")
    if isinstance(value, dict):
        body = b"".join(emit(k) + emit(v) for k, v in value.items())
        return pickle.EMPTY_DICT + (pickle.MARK + body + pickle.SETITEMS if value else b"")
    raise TypeError(f"emit: {type(value).__name__}")


def glob_op(module: str, name: str) -> Op:
    """GLOBAL ``module.name`` (protocol 0-style, accepted at any protocol)."""
    return Op(pickle.GLOBAL + f"{module}\n{name}\n".encode())


def stack_global(module: str, name: str) -> Op:
    """STACK_GLOBAL (protocol 4; dotted names such as ``Path.touch`` are resolved attribute by attribute)."""
    return Op(emit(module) + emit(name) + pickle.STACK_GLOBAL)


def call(fn: Any, *args: Any) -> Op:
    """``fn(*args)`` through REDUCE."""
    return Op(emit(fn) + emit(tuple(args)) + pickle.REDUCE)


def program(top: Any, proto: int = 4) -> bytes:
    return pickle.PROTO + bytes([proto]) + emit(top) + pickle.STOP


def put(i: int) -> bytes:
    return pickle.BINPUT + bytes([i]) if i < 256 else pickle.LONG_BINPUT + struct.pack("<I", i)


def get(i: int) -> bytes:
    return pickle.BINGET + bytes([i]) if i < 256 else pickle.LONG_BINGET + struct.pack("<I", i)


def shared_nest(levels: int, kind: str = "tuple") -> Op:
    """Each level holds the previous one twice through the memo: ``levels`` opcodes, 2**levels leaves when walked."""
    ops = emit("lol") + put(0) + pickle.POP
    for i in range(1, levels + 1):
        if kind == "tuple":
            ops += get(i - 1) + get(i - 1) + pickle.TUPLE2
        elif kind == "list":
            ops += pickle.EMPTY_LIST + pickle.MARK + get(i - 1) + get(i - 1) + pickle.APPENDS
        elif kind == "dict":
            ops += pickle.EMPTY_DICT + pickle.MARK + emit("a") + get(i - 1) + emit("b") + get(i - 1) + pickle.SETITEMS
        else:
            raise ValueError(kind)
        ops += put(i) + pickle.POP
    return Op(ops + get(levels))


def in_state(payload: Any, key: str = "shadow") -> bytes:
    """A ``.pdema``-looking dict holding ``payload`` under ``key``."""
    return program({"format": "ema-callback/3", "num_steps": 1, key: payload})


# ====================================================================================== manifests
class Manifest:
    """One category's files and expectations; ``save`` writes ``manifest.json`` for the child."""

    def __init__(self, root: str, category: str, op: str, **setup: Any):
        self.root = os.path.abspath(root)
        self.category = category
        self.op = op
        self.setup = setup
        self.entries: List[Dict[str, Any]] = []
        self.files = os.path.join(self.root, "files")
        os.makedirs(self.files, exist_ok=True)

    def add(self, name: str, data: Optional[bytes] = None, expect: str = "refuse", path: Optional[str] = None,
            op: Optional[str] = None, filename: Optional[str] = None, **extra: Any) -> str:
        """An entry: ``data`` written to ``files/<filename or name>`` (or an existing ``path``)."""
        if path is None:
            path = os.path.join(self.files, filename or name)
            with open(path, "wb") as handle:
                handle.write(data)
        nbytes = extra.pop("nbytes", None)
        if nbytes is None:
            nbytes = os.path.getsize(path)
        entry = {"name": name, "path": path, "bytes": nbytes, "expect": expect, "op": op or self.op,
                 "kill_after": extra.pop("kill_after", kill_after(nbytes))}
        entry.setdefault("names", [path])
        entry.update(extra)
        self.entries.append(entry)
        return path

    def save(self) -> str:
        path = os.path.join(self.root, "manifest.json")
        with open(path, "w") as handle:
            json.dump({"category": self.category, "root": self.root, "setup": self.setup,
                       "entries": self.entries}, handle, indent=1)
        return path


# ====================================================================================== valid files (paddle.save)
def _nested_for_save():
    import paddle

    return {"t": paddle.to_tensor(np.arange(4, dtype="float32")), "list": [paddle.ones([2], "int64"), 3.5, "s"],
            "np": np.float16(2.5), "ints": paddle.to_tensor(np.arange(6, dtype="int32").reshape(2, 3))}


def valid_files(root: str) -> List[Dict[str, Any]]:
    """Valid ``paddle.save`` files (name, path): layer and optimizer state dicts (protocols 2-4), a 4 MB layer,
    a nested structure, and a ``.pdema`` with raw weights. Written by paddle itself."""
    import paddle
    from conftest import make_net

    os.makedirs(root, exist_ok=True)
    net = make_net(0)
    out = []

    def save(name, obj, **kw):
        path = os.path.join(root, name)
        paddle.save(obj, path, **kw)
        out.append({"name": name, "path": path})

    save("layer.pdparams", net.state_dict())
    save("layer_protocol3.pdparams", net.state_dict(), protocol=3)
    save("layer_protocol2.pdparams", net.state_dict(), protocol=2)  # bytes as _codecs.encode(str, 'latin1')
    scheduler = paddle.optimizer.lr.StepDecay(learning_rate=0.1, step_size=2)
    opt = paddle.optimizer.Adam(learning_rate=scheduler, parameters=net.parameters())
    net(paddle.randn([2, 3, 8, 8])).mean().backward()
    opt.step()
    scheduler.step()
    save("adam.pdopt", opt.state_dict())
    momentum = paddle.optimizer.Momentum(learning_rate=0.1, parameters=net.parameters())
    net(paddle.randn([2, 3, 8, 8])).mean().backward()
    momentum.step()
    save("momentum.pdopt", momentum.state_dict())
    paddle.seed(5)
    save("linear_1000x1000.pdparams", paddle.nn.Linear(1000, 1000).state_dict())
    save("nested.pdparams", _nested_for_save())
    ema, net2 = make_engine({"seed": 3, "config": ENGINE_CONFIG, "steps": 4}, os.path.join(root, "posthoc"))
    path = os.path.join(root, "engine.pdema")
    ema.save(path, extra={"raw_weights": {k: v.numpy() for k, v in net2.state_dict().items()}})
    out.append({"name": "engine.pdema", "path": path})
    return out


def build_valid(root: str) -> str:
    """Category ``valid``: every valid file must load through ``checked_load`` as ``paddle.load(return_numpy=True)``
    returns it, within the bounds."""
    import paddle

    m = Manifest(root, "valid", "checked_load")
    for item in valid_files(os.path.join(m.root, "valid")):
        expected = canon_hash(paddle.load(item["path"], return_numpy=True))
        # protocol 2 pickles bytes through the global _codecs.encode: loading it is allowed, not required
        expect = "either" if "protocol2" in item["name"] else "load"
        m.add(item["name"], path=item["path"], expect=expect, expect_hash=expected, valid=True)
    return m.save()


# ====================================================================================== G: pickle-specific hostiles
def build_shared_bombs(root: str) -> str:
    """Category ``shared_bombs``: structures whose walk (or hash, or repr) is exponential in their byte size."""
    m = Manifest(root, "shared_bombs", "checked_load")
    for levels in (30, 45, 60):
        m.add(f"tuple{levels}_dict_value.pdparams", in_state(shared_nest(levels)))
    m.add("tuple30_top_level.pdparams", program(shared_nest(30)))
    m.add("tuple40_dict_key.pdparams", program(Op(pickle.EMPTY_DICT + shared_nest(40) + emit(1) + pickle.SETITEM)))
    m.add("tuple40_ordereddict_key.pdparams",
          program(Op(call(glob_op("collections", "OrderedDict")) + shared_nest(40) + emit(1) + pickle.SETITEM)))
    m.add("tuple40_builtins_dict_key.pdparams", in_state(call(glob_op("builtins", "dict"), [(shared_nest(40), 1)])))
    m.add("tuple40_in_set.pdparams",
          in_state(Op(pickle.EMPTY_SET + pickle.MARK + shared_nest(40) + pickle.ADDITEMS)))
    m.add("tuple40_in_frozenset.pdparams", in_state(Op(pickle.MARK + shared_nest(40) + pickle.FROZENSET)))
    m.add("tuple40_builtins_frozenset.pdparams", in_state(call(glob_op("builtins", "frozenset"), [shared_nest(40)])))
    m.add("list30_dict_value.pdparams", in_state(shared_nest(30, "list")))
    m.add("dict30_dict_value.pdparams", in_state(shared_nest(30, "dict")))
    m.add("builtins_str_of_tuple40.pdparams", in_state(call(glob_op("builtins", "str"), shared_nest(40))))
    m.add("builtins_str_of_list30.pdparams", in_state(call(glob_op("builtins", "str"), shared_nest(30, "list"))))
    m.add("builtins_tuple_of_tuple40.pdparams", in_state(call(glob_op("builtins", "tuple"), shared_nest(40))))
    return m.save()


def _ndarray_pickle(arr: np.ndarray) -> Op:
    """The opcodes numpy's own reduction emits for ``arr`` (no PROTO/STOP)."""
    raw = pickle.dumps(arr, protocol=3)  # protocol 3: bytes as BINBYTES (2 would name _codecs.encode)
    return Op(raw[2:-1])


def _many_nones(count: int) -> bytes:
    body = b"".join(pickle.MARK + pickle.NONE * min(1000, count - i) + pickle.APPENDS for i in range(0, count, 1000))
    return pickle.PROTO + b"\x04" + pickle.EMPTY_DICT + emit("shadow") + pickle.EMPTY_LIST + body + pickle.SETITEM + \
        pickle.STOP


def build_allocation_bombs(root: str) -> str:
    """Category ``allocation_bombs``: small files that ask the loader to allocate far more than their size."""
    m = Manifest(root, "allocation_bombs", "checked_load")
    nd = glob_op("numpy", "ndarray")
    recon = glob_op("numpy.core.multiarray", "_reconstruct")
    m.add("bytearray_1e9.pdparams", in_state(call(glob_op("builtins", "bytearray"), 10 ** 9)))
    m.add("twenty_bytearray_1e9.pdparams", in_state([call(glob_op("builtins", "bytearray"), 10 ** 9)] * 20))
    m.add("inst_bytearray_1e9.pdparams",
          in_state(Op(pickle.MARK + emit(10 ** 9) + pickle.INST + b"builtins\nbytearray\n")))
    m.add("numpy_ndarray_1e9_float64.pdparams", in_state(call(nd, (10 ** 9,))))
    m.add("numpy_ndarray_1e8_float64.pdparams", in_state(call(nd, (10 ** 8,))))
    m.add("numpy_ndarray_1e9_uint8.pdparams", in_state(call(nd, (10 ** 9,), "u1")))
    m.add("reconstruct_1e9_uint8.pdparams", in_state(call(recon, nd, (10 ** 9,), b"b")))
    m.add("reconstruct_2pow62.pdparams", in_state(call(recon, nd, (2 ** 62,), b"b")))
    m.add("reconstruct_negative_shape.pdparams", in_state(call(recon, nd, (-1,), b"b")))
    m.add("reconstruct_tuple_subtype.pdparams", in_state(call(recon, glob_op("builtins", "tuple"), (0,), b"b")))
    m.add("reconstruct_bytearray_subtype.pdparams",
          in_state(call(recon, glob_op("builtins", "bytearray"), (10 ** 9,), b"b")))
    big_void = call(glob_op("numpy", "dtype"), "V1099511627776")
    m.add("reconstruct_1TB_void_dtype.pdparams", in_state(call(recon, nd, (1,), big_void)))
    # _reconstruct then a BUILD whose state declares 10**9 elements of a few bytes of data
    state = (1, (10 ** 9,), call(glob_op("numpy", "dtype"), "f4"), False, b"\x00" * 16)
    m.add("ndarray_setstate_1e9_short_data.pdparams",
          in_state(Op(call(recon, nd, (0,), b"b") + emit(state) + pickle.BUILD)))
    m.add("scalar_huge_void.pdparams", in_state(call(glob_op("numpy.core.multiarray", "scalar"), big_void, b"")))
    m.add("object_ndarray.pdparams",
          program({"format": "ema-callback/3", "shadow": {"0.weight": _ndarray_pickle(
              np.array([1, "x", None, (2, 3)], dtype=object))}}))
    m.add("object_ndarray_top_level.pdparams", _ndarray_pickle_file(np.array([{"a": 1}, [1, 2]], dtype=object)))
    m.add("eval_code_string.pdparams",
          in_state(call(glob_op("builtins", "eval"), "__import__('os').getpid()")))
    m.add("eval_data_not_array.pdparams", in_state(call(glob_op("builtins", "eval"), "data", {"data": 5})))
    m.add("eval_three_args.pdparams",
          in_state(call(glob_op("builtins", "eval"), "data", {"data": _ndarray_pickle(np.zeros(2))}, {})))
    m.add("eval_one_arg.pdparams", in_state(call(glob_op("builtins", "eval"), "1+1")))
    m.add("big_params_bad_slices.pdparams",
          program({"w": _ndarray_pickle(np.zeros(4, "float32")),
                   "UnpackBigParamInfor@@": {"w": {"slices": ["w@@.0", "w@@.1"], "OriginShape": (10 ** 9,)}}}))
    m.add("big_params_info_not_dict.pdparams", program({"UnpackBigParamInfor@@": 5}))
    m.add("big_params_huge_origin_shape.pdparams",
          program({"w@@.0": _ndarray_pickle(np.zeros(4, "float32")),
                   "UnpackBigParamInfor@@": {"w": {"slices": ["w@@.0"], "OriginShape": (2 ** 40, 2 ** 40)}}}))
    m.add("int_from_1MB_digits.pdparams", in_state(call(glob_op("builtins", "int"), "9" * 10 ** 6)))
    m.add("two_million_none.pdparams", _many_nones(2 * 10 ** 6), expect="either")
    # keys made to collide in the hash table (CPython hashes ints modulo 2**61 - 1): quadratic to insert
    collide = [i * (2 ** 61 - 1) for i in range(40000)]
    m.add("colliding_int_keys.pdparams", pickle.dumps({k: 0 for k in collide}, protocol=4))
    m.add("colliding_int_set.pdparams", pickle.dumps({"s": set(collide)}, protocol=4))
    m.add("colliding_int_frozenset.pdparams", pickle.dumps({"s": frozenset(collide)}, protocol=4))
    m.add("colliding_float_keys.pdparams", pickle.dumps({float(k): 0 for k in collide[:5000]}, protocol=4))
    # decoders that are slow (punycode is quadratic) or unknown (a LookupError)
    m.add("str_punycode_160KB.pdparams", in_state(call(glob_op("builtins", "str"), b"a" * 160000 + b"-", "punycode")))
    m.add("str_unknown_codec.pdparams", in_state(call(glob_op("builtins", "str"), b"x", "nope")))
    m.add("bytearray_zlib_codec.pdparams", in_state(call(glob_op("builtins", "bytearray"), "x", "zlib_codec")))
    m.add("long4_4KB.pdparams", in_state(Op(pickle.LONG4 + struct.pack("<i", 4096) + b"\x7f" * 4096)))
    return m.save()


def _ndarray_pickle_file(arr: np.ndarray) -> bytes:
    return pickle.dumps(arr, protocol=4)


def build_lying_opcodes(root: str) -> str:
    """Category ``lying_opcodes``: lengths that lie, opcodes a paddle.save file never holds, deep nesting."""
    m = Manifest(root, "lying_opcodes", "checked_load")
    few = b"only a few bytes"
    m.add("binbytes8_2pow40.pdparams", in_state(Op(pickle.BINBYTES8 + struct.pack("<Q", 2 ** 40) + few)))
    m.add("bytearray8_2pow40.pdparams", in_state(Op(pickle.BYTEARRAY8 + struct.pack("<Q", 2 ** 40) + few)))
    m.add("binunicode8_2pow40.pdparams", in_state(Op(pickle.BINUNICODE8 + struct.pack("<Q", 2 ** 40) + few)))
    m.add("binunicode_4GB.pdparams", in_state(Op(pickle.BINUNICODE + struct.pack("<I", 2 ** 32 - 1) + few)))
    m.add("long4_2GB.pdparams", pickle.PROTO + b"\x02" + pickle.LONG4 + struct.pack("<i", 2 ** 31 - 1) + few)
    m.add("frame_2pow40.pdparams", pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 2 ** 40) +
          emit({"a": 1}) + pickle.STOP)
    m.add("frame_longer_than_file.pdparams", pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 64) +
          emit({"a": 1}) + pickle.STOP)
    m.add("eleven_bytes.pdparams", pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 2 ** 62))
    m.add("one_byte.pdparams", b"\x80")
    m.add("empty.pdparams", b"")
    m.add("text_not_pickle.pdparams", b"hello, this is not a pickle\n")
    m.add("zip_not_pickle.pdparams", b"PK\x03\x04" + b"\x00" * 60)
    m.add("unknown_opcode.pdparams", pickle.PROTO + b"\x04" + b"\xff" + pickle.STOP)
    m.add("no_stop.pdparams", program({"a": 1})[:-1])
    m.add("get_undefined_memo.pdparams", pickle.PROTO + b"\x04" + get(7) + pickle.STOP)
    m.add("pop_empty_stack.pdparams", pickle.PROTO + b"\x04" + pickle.POP + pickle.STOP)
    m.add("appends_to_a_string.pdparams", pickle.PROTO + b"\x04" + emit("s") + pickle.MARK + emit(1) + pickle.APPENDS +
          pickle.STOP)
    m.add("setitems_on_a_list.pdparams", pickle.PROTO + b"\x04" + pickle.EMPTY_LIST + pickle.MARK + emit(1) + emit(2) +
          pickle.SETITEMS + pickle.STOP)
    m.add("persid.pdparams", pickle.PROTO + b"\x02" + pickle.PERSID + b"0\n" + pickle.STOP)
    m.add("binpersid.pdparams", in_state(Op(emit("x") + pickle.BINPERSID)))
    m.add("ext1.pdparams", in_state(Op(pickle.EXT1 + b"\x01")))
    m.add("ext2.pdparams", in_state(Op(pickle.EXT2 + struct.pack("<H", 0x1234))))
    m.add("ext4.pdparams", in_state(Op(pickle.EXT4 + struct.pack("<i", 0x123456))))
    m.add("inst_os_system.pdparams", in_state(Op(pickle.MARK + emit("true") + pickle.INST + b"os\nsystem\n")))
    m.add("obj_subprocess_popen.pdparams",
          in_state(Op(pickle.MARK + glob_op("subprocess", "Popen") + emit(["true"]) + pickle.OBJ)))
    m.add("newobj_bytearray_1e9.pdparams",
          in_state(Op(glob_op("builtins", "bytearray") + emit((10 ** 9,)) + pickle.NEWOBJ)), expect="either")
    m.add("build_attributes_on_ordereddict.pdparams",
          in_state(Op(call(glob_op("collections", "OrderedDict")) + emit({"__class__": 1, "x": 2}) + pickle.BUILD)),
          expect="either")
    n = 100_000
    m.add("nested_lists_100000.pdparams",
          pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * n + pickle.APPEND * (n - 1) + pickle.STOP)
    m.add("nested_lists_100000_in_state.pdparams",
          in_state(Op(pickle.EMPTY_LIST * n + pickle.APPEND * (n - 1))))
    m.add("nested_tuples_100000.pdparams",
          pickle.PROTO + b"\x02" + pickle.EMPTY_TUPLE + pickle.TUPLE1 * n + pickle.STOP)
    m.add("nested_tuples_100000_as_dict_key.pdparams",
          pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * n + emit(1) +
          pickle.SETITEM + pickle.STOP)
    m.add("nested_dicts_100000.pdparams",
          pickle.PROTO + b"\x02" + (pickle.EMPTY_DICT + emit("k")) * n + pickle.EMPTY_DICT + pickle.SETITEM * n +
          pickle.STOP)
    return m.save()


def _touch_path() -> str:
    return shutil.which("touch") or "/usr/bin/touch"


def code_global_payloads(marker: str, canary: str, canary_dir: str, aux: str) -> Dict[str, Any]:
    """kind -> payload opcodes; running any of them would create ``marker`` (or a file whose name starts with it),
    or destroy ``canary``/``canary_dir``. ``aux`` is a folder for helper files (an inner pickle, a script)."""
    touch = _touch_path()
    write_marker = f"open({marker!r}, 'w').close()"
    inner = os.path.join(aux, os.path.basename(marker) + ".inner.pkl")
    inner_bytes = program(call(glob_op("os", "system"), f"touch {marker}"))
    with open(inner, "wb") as handle:
        handle.write(inner_bytes)
    script = os.path.join(aux, os.path.basename(marker) + ".script.py")
    with open(script, "w") as handle:
        handle.write(write_marker + "\n")
    os_module = glob_op("posixpath", "os")  # find_class('posixpath', 'os') is the os module itself
    code = compile(write_marker, "<hostile>", "exec")
    g = glob_op
    out = {
        "os.system": call(g("os", "system"), f"touch {marker}"),
        "posix.system": call(g("posix", "system"), f"touch {marker}"),
        "os.popen": call(g("os", "popen"), f"touch {marker}"),
        "subprocess.Popen": call(g("subprocess", "Popen"), ["touch", marker]),
        "subprocess.call": call(g("subprocess", "call"), ["touch", marker]),
        "subprocess.check_call": call(g("subprocess", "check_call"), ["touch", marker]),
        "subprocess.check_output": call(g("subprocess", "check_output"), ["touch", marker]),
        "subprocess.run": call(g("subprocess", "run"), ["touch", marker]),
        "subprocess.getoutput": call(g("subprocess", "getoutput"), f"touch {marker}"),
        "subprocess.getstatusoutput": call(g("subprocess", "getstatusoutput"), f"touch {marker}"),
        "os.spawnv": call(g("os", "spawnv"), 0, touch, ["touch", marker]),
        "os.posix_spawn": call(g("os", "posix_spawn"), touch, ["touch", marker], {}),
        "multiprocessing.util.spawnv_passfds": call(g("multiprocessing.util", "spawnv_passfds"), os.fsencode(touch),
                                                    ["touch", marker], ()),
        "builtins.exec": call(g("builtins", "exec"), write_marker),
        "builtins.eval": call(g("builtins", "eval"), f"exec({write_marker!r})"),
        "builtins.open": call(g("builtins", "open"), marker, "w"),
        "io.open": call(g("io", "open"), marker, "w"),
        "_io.open": call(g("_io", "open"), marker, "w"),
        "io.FileIO": call(g("io", "FileIO"), marker, "w"),
        "codecs.open": call(g("codecs", "open"), marker, "w"),
        "os.open": call(g("os", "open"), marker, os.O_CREAT | os.O_WRONLY),
        "builtins.__import__+getattr": call(call(g("builtins", "getattr"), call(g("builtins", "__import__"), "os"),
                                                 "system"), f"touch {marker}"),
        "builtins.getattr": call(call(g("builtins", "getattr"), os_module, "system"), f"touch {marker}"),
        "importlib.import_module": call(call(g("builtins", "getattr"),
                                             call(g("importlib", "import_module"), "os"), "system"), f"touch {marker}"),
        "posixpath.os (a module as a global)": g("posixpath", "os"),
        "operator.attrgetter": call(call(call(g("operator", "attrgetter"), "system"), os_module), f"touch {marker}"),
        "operator.methodcaller": call(call(g("operator", "methodcaller"), "system", f"touch {marker}"), os_module),
        "functools.partial": call(call(g("functools", "partial"), g("os", "system"), f"touch {marker}")),
        "builtins.map+list": call(g("builtins", "list"), call(g("builtins", "map"), g("os", "system"),
                                                              [f"touch {marker}"])),
        "copyreg._reconstructor": call(g("copyreg", "_reconstructor"), g("subprocess", "Popen"),
                                       g("subprocess", "Popen"), ["touch", marker]),
        "copyreg.__newobj__": call(g("copyreg", "__newobj__"), g("subprocess", "Popen")),
        "numpy.load(allow_pickle)": call(g("numpy", "load"), inner, None, True),
        "numpy.save": call(g("numpy", "save"), marker, [1]),
        "numpy.savetxt": call(g("numpy", "savetxt"), marker, [1.0]),
        "numpy.memmap": call(g("numpy", "memmap"), marker, "uint8", "w+", 0, (4,)),
        "numpy.frombuffer": call(g("numpy", "frombuffer"), b"abcd", "u1"),
        "numpy.fromfile": call(g("numpy", "fromfile"), "/etc/passwd", "u1"),
        "numpy.testing runstring": call(g("numpy.testing._private.utils", "runstring"), write_marker, {}),
        "numpy.f2py myeval": call(g("numpy.f2py.crackfortran", "myeval"), f"exec({write_marker!r})"),
        "pickle.loads": call(g("pickle", "loads"), inner_bytes),
        "_pickle.loads": call(g("_pickle", "loads"), inner_bytes),
        "marshal.loads+types.FunctionType": call(call(g("types", "FunctionType"),
                                                      call(g("marshal", "loads"), __import__("marshal").dumps(code)),
                                                      {})),
        "timeit.timeit": call(g("timeit", "timeit"), write_marker, "pass", g("time", "perf_counter"), 1),
        "pydoc.pipepager": call(g("pydoc", "pipepager"), "x", f"touch {marker}"),
        "runpy.run_path": call(g("runpy", "run_path"), script),
        "yaml.unsafe_load": call(g("yaml", "unsafe_load"), f"!!python/object/apply:os.system ['touch {marker}']"),
        "paddle.load": call(g("paddle", "load"), inner),
        "logging.FileHandler": call(g("logging", "FileHandler"), marker),
        "zipfile.ZipFile": call(g("zipfile", "ZipFile"), marker, "w"),
        "tarfile.open": call(g("tarfile", "open"), marker, "w"),
        "gzip.open": call(g("gzip", "open"), marker, "wb"),
        "tempfile.mkstemp": call(g("tempfile", "mkstemp"), "", os.path.basename(marker), os.path.dirname(marker)),
        "shelve.open": call(g("shelve", "open"), marker),
        "os.mkdir": call(g("os", "mkdir"), marker),
        "os.makedirs": call(g("os", "makedirs"), marker),
        "os.symlink": call(g("os", "symlink"), canary, marker),
        "os.link": call(g("os", "link"), canary, marker),
        "shutil.copyfile": call(g("shutil", "copyfile"), canary, marker),
        "shutil.move": call(g("shutil", "move"), canary, marker),
        "os.rename": call(g("os", "rename"), canary, marker),
        "os.remove": call(g("os", "remove"), canary),
        "os.truncate": call(g("os", "truncate"), canary, 0),
        "shutil.rmtree": call(g("shutil", "rmtree"), canary_dir),
        "os.kill(getpid, 0)": call(g("os", "kill"), call(g("os", "getpid")), 0),
        "ctypes.CDLL": call(g("ctypes", "CDLL"), None),
        "sys.modules": g("sys", "modules"),
        "STACK_GLOBAL os.system": call(stack_global("os", "system"), f"touch {marker}"),
        "STACK_GLOBAL pathlib Path.touch": call(stack_global("pathlib", "Path.touch"),
                                                call(g("pathlib", "PosixPath"), marker)),
        "INST os.system": Op(pickle.MARK + emit(f"touch {marker}") + pickle.INST + b"os\nsystem\n"),
        "OBJ subprocess.Popen": Op(pickle.MARK + g("subprocess", "Popen") + emit(["touch", marker]) + pickle.OBJ),
    }
    return out


# kinds that name a forbidden global but have no visible effect when run (the rest create their marker or destroy
# their canary under plain pickle.loads: test_the_code_globals_run_code_under_plain_pickle proves it)
NO_VISIBLE_EFFECT = {"copyreg.__newobj__", "numpy.frombuffer", "numpy.fromfile", "os.kill(getpid, 0)", "ctypes.CDLL",
                     "sys.modules", "posixpath.os (a module as a global)"}


def _slug(kind: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in kind).strip("_")


def build_code_globals(root: str) -> str:
    """Category ``code_globals``: one file per code-running global; each would create its marker (or destroy its
    canary) if it ran. Markers and canaries are checked by the parent after the child is gone."""
    m = Manifest(root, "code_globals", "checked_load")
    markers, canaries, aux = (os.path.join(m.root, d) for d in ("markers", "canaries", "aux"))
    for folder in (markers, canaries, aux):
        os.makedirs(folder, exist_ok=True)
    kinds = code_global_payloads(os.path.join(markers, "probe"), os.path.join(canaries, "probe"),
                                 os.path.join(canaries, "probe.d"), aux).keys()
    for kind in kinds:
        slug = _slug(kind)
        marker, canary, canary_dir = (os.path.join(markers, slug), os.path.join(canaries, slug),
                                      os.path.join(canaries, slug + ".d"))
        with open(canary, "w") as handle:
            handle.write("canary " + slug)
        os.makedirs(canary_dir, exist_ok=True)
        with open(os.path.join(canary_dir, "keep"), "w") as handle:
            handle.write("keep")
        payload = code_global_payloads(marker, canary, canary_dir, aux)[kind]
        data = in_state(payload) if not kind.startswith(("INST", "OBJ")) else program({"shadow": payload}, proto=2)
        m.add(f"{slug}.pdparams", data, kind=kind, marker=marker, canary=canary, canary_text="canary " + slug,
              canary_dir=canary_dir)
    for stale in glob.glob(os.path.join(markers, "probe*")) + glob.glob(os.path.join(aux, "probe*")):
        os.remove(stale)
    return m.save()


def build_truncated_pickles(root: str) -> str:
    """Category ``truncated_pickles``: valid files cut at every 1/50 of their length (a crash mid-write)."""
    m = Manifest(root, "truncated_pickles", "checked_load")
    valid = {v["name"]: v["path"] for v in valid_files(os.path.join(m.root, "valid"))}
    for name in ("layer.pdparams", "adam.pdopt", "engine.pdema", "layer_protocol2.pdparams"):
        with open(valid[name], "rb") as handle:
            data = handle.read()
        for k in range(1, 50):
            cut = len(data) * k // 50
            m.add(f"{name}@{k:02d}of50.pdparams", data[:cut], filename=f"{name}.cut{k:02d}")
        m.add(f"{name}@minus1byte", data[:-1], filename=f"{name}.minus1")
    return m.save()


# ====================================================================================== engines and .pdema files
ENGINE_CONFIG = {"decay": 0.9, "buffers": "copy",
                 "posthoc": {"sigma_rels": [0.05, 0.1], "snapshot_every": 100000, "snapshot_dtype": "float32"}}


def make_engine(spec: Dict[str, Any], posthoc_dir: str):
    """(engine, net): ``make_net(seed)`` with an engine of ``spec['config']``, stepped ``spec['steps']`` times over
    real SGD steps (so every counter and array is non-trivial)."""
    import copy

    from conftest import make_net, train_steps

    from ema_callback.config.schema import EMAConfig
    from ema_callback.core.engine import ExponentialMovingAverage

    block = copy.deepcopy(spec["config"])
    if "posthoc" in block:
        block["posthoc"]["dir"] = posthoc_dir
    net = make_net(spec["seed"])
    ema = ExponentialMovingAverage(net, EMAConfig.from_block(block))
    if spec.get("steps"):
        import paddle

        for state in train_steps(net, spec["steps"], seed=spec["seed"]):
            net.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
            ema.step()
    return ema, net


def write_base_pdema(folder: str, name: str = "0.pdema") -> Dict[str, Any]:
    """A valid ``.pdema`` written by ``ExponentialMovingAverage.save`` with the raw weights as extra (as
    ``EMACallback.save_state``); returns its path and the engine spec the child rebuilds."""
    os.makedirs(folder, exist_ok=True)
    spec = {"seed": 7, "config": ENGINE_CONFIG, "steps": 5}
    ema, net = make_engine(spec, os.path.join(os.path.dirname(folder), "posthoc"))  # the reader's folder too
    path = os.path.join(folder, name)
    ema.save(path, extra={"raw_weights": {k: v.numpy() for k, v in net.state_dict().items()}})
    return {"path": path, "saved_engine_hash": canon_hash(ema.state_dict())}


def _engine_setup(m: Manifest, base: Dict[str, Any]) -> None:
    m.setup.update({"engine": {"seed": 11, "config": ENGINE_CONFIG, "steps": 2}, "reference": base["path"],
                    "saved_engine_hash": base["saved_engine_hash"]})


def _load_trusted(path: str) -> Dict[str, Any]:
    """Our own valid file, read by paddle itself (trusted: the generator wrote it a moment ago)."""
    import paddle

    return paddle.load(path, return_numpy=True)


def _save(obj: Any, path: str) -> str:
    import paddle

    paddle.save(obj, path)
    return path


def build_pdema_engine(root: str) -> str:
    """Category ``pdema_engine`` (contract B): hostile pickles planted as ``.pdema`` and read through ``read_state``
    and ``ExponentialMovingAverage.load``: refused as in A, the engine and the model left exactly as they were."""
    m = Manifest(root, "pdema_engine", "engine_load")
    base = write_base_pdema(os.path.join(m.root, "base"))
    _engine_setup(m, base)
    with open(base["path"], "rb") as handle:
        valid = handle.read()
    hostile = {
        "tuple40_dict_value": in_state(shared_nest(40)),
        "bytearray_1e9": in_state(call(glob_op("builtins", "bytearray"), 10 ** 9)),
        "numpy_ndarray_1e9_uint8": in_state(call(glob_op("numpy", "ndarray"), (10 ** 9,), "u1")),
        "os_system": in_state(call(glob_op("os", "system"), "true")),
        "truncated_half": valid[:len(valid) // 2],
        "nested_lists_100000": in_state(Op(pickle.EMPTY_LIST * 100000 + pickle.APPEND * 99999)),
        "not_a_dict": program([1, 2, 3]),
        "empty": b"",
    }
    for op in ("engine_load", "read_state"):
        m.add(f"valid_base.pdema [{op}]", path=base["path"], expect="load", op=op, identical=True,
              names=[base["path"]])
        for name, data in hostile.items():
            m.add(f"{name}.pdema [{op}]", data, op=op, filename=f"{name}.{op}.pdema")
    return m.save()


def resign(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` with its ``digest`` recomputed over every other entry (contract C)."""
    from ema_callback.files.state_file import payload_digest  # lazily: it is new in ema-callback/3

    out = {k: v for k, v in state.items() if k != "digest"}
    out["digest"] = payload_digest(dict(out))
    return out


def build_pdema_unsigned(root: str) -> str:
    """Category ``pdema_unsigned``: a saved ``.pdema`` with one value changed and the digest left as it was."""
    m = Manifest(root, "pdema_unsigned", "engine_load")
    base = write_base_pdema(os.path.join(m.root, "base"))
    _engine_setup(m, base)
    m.add("valid_base.pdema", path=base["path"], expect="load", identical=True)
    state = _load_trusted(base["path"])

    def edited(name: str, change: Callable[[Dict[str, Any]], None], must_say=("digest",)) -> None:
        s = _load_trusted(base["path"])
        change(s)
        path = _save(s, os.path.join(m.files, f"u{len(m.entries):02d}.pdema"))  # the path never says 'digest'
        m.add(name, path=path, must_say=list(must_say))

    first = sorted(state["shadow"])[0]
    raw_first = sorted(state["raw_weights"])[0]

    def nudge(section, key):
        def change(s):
            a = np.array(s[section][key], copy=True)
            a.reshape(-1).view(np.uint32)[0] ^= 1  # one ulp
            s[section][key] = a
        return change

    edited("num_steps_plus_1.pdema", lambda s: s.__setitem__("num_steps", s["num_steps"] + 1))
    edited("num_updates_minus_1.pdema", lambda s: s.__setitem__("num_updates", s["num_updates"] - 1))
    edited("decay_product_changed.pdema", lambda s: s.__setitem__("decay_product", s["decay_product"] * 0.5))
    edited("shadow_one_ulp.pdema", nudge("shadow", first))
    edited("raw_weights_one_ulp.pdema", nudge("raw_weights", raw_first))
    edited("copies_one_ulp.pdema", nudge("copies", sorted(state["copies"])[0]))
    edited("profile_shadow_one_ulp.pdema", lambda s: nudge("x", first)({"x": s["shadows"][0]}))
    edited("config_decay_changed.pdema", lambda s: s["config"].__setitem__("decay", 0.5))
    edited("labels_renamed.pdema", lambda s: s.__setitem__("labels", ["ema", "phema0.05", "phema0.2"]))
    edited("run_id_changed.pdema", lambda s: s.__setitem__("run_id", "fedcba987654"))
    edited("digest_removed.pdema", lambda s: s.pop("digest", None))
    edited("digest_garbage.pdema", lambda s: s.__setitem__("digest", "zz" * 32))
    edited("digest_of_empty.pdema", lambda s: s.__setitem__("digest", hashlib.sha256(b"").hexdigest()))
    edited("digest_not_a_string.pdema", lambda s: s.__setitem__("digest", 12345))
    edited("extra_entry_added.pdema", lambda s: s.__setitem__("evil", "x"))
    edited("raw_weight_removed.pdema", lambda s: s["raw_weights"].pop(raw_first))
    return m.save()


def field_corruptions(state: Dict[str, Any], outside: Dict[str, str]) -> List[tuple]:
    """(name, field, change) for every single-field corruption of contract C; ``change(s)`` edits a copy."""
    shadow_names = sorted(state["shadow"])
    first, second = shadow_names[0], shadow_names[1]
    copy_names = sorted(state["copies"])
    raw_names = sorted(state["raw_weights"])

    def setf(key, value):
        return lambda s: s.__setitem__(key, value)

    def delf(key):
        return lambda s: s.pop(key)

    def sub(section, fn):
        def change(s):
            fn(s[section])
        return change

    def setsub(section, key, value):
        return sub(section, lambda d: d.__setitem__(key, value))

    def with_nan(section, key, value=np.nan):
        def change(s):
            a = np.array(s[section][key], copy=True)
            a.reshape(-1)[0] = value
            s[section][key] = a
        return change

    def companion(suffix, sections=None):
        return setf("companions", [{"suffix": suffix, "sha1": outside["sha1"],
                                    "sections": sections if sections is not None else {"shadow": [first]}}])

    out = [
        ("format_deleted", "format", delf("format")),
        ("format_unknown", "format", setf("format", "ema-callback/9")),
        ("format_int", "format", setf("format", 3)),
        ("format_none", "format", setf("format", None)),
        ("num_steps_deleted", "num_steps", delf("num_steps")),
        ("num_steps_-5", "num_steps", setf("num_steps", -5)),
        ("num_steps_abc", "num_steps", setf("num_steps", "abc")),
        ("num_steps_2pow70", "num_steps", setf("num_steps", 2 ** 70)),
        ("num_steps_1.5", "num_steps", setf("num_steps", 1.5)),
        ("num_steps_list", "num_steps", setf("num_steps", [5])),
        ("num_steps_none", "num_steps", setf("num_steps", None)),
        ("num_updates_above_num_steps", "num_updates", lambda s: s.__setitem__("num_updates", s["num_steps"] + 1)),
        ("num_updates_negative", "num_updates", setf("num_updates", -1)),
        ("num_updates_abc", "num_updates", setf("num_updates", "abc")),
        ("num_skipped_negative", "num_skipped", setf("num_skipped", -1)),
        ("num_skipped_abc", "num_skipped", setf("num_skipped", "abc")),
        ("num_skipped_above_num_steps", "num_skipped", lambda s: s.__setitem__("num_skipped", s["num_steps"] + 1)),
        ("num_skipped_2pow70", "num_skipped", setf("num_skipped", 2 ** 70)),
        ("decay_product_nan", "decay_product", setf("decay_product", float("nan"))),
        ("decay_product_-1", "decay_product", setf("decay_product", -1.0)),
        ("decay_product_2", "decay_product", setf("decay_product", 2.0)),
        ("decay_product_abc", "decay_product", setf("decay_product", "abc")),
        ("decay_product_deleted", "decay_product", delf("decay_product")),
        ("last_decay_abc", "last_decay", setf("last_decay", "abc")),
        ("last_decay_1.5", "last_decay", setf("last_decay", 1.5)),
        ("last_decay_-0.5", "last_decay", setf("last_decay", -0.5)),
        ("last_decay_nan", "last_decay", setf("last_decay", float("nan"))),
        ("last_decay_list", "last_decay", setf("last_decay", [0.9])),
        ("decay_products_wrong_length", "decay_products", lambda s: s.__setitem__("decay_products",
                                                                                   s["decay_products"][:1])),
        ("decay_products_nan", "decay_products", lambda s: s.__setitem__("decay_products",
                                                                          [float("nan")] * len(s["decay_products"]))),
        ("decay_products_abc", "decay_products", setf("decay_products", "abc")),
        ("last_decays_wrong_length", "last_decays", lambda s: s.__setitem__("last_decays", s["last_decays"] * 2)),
        ("last_decays_abc", "last_decays", setf("last_decays", "abc")),
        ("config_string", "config", setf("config", "abc")),
        ("config_list", "config", setf("config", [1, 2])),
        ("config_unknown_key", "config", setsub("config", "decay_typo", 0.5)),
        ("config_decay_5", "config", setsub("config", "decay", 5)),
        ("config_deleted", "config", delf("config")),
        ("shadow_string", "shadow", setf("shadow", "abc")),
        ("shadow_list", "shadow", setf("shadow", [1, 2])),
        ("shadow_none", "shadow", setf("shadow", None)),
        ("shadow_name_missing", "shadow", sub("shadow", lambda d: d.pop(first))),
        ("shadow_extra_name", "shadow", setsub("shadow", "extra.weight", np.zeros(3, "float32"))),
        ("shadow_wrong_shape", "shadow", lambda s: s["shadow"].__setitem__(first,
                                                                             s["shadow"][first].reshape(1, -1))),
        ("shadow_int64", "shadow", lambda s: s["shadow"].__setitem__(first, s["shadow"][first].astype("int64"))),
        ("shadow_object_dtype", "shadow", lambda s: s["shadow"].__setitem__(first,
                                                                             s["shadow"][first].astype(object))),
        ("shadow_not_an_array", "shadow", setsub("shadow", first, "abc")),
        ("shadow_nan", "shadow", with_nan("shadow", first)),
        ("shadow_inf", "shadow", with_nan("shadow", second, np.inf)),
        ("shadows_not_a_list", "shadows", setf("shadows", "abc")),
        ("shadows_one_missing", "shadows", lambda s: s.__setitem__("shadows", s["shadows"][:1])),
        ("shadows_name_missing", "shadows", lambda s: s["shadows"][0].pop(first)),
        ("shadows_nan", "shadows", lambda s: with_nan("x", first)({"x": s["shadows"][1]})),
        ("copies_string", "copies", setf("copies", "abc")),
        ("copies_name_missing", "copies", sub("copies", lambda d: d.pop(copy_names[0]))),
        ("copies_extra_name", "copies", setsub("copies", "extra._mean", np.zeros(8, "float32"))),
        ("copies_wrong_shape", "copies", lambda s: s["copies"].__setitem__(copy_names[0],
                                                                            s["copies"][copy_names[0]][:3])),
        ("copies_object_dtype", "copies",
         lambda s: s["copies"].__setitem__(copy_names[0], s["copies"][copy_names[0]].astype(object))),
        ("labels_string", "labels", setf("labels", "abc")),
        ("labels_wrong_length", "labels", setf("labels", ["ema"])),
        ("labels_not_strings", "labels", setf("labels", [1, 2, 3])),
        ("raw_weights_one_of_n", "raw_weights",
         lambda s: s.__setitem__("raw_weights", {raw_names[0]: s["raw_weights"][raw_names[0]]})),
        ("raw_weights_wrong_shape", "raw_weights",
         lambda s: s["raw_weights"].__setitem__(raw_names[0], s["raw_weights"][raw_names[0]].reshape(1, -1))),
        ("raw_weights_extra_name", "raw_weights", setsub("raw_weights", "extra.weight", np.zeros(3, "float32"))),
        ("raw_weights_string", "raw_weights", setf("raw_weights", "abc")),
        ("companions_5", "companions", setf("companions", 5)),
        ("companions_junk_list", "companions", setf("companions", ["x", 3, None])),
        ("companions_etc_passwd", "companions", companion("/../../etc/passwd")),
        ("companions_dotdot", "companions", companion("../x.pdparams")),
        ("companions_traversal_to_valid_file", "companions", companion(outside["traversal_suffix"])),
        ("companions_absolute", "companions", companion(outside["absolute"])),
        ("companions_unknown_section", "companions", companion(".pdparams", {"evil": [first]})),
        ("run_id_traversal", "run_id", setf("run_id", "../../../x")),
        ("run_id_slash", "run_id", setf("run_id", "a/b")),
        ("run_id_500_chars", "run_id", setf("run_id", "a" * 500)),
        ("run_id_uppercase", "run_id", setf("run_id", "0123456789AB")),
        ("run_id_int", "run_id", setf("run_id", 5)),
        ("run_id_empty", "run_id", setf("run_id", "")),
    ]
    return out


def _companion_targets(folder: str, state: Dict[str, Any]) -> Dict[str, str]:
    """A valid companion (the shadow's arrays, their true fingerprint) in ``<folder>/outside``: reachable from
    ``<folder>/<name>.pdema`` only by a traversing suffix (``/../outside/x.pdparams``) or an absolute path, so a
    loader that follows such a suffix really reads it (and ``build_pdema_fields`` makes ``<prefix>/`` and
    ``<prefix>../x.pdparams`` exist for each companions case)."""
    from ema_callback.files.state_file import fingerprint

    arrays = {k: v for k, v in state["shadow"].items()}
    outside = os.path.join(folder, "outside")
    os.makedirs(outside, exist_ok=True)
    _save(arrays, os.path.join(outside, "x.pdparams"))
    return {"sha1": fingerprint(arrays), "traversal_suffix": "/../outside/x.pdparams",
            "absolute": os.path.join(outside, "x.pdparams")}


def build_pdema_fields(root: str) -> str:
    """Category ``pdema_fields``: single-field corruptions, re-signed with ``payload_digest``: refused by field
    validation, naming the file and the field."""
    m = Manifest(root, "pdema_fields", "engine_load")
    base = write_base_pdema(os.path.join(m.root, "base"))
    _engine_setup(m, base)
    state = _load_trusted(base["path"])
    if "digest" not in state:
        raise AssertionError(f"{base['path']}: ExponentialMovingAverage.save wrote no 'digest' (format "
                             f"{state.get('format')!r}): contract C (ema-callback/3) is not implemented yet")
    m.add("valid_base.pdema", path=base["path"], expect="load", identical=True)
    m.add("valid_base_resigned.pdema", path=_save(resign(state), os.path.join(m.files, "valid_base_resigned.pdema")),
          expect="load", identical=True)
    for i, (name, field, change) in enumerate(field_corruptions(state, _companion_targets(m.files, state))):
        s = _load_trusted(base["path"])
        change(s)
        path = os.path.join(m.files, f"c{i:03d}.pdema")  # a neutral name: the path never says the field
        if name.startswith("companions"):  # its prefix is a folder, so a traversing suffix really resolves
            os.makedirs(path[:-len(".pdema")], exist_ok=True)
            os.makedirs(path[:-len(".pdema")] + "..", exist_ok=True)
            _save({k: v for k, v in state["shadow"].items()}, os.path.join(path[:-len(".pdema")] + "..", "x.pdparams"))
        try:
            signed, must = resign(s), {"must_say": [field]}
            if name.endswith("object_dtype"):  # refused by the pickle reader itself, before any field is read
                must = {"must_say_any": [field, "no objects"]}
        except Exception as exc:  # the digest cannot even be computed over it: refused by the digest then
            signed, must = s, {"must_say_any": [field, "digest"], "note": f"payload_digest raised "
                                                                           f"{type(exc).__name__}"}
        _save(signed, path)
        m.add(f"{name}.pdema", path=path, field=field, **must)
    return m.save()


def build_pdema_bitflips(root: str, flips: int = 400, seed: int = 24) -> str:
    """Category ``pdema_bitflips`` (contract D): single-bit flips of a valid ``.pdema`` (seeded): each refused in one
    line naming the file, or loaded into a state identical bit for bit to the original."""
    m = Manifest(root, "pdema_bitflips", "engine_load")
    base = write_base_pdema(os.path.join(m.root, "base"))
    _engine_setup(m, base)
    with open(base["path"], "rb") as handle:
        data = handle.read()
    m.add("valid_base.pdema", path=base["path"], expect="load", identical=True)
    rng = random.Random(seed)
    seen = set()
    while len(seen) < flips:
        bit = rng.randrange(len(data) * 8)
        if bit in seen:
            continue
        seen.add(bit)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        m.add(f"flip_byte{bit // 8:06d}_bit{bit % 8}.pdema", bytes(flipped), expect="refuse_or_identical",
              identical=True)
    return m.save()


# ====================================================================================== E: post-hoc snapshots
SNAP_NAMES = ["0.weight", "0.bias", "8.weight", "8.bias"]
SNAP_SHAPES = [[8, 3, 3, 3], [8], [8, 3], [3]]
SNAP_OTHERS = {"1._mean": (8,), "1._variance": (8,)}
SIGMA_RELS = [0.05, 0.1]


def _names_fingerprint(names, shapes) -> str:
    digest = hashlib.sha1()
    for name, shape in zip(names, shapes):
        digest.update(f"{name}:{list(shape)};".encode())
    return digest.hexdigest()[:16]


def snapshot_header(step: int, fmt: str = "ema-callback-phema-2", dtype: str = "float32",
                    run: str = RUN_ID) -> Dict[str, Any]:
    from ema_callback.posthoc.power_math import gamma_of

    return {"format": fmt, "step": step, "time": step, "updates": step, "sigma_rels": list(SIGMA_RELS),
            "gammas": [float(gamma_of(s)) for s in SIGMA_RELS], "names": list(SNAP_NAMES),
            "shapes": [list(s) for s in SNAP_SHAPES], "fingerprint": _names_fingerprint(SNAP_NAMES, SNAP_SHAPES),
            "dtype": dtype, "run": run}


def snapshot_arrays(step: int, dtype: str = "float32") -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    total = sum(int(np.prod(s)) for s in SNAP_SHAPES)
    out = {f"profile{j}": rng.normal(size=total).astype(dtype) for j in range(len(SIGMA_RELS))}
    out.update({f"other:{k}": rng.normal(size=s).astype("float32") for k, s in SNAP_OTHERS.items()})
    return out


def split_safetensors(blob: bytes):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def assemble_safetensors(header: Any, data: bytes, raw_header: Optional[bytes] = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_snapshot(step: int, header: Optional[Dict[str, Any]] = None, arrays=None, sign: bool = True) -> bytes:
    """A new-format snapshot (``safetensors.numpy``) whose header ``digest`` is the sha256 of its data section."""
    from safetensors.numpy import save

    header = dict(header or snapshot_header(step))
    arrays = arrays if arrays is not None else snapshot_arrays(step, header.get("dtype", "float32"))
    header.setdefault("digest", "0" * 64)
    blob = save(arrays, metadata={"ema_callback": json.dumps(header)})
    if sign:
        _, data = split_safetensors(blob)
        header["digest"] = hashlib.sha256(data).hexdigest()
        blob = save(arrays, metadata={"ema_callback": json.dumps(header)})
    return blob


def legacy_npz_snapshot(step: int, header: Optional[Dict[str, Any]] = None, arrays=None) -> bytes:
    """Today's writer (``phema-<step>.npz``): the arrays and the JSON header as a uint8 array, ``np.savez``."""
    header = header or snapshot_header(step, fmt="ema-callback-phema-1")
    arrays = dict(arrays if arrays is not None else snapshot_arrays(step, header.get("dtype", "float32")))
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def st_name(step: int) -> str:
    return f"phema-{step:09d}.safetensors"


def npz_name(step: int) -> str:
    return f"phema-{step:09d}.npz"


def _header_variants(valid: Dict[str, Any], legacy: bool) -> List[tuple]:
    """(name, header) with one field missing or ill-typed."""
    out = []
    fields = list(valid)
    for field in fields:
        if legacy and field in ("digest", "run"):  # snapshots written before run ids have none: run 'legacy'
            continue
        h = dict(valid)
        h.pop(field)
        out.append((f"header_{field}_missing", h))
    bad = {"format": [5, "ema-callback-phema-9"], "step": ["abc", -1, 1.5, None, 2 ** 70],
           "time": [float("nan"), float("inf"), "abc", -5], "updates": ["abc", -1],
           "sigma_rels": ["abc", [0.05], [0.05, "x"], [0.05, 5.0]], "gammas": ["abc", [1.0]],
           "names": ["abc", [1, 2, 3, 4], ["0.weight"]], "shapes": ["abc", [[8, 3, 3, 3], [8], [8, 3], [-3]],
                                                                   [[8, 3, 3, 3], [8], [8, 3], [4]]],
           "fingerprint": [5, ["x"]], "dtype": ["object", 5, "float64"],
           "run": ["../../../x", "a/b", "r" * 500, 5], "digest": [5, "zz" * 32, "ab"]}
    for field, values in bad.items():
        if legacy and field == "digest":
            continue
        for k, value in enumerate(values):
            h = dict(valid)
            h[field] = value
            out.append((f"header_{field}#{k}={json.dumps(value)[:24]}", h))
    return out


def _npz_member_offset(blob: bytes, array: np.ndarray) -> int:
    return blob.index(array.tobytes())


def build_snapshot_safetensors(root: str) -> str:
    """Category ``snapshot_safetensors``: damaged new-format snapshots, read by ``Snapshot(path)`` and, in a folder
    beside a valid one, by ``load_snapshots(folder)``."""
    m = Manifest(root, "snapshot_safetensors", "snapshot")
    arrays10 = snapshot_arrays(10)
    good10 = safetensors_snapshot(10)
    good20 = safetensors_snapshot(20)
    head20, data20 = split_safetensors(good20)
    meta20 = json.loads(head20["__metadata__"]["ema_callback"])
    cases: List[tuple] = []  # (name, bytes)

    def with_tensor_header(change):
        h = json.loads(json.dumps(head20))
        change(h)
        return assemble_safetensors(h, data20)

    def with_meta(meta=None, raw=None):
        h = json.loads(json.dumps(head20))
        h["__metadata__"]["ema_callback"] = raw if raw is not None else json.dumps(meta)
        return assemble_safetensors(h, data20)

    n = struct.unpack("<Q", good20[:8])[0]
    cases += [
        ("header_length_beyond_file", struct.pack("<Q", len(good20)) + good20[8:]),
        ("header_length_200MB", struct.pack("<Q", 200 * MiB) + good20[8:]),
        ("header_length_2pow64-1", struct.pack("<Q", 2 ** 64 - 1) + good20[8:]),
        ("header_length_0", struct.pack("<Q", 0) + good20[8:]),
        ("header_length_minus_one", struct.pack("<Q", n - 1) + good20[8:]),
        ("seven_bytes", good20[:7]),
        ("empty", b""),
    ]
    p0 = head20["profile0"]["data_offsets"]
    p1 = head20["profile1"]["data_offsets"]
    cases += [
        ("offsets_beyond_data", with_tensor_header(lambda h: h["profile1"].__setitem__(
            "data_offsets", [p1[0], len(data20) + 8]))),
        ("offsets_begin_after_end", with_tensor_header(lambda h: h["profile1"].__setitem__(
            "data_offsets", [p1[1], p1[0]]))),
        ("offsets_negative", with_tensor_header(lambda h: h["profile1"].__setitem__("data_offsets", [-8, p1[1]]))),
        ("offsets_not_ints", with_tensor_header(lambda h: h["profile1"].__setitem__("data_offsets", ["a", "b"]))),
        ("offsets_overlapping", with_tensor_header(lambda h: h["profile1"].__setitem__(
            "data_offsets", [p0[0] + 4, p0[0] + 4 + (p1[1] - p1[0])]))),
        ("shape_not_matching_offsets", with_tensor_header(lambda h: h["profile0"].__setitem__(
            "shape", [h["profile0"]["shape"][0] + 1]))),
        ("shape_huge", with_tensor_header(lambda h: h["profile0"].__setitem__("shape", [2 ** 40, 2 ** 40]))),
        ("shape_negative", with_tensor_header(lambda h: h["profile0"].__setitem__("shape", [-1]))),
        ("dtype_unknown", with_tensor_header(lambda h: h["profile0"].__setitem__("dtype", "F128"))),
        ("dtype_garbage", with_tensor_header(lambda h: h["profile0"].__setitem__("dtype", 5))),
        ("dtype_other_than_header", with_tensor_header(lambda h: (h["profile0"].__setitem__("dtype", "I32")))),
        ("profile1_missing", with_tensor_header(lambda h: h.pop("profile1"))),
        ("tensor_entry_not_a_dict", with_tensor_header(lambda h: h.__setitem__("profile1", "abc"))),
        ("bad_json", assemble_safetensors(None, data20, raw_header=b'{"profile0": {"dtype": "F32", "sha')),
        ("json_not_utf8", assemble_safetensors(None, data20, raw_header=b'{"\xff\xfe": 1}')),
        ("json_is_a_list", assemble_safetensors([1, 2, 3], data20)),
        ("json_nested_100000", assemble_safetensors(None, data20, raw_header=b"[" * 100000 + b"]" * 100000)),
        ("metadata_a_list", with_tensor_header(lambda h: h.__setitem__("__metadata__", ["x"]))),
        ("metadata_a_string", with_tensor_header(lambda h: h.__setitem__("__metadata__", "x"))),
        ("metadata_missing", with_tensor_header(lambda h: h.pop("__metadata__"))),
        ("metadata_ema_callback_missing", with_tensor_header(lambda h: h.__setitem__("__metadata__", {"x": "y"}))),
        ("metadata_ema_callback_not_a_string", with_tensor_header(lambda h: h["__metadata__"].__setitem__(
            "ema_callback", {"format": "ema-callback-phema-2"}))),
        ("snapshot_header_bad_json", with_meta(raw='{"format": "ema-callback-phema-2", ')),
        ("snapshot_header_a_list", with_meta(meta=[1, 2])),
        ("snapshot_header_nested_100000", with_meta(raw="[" * 100000 + "]" * 100000)),
    ]
    for name, header in _header_variants(meta20, legacy=False):
        cases.append((name, with_meta(meta=header)))
    flipped = bytearray(good20)
    flipped[8 + n + 37] ^= 0x10
    cases.append(("data_byte_flipped", bytes(flipped)))
    flipped = bytearray(good20)
    flipped[-1] ^= 0x01
    cases.append(("last_data_byte_flipped", bytes(flipped)))
    cases.append(("data_appended", good20 + b"\x00" * 16))
    cases.append(("data_with_another_runs_digest", with_meta(meta=dict(
        meta20, digest=hashlib.sha256(split_safetensors(good10)[1]).hexdigest()))))
    cut_points = sorted({len(good20) * k // 40 for k in range(1, 40)} | {len(good20) - 1})
    truncations = [(f"truncated_at_{c:05d}", good20[:c]) for c in cut_points]

    m.add("valid_step10", good10, expect="load", filename=st_name(10), expect_step=10,
          expect_profile=canon_hash(arrays10["profile0"]))
    folders = os.path.join(m.root, "folders")
    for i, (name, data) in enumerate(cases + truncations):
        path = m.add(name, data, filename=f"{i:03d}-{st_name(20)}")
        if name.startswith("truncated") and i % 5:
            continue
        folder = os.path.join(folders, f"{i:03d}")
        os.makedirs(folder)
        with open(os.path.join(folder, st_name(10)), "wb") as handle:
            handle.write(good10)
        target = os.path.join(folder, st_name(20))
        shutil.copyfile(path, target)
        m.add(f"{name} [load_snapshots]", path=target, op="load_snapshots", folder=folder,
              names=[os.path.basename(target)])
    folder = os.path.join(folders, "valid")
    os.makedirs(folder)
    for step, blob in ((10, good10), (20, good20)):
        with open(os.path.join(folder, st_name(step)), "wb") as handle:
            handle.write(blob)
    m.add("valid_steps_10_20 [load_snapshots]", path=os.path.join(folder, st_name(20)), op="load_snapshots",
          folder=folder, expect="load", expect_steps=[10, 20], nbytes=len(good10) + len(good20))
    return m.save()


def _zip_member_local(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, csize, usize, len(name), 0) + name


def _zip_member_central(name: bytes, method: int, crc: int, csize: int, usize: int, offset: int) -> bytes:
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, csize, usize, len(name),
                       0, 0, 0, 0, 0, offset) + name


def write_zip(path: str, members: List[tuple]) -> None:
    """A zip written member by member: ``(name, method, crc, usize, chunks)`` with ``chunks`` an iterable of the
    member's (already compressed, for method 8) bytes; nothing is held whole."""
    central = []
    with open(path, "wb") as handle:
        for name, method, crc, usize, chunks in members:
            raw = name.encode()
            offset = handle.tell()
            handle.write(_zip_member_local(raw, method, crc, 0, usize))
            start = handle.tell()
            for chunk in chunks:
                handle.write(chunk)
            csize = handle.tell() - start
            handle.seek(offset)
            handle.write(_zip_member_local(raw, method, crc, csize, usize))
            handle.seek(0, 2)
            central.append(_zip_member_central(raw, method, crc, csize, usize, offset))
        cd_offset = handle.tell()
        for record in central:
            handle.write(record)
        cd_size = handle.tell() - cd_offset
        handle.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), cd_size, cd_offset, 0))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npy_header(descr: str, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def deflate_bomb(first: bytes, total: int, chunk: int = MiB):
    """(crc32, usize, chunks): a raw-deflate stream of ``first`` then zeros up to ``total`` bytes, built from one
    compressed 1 MiB block of zeros repeated (full flushes make the blocks independent): ~1 KB per MiB inflated."""
    assert len(first) <= chunk and total % chunk == 0
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(first + bytes(chunk - len(first))) + co.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(chunk)
    block = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    assert co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH) == block
    tail = co.flush(zlib.Z_FINISH)
    crc = zlib.crc32(first + bytes(chunk - len(first)))
    for _ in range(total // chunk - 1):
        crc = zlib.crc32(zeros, crc)
    count = total // chunk - 1
    return crc & 0xFFFFFFFF, total, (lambda: iter([head] + [block] * count + [tail]))


def zip_bomb_npz(path: str, bomb_member: str, step: int = 20, total: int = 2 * 2 ** 30) -> None:
    """A legacy snapshot whose ``bomb_member`` is ~2 MB deflated and 2 GiB inflated (an honest npy header declaring
    all of it); every other member is stored and valid."""
    header = snapshot_header(step, fmt="ema-callback-phema-1")
    arrays = snapshot_arrays(step)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    members = []
    for name, array in arrays.items():
        if name == bomb_member:
            descr = "|u1" if name == "header" else "<f4"
            itemsize = 1 if name == "header" else 4
            npy_head = _npy_header(descr, ((total - 128) // itemsize,))
            npy_head = _npy_header(descr, ((total - len(npy_head)) // itemsize,))
            crc, usize, chunks = deflate_bomb(npy_head, total)
            members.append((name + ".npy", 8, crc, usize, chunks()))
        else:
            raw = _npy_bytes(array)
            members.append((name + ".npy", 0, zlib.crc32(raw) & 0xFFFFFFFF, len(raw), [raw]))
    write_zip(path, members)


def build_snapshot_npz(root: str) -> str:
    """Category ``snapshot_npz``: damaged legacy ``.npz`` snapshots (zip bombs included)."""
    m = Manifest(root, "snapshot_npz", "snapshot")
    arrays10 = snapshot_arrays(10)
    good10 = legacy_npz_snapshot(10)
    good20 = legacy_npz_snapshot(20)
    arrays20 = snapshot_arrays(20)
    meta20 = snapshot_header(20, fmt="ema-callback-phema-1")
    cases: List[tuple] = []
    bombs = []
    for member in ("profile0", "header"):
        path = os.path.join(m.files, f"bomb-{member}-{npz_name(20)}")
        zip_bomb_npz(path, member)
        bombs.append((f"zip_bomb_{member}_2GiB", path))
    # an npy header declaring far more than its member holds
    big = dict(arrays20)
    members = []
    for name, array in list(big.items()) + [("header", np.frombuffer(json.dumps(meta20).encode(), np.uint8))]:
        raw = _npy_bytes(array)
        if name == "profile0":
            raw = _npy_header("<f4", (10 ** 12,)) + array.tobytes()
        members.append((name + ".npy", 0, zlib.crc32(raw) & 0xFFFFFFFF, len(raw), [raw]))
    shape_path = os.path.join(m.files, f"shape-{npz_name(20)}")
    write_zip(shape_path, members)
    bombs.append(("npy_shape_1e12_beyond_member", shape_path))
    at = _npz_member_offset(good20, arrays20["profile0"])
    flipped = bytearray(good20)
    flipped[at + 9] ^= 0x04
    cases.append(("profile_byte_flipped", bytes(flipped)))
    at = good20.index(b'"sigma_rels"')
    flipped = bytearray(good20)
    flipped[at + 3] ^= 0x01
    cases.append(("header_byte_flipped", bytes(flipped)))
    at = good20.index(b"PK\x01\x02")
    flipped = bytearray(good20)
    flipped[at + 24] ^= 0x40  # a central directory size field
    cases.append(("central_directory_size_flipped", bytes(flipped)))
    cases.append(("object_array_member", _object_member_npz(meta20, arrays20)))
    cases.append(("header_bad_json", legacy_npz_snapshot(20, header=None, arrays=arrays20)
                  .replace(b'"sigma_rels"', b'"sigma_rels\x00')))
    for name, header in _header_variants(meta20, legacy=True):
        cases.append((name, legacy_npz_snapshot(20, header=header, arrays=arrays20)))
    truncations = [(f"truncated_at_{c:05d}", good20[:c])
                   for c in sorted({len(good20) * k // 25 for k in range(1, 25)} | {len(good20) - 1})]

    m.add("valid_step10", good10, expect="load", filename=npz_name(10), expect_step=10,
          expect_profile=canon_hash(arrays10["profile0"]))
    folders = os.path.join(m.root, "folders")
    entries = [(name, None, data) for name, data in cases + truncations] + [(name, path, None) for name, path in bombs]
    for i, (name, path, data) in enumerate(entries):
        if path is None:
            path = m.add(name, data, filename=f"{i:03d}-{npz_name(20)}")
        else:
            m.add(name, path=path)
        if name.startswith("truncated") and i % 5:
            continue
        folder = os.path.join(folders, f"{i:03d}")
        os.makedirs(folder)
        with open(os.path.join(folder, npz_name(10)), "wb") as handle:
            handle.write(good10)
        target = os.path.join(folder, npz_name(20))
        os.link(path, target) if os.path.getsize(path) > MiB else shutil.copyfile(path, target)
        m.add(f"{name} [load_snapshots]", path=target, op="load_snapshots", folder=folder,
              names=[os.path.basename(target)])
    folder = os.path.join(folders, "valid")
    os.makedirs(folder)
    for step, blob in ((10, good10), (20, good20)):
        with open(os.path.join(folder, npz_name(step)), "wb") as handle:
            handle.write(blob)
    m.add("valid_steps_10_20 [load_snapshots]", path=os.path.join(folder, npz_name(20)), op="load_snapshots",
          folder=folder, expect="load", expect_steps=[10, 20], nbytes=len(good10) + len(good20))
    return m.save()


def _object_member_npz(header, arrays) -> bytes:
    arrays = dict(arrays)
    arrays["profile0"] = np.array([1, "x", None], dtype=object)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def build_snapshot_folder(root: str) -> str:
    """Category ``snapshot_folder``: ``load_snapshots`` on a folder with odd names and symlinks (to a valid snapshot
    elsewhere, to /etc/passwd, to a FIFO that blocks whoever opens it): those are skipped with a warning and never
    read; nothing outside the folder is read, moved or written. Also ``move_aside`` on a folder holding a
    snapshot whose run id is ``../../../x``: nothing is created outside the folder's ``-run-`` siblings."""
    m = Manifest(root, "snapshot_folder", "folder_scan")
    case = os.path.join(m.root, "case")
    folder = os.path.join(case, "posthoc")
    outside = os.path.join(case, "outside")
    os.makedirs(folder)
    os.makedirs(outside)
    for step in (10, 20):
        with open(os.path.join(folder, st_name(step)), "wb") as handle:
            handle.write(safetensors_snapshot(step))
    with open(os.path.join(outside, st_name(30)), "wb") as handle:
        handle.write(safetensors_snapshot(30))
    os.mkfifo(os.path.join(outside, "fifo"))
    with open(os.path.join(folder, "phema-final.npz"), "wb") as handle:
        handle.write(b"PK\x03\x04 not really a zip")
    with open(os.path.join(folder, "phema-12.npz"), "wb") as handle:
        handle.write(legacy_npz_snapshot(12))
    with open(os.path.join(folder, "notes.txt"), "w") as handle:
        handle.write("my notes\n")
    os.symlink(os.path.join(outside, st_name(30)), os.path.join(folder, st_name(30)))
    os.symlink("/etc/passwd", os.path.join(folder, npz_name(40)))
    os.symlink(os.path.join("..", "outside", "fifo"), os.path.join(folder, st_name(50)))
    skipped = ["phema-final.npz", "phema-12.npz", "notes.txt", st_name(30), npz_name(40), st_name(50)]
    m.add("odd_names_and_symlinks [load_snapshots]", path=os.path.join(folder, st_name(20)), expect="load",
          folder=folder, case=case, expect_steps=[10, 20], skipped=skipped, names=[],
          nbytes=sum(os.path.getsize(os.path.join(folder, st_name(s))) for s in (10, 20)))
    for fmt, name, data in (
            ("npz", npz_name(20), legacy_npz_snapshot(20, header=snapshot_header(20, fmt="ema-callback-phema-1",
                                                                                 run="../../../x"))),
            ("safetensors", st_name(20), safetensors_snapshot(20, header=snapshot_header(20, run="../../../x")))):
        mcase = os.path.join(m.root, f"move-{fmt}", "a", "b")
        mfolder = os.path.join(mcase, "posthoc")
        os.makedirs(mfolder)
        with open(os.path.join(mfolder, name), "wb") as handle:
            handle.write(data)
        other_run = "aaaaaaaaaaaa"
        ok = npz_name(10) if fmt == "npz" else st_name(10)
        with open(os.path.join(mfolder, ok), "wb") as handle:
            handle.write(legacy_npz_snapshot(10, header=snapshot_header(10, fmt="ema-callback-phema-1", run=other_run))
                         if fmt == "npz" else safetensors_snapshot(10, header=snapshot_header(10, run=other_run)))
        m.add(f"run_id_traversal_{fmt} [move_aside]", path=os.path.join(mfolder, name), op="move_aside",
              expect="either", folder=mfolder, case=os.path.join(m.root, f"move-{fmt}"), names=[name])
    return m.save()


# ====================================================================================== F: YAML
NORMAL_YAML = """\
Global: &global
  use_gpu: false
  epoch_num: 10
  save_model_dir: ./output/rec
Optimizer:
  name: Adam
  lr: &lr
    name: Cosine
    learning_rate: 0.001
  regularizer: {name: L2, factor: 3.0e-05}
LearningRate: !CosineDecay
  max_epochs: 10
Train:
  dataset: &train_dataset
    name: SimpleDataSet
    data_dir: ./train_data/
    transforms:
      - DecodeImage: {img_mode: BGR, channel_first: false}
      - &resize {RecResizeImg: {image_shape: [3, 32, 100]}}
  loader: &loader {shuffle: true, batch_size_per_card: 256, num_workers: 4}
Eval:
  dataset:
    <<: *train_dataset
    data_dir: ./eval_data/
    transforms: [*resize]
  loader:
    <<: *loader
    shuffle: false
EvalLR: *lr
EMA:
  decay: 0.9999
"""

NORMAL_YAML_EXPECTED = {
    "Global": {"use_gpu": False, "epoch_num": 10, "save_model_dir": "./output/rec"},
    "Optimizer": {"name": "Adam", "lr": {"name": "Cosine", "learning_rate": 0.001},
                  "regularizer": {"name": "L2", "factor": 3.0e-05}},
    "LearningRate": {"max_epochs": 10},
    "Train": {"dataset": {"name": "SimpleDataSet", "data_dir": "./train_data/",
                          "transforms": [{"DecodeImage": {"img_mode": "BGR", "channel_first": False}},
                                         {"RecResizeImg": {"image_shape": [3, 32, 100]}}]},
              "loader": {"shuffle": True, "batch_size_per_card": 256, "num_workers": 4}},
    "Eval": {"dataset": {"name": "SimpleDataSet", "data_dir": "./eval_data/",
                         "transforms": [{"RecResizeImg": {"image_shape": [3, 32, 100]}}]},
             "loader": {"shuffle": False, "batch_size_per_card": 256, "num_workers": 4}},
    "EvalLR": {"name": "Cosine", "learning_rate": 0.001},
    "EMA": {"decay": 0.9999},
}


def alias_bomb(levels: int = 25, width: int = 2) -> str:
    lines = ["a0: &a0 [lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def build_yaml(root: str) -> str:
    """Category ``yaml``: ``read_yaml`` refuses alias bombs and deep nesting with one ``EMAConfigError`` line;
    a PaddleOCR-style config with anchors, aliases and merge keys still loads."""
    m = Manifest(root, "yaml", "read_yaml")
    m.add("normal_with_anchors.yml", NORMAL_YAML.encode(), expect="load",
          expect_hash=canon_hash(NORMAL_YAML_EXPECTED))
    m.add("billion_laughs_25_levels.yml", alias_bomb(25).encode())
    m.add("billion_laughs_10x10.yml", alias_bomb(10, 10).encode())
    m.add("billion_laughs_under_EMA.yml", (alias_bomb(25) + "EMA: {decay: 0.999, include: *a24}\n").encode())
    mapping_bomb = ["m0: &m0 {x: lol, y: lol}"] + [f"m{i}: &m{i} {{x: *m{i - 1}, y: *m{i - 1}}}" for i in range(1, 30)]
    m.add("mapping_alias_bomb_30.yml", ("\n".join(mapping_bomb) + "\n").encode())
    m.add("nested_flow_100000.yml", (b"a: " + b"[" * 100000 + b"]" * 100000 + b"\n"))
    m.add("nested_block_1000.yml", "".join(f"{' ' * i}k:\n" for i in range(1000)).encode())
    marker = os.path.join(m.root, "yaml-marker")
    m.add("python_object_apply.yml", f"a: !!python/object/apply:os.system ['touch {marker}']\n".encode(),
          marker=marker)
    return m.save()


# ====================================================================================== H: start-up of Model.fit
def build_startup(root: str, which: str) -> str:
    """Category ``startup``: ``model.fit`` with ``EMACallback(decay=0.9, save_dir=D)`` and one hostile ``*.pdema``
    planted in D: it starts and trains, the file is skipped or refused in one line, within the bounds."""
    m = Manifest(root, f"startup_{which}", "startup_fit")
    folder = os.path.join(m.root, "save_dir")
    os.makedirs(folder)
    data = {"tuple_bomb": in_state(shared_nest(40)),
            "bytearray_bomb": in_state(call(glob_op("builtins", "bytearray"), 10 ** 9))}[which]
    path = os.path.join(folder, "0.pdema")
    with open(path, "wb") as handle:
        handle.write(data)
    m.add(f"{which} planted as save_dir/0.pdema", path=path, folder=folder, names=["0.pdema"], kill_after=20,
          expect="either")  # fit must finish: the file is skipped (or refused) with a warning
    return m.save()


BUILDERS: Dict[str, Callable[[str], str]] = {
    "valid": build_valid, "shared_bombs": build_shared_bombs, "allocation_bombs": build_allocation_bombs,
    "lying_opcodes": build_lying_opcodes, "code_globals": build_code_globals,
    "truncated_pickles": build_truncated_pickles, "pdema_engine": build_pdema_engine,
    "pdema_unsigned": build_pdema_unsigned, "pdema_fields": build_pdema_fields,
    "pdema_bitflips": build_pdema_bitflips, "snapshot_safetensors": build_snapshot_safetensors,
    "snapshot_npz": build_snapshot_npz, "snapshot_folder": build_snapshot_folder, "yaml": build_yaml,
}


# ====================================================================================== the child: guarded loads
class WarningsCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> List[str]:
        out = []
        for r in self.records:
            if r.levelno >= logging.WARNING:
                try:
                    out.append(r.getMessage()[:2000])
                except Exception as exc:  # a message that cannot even be formatted
                    out.append(f"<unformattable log record: {type(exc).__name__}>")
        return out


class Context:
    """What the child's operations share: the engine under test (rebuilt when a load changed it), references."""

    def __init__(self, manifest: Dict[str, Any]):
        self.manifest = manifest
        self.setup = manifest["setup"]
        self.root = manifest["root"]
        self.ema = self.net = None
        self.dirty = True
        self.reference: Optional[Dict[str, str]] = None

    # -------------------------------------------------------------- engine
    def engine(self):
        if self.dirty or self.ema is None:
            self.ema, self.net = make_engine(self.setup["engine"], os.path.join(self.root, "posthoc"))
            self.dirty = False
        return self.ema, self.net

    def engine_hash(self) -> str:
        try:
            return canon_hash(self.ema.state_dict())
        except Exception as exc:
            return f"<state_dict() raised {type(exc).__name__}: {exc}>"

    def model_hash(self) -> str:
        return canon_hash({k: v.numpy() for k, v in self.net.state_dict().items()})

    def references(self) -> Dict[str, str]:
        """Engine state and returned dict after loading the valid base file (what an identical load gives)."""
        if self.reference is None:
            try:
                ema, _ = self.engine()
                value = ema.load(self.setup["reference"])
                self.reference = {"engine": self.engine_hash(), "value": canon_hash(value)}
            except Exception as exc:
                self.reference = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            self.dirty = True
        return self.reference


def _expected_error(op: str):
    from ema_callback.errors import EMAConfigError, EMAFileError

    return EMAConfigError if op == "read_yaml" else EMAFileError


class Operation:
    """prepare (untimed) -> call (timed, tracemalloc) -> after (untimed checks).

    tracemalloc slows Python 10-15x, so an operation that may run twice (``retimed``: it reads, or a repeated call
    gives the same result) is timed in a first call without tracemalloc, and its memory peak measured in a second."""

    traced = True
    retimed = True

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def prepare(self, entry):
        pass

    def call(self, entry):
        raise NotImplementedError

    def after(self, entry, outcome: str, value: Any) -> Dict[str, Any]:
        return {}


class CheckedLoad(Operation):
    def __init__(self, ctx):
        super().__init__(ctx)
        import ema_callback.files.checkpoint_io  # noqa: F401  (imports outside the clock)
        import ema_callback.files.safe_pickle  # noqa: F401

    def call(self, entry):
        from ema_callback.files.checkpoint_io import checked_load

        return checked_load(entry["path"])

    def after(self, entry, outcome, value):
        if outcome == "returned" and entry.get("expect_hash"):
            return {"identical": canon_hash(value) == entry["expect_hash"]}
        return {}


class ReadYaml(CheckedLoad):
    def __init__(self, ctx):
        super().__init__(ctx)
        import ema_callback.config.files  # noqa: F401

    def call(self, entry):
        from ema_callback.config.files import read_yaml

        return read_yaml(entry["path"])


class EngineLoad(Operation):
    """``ExponentialMovingAverage.load``: on an error the engine and the model are exactly as before; a successful
    load of a (possibly damaged) file gives the state of the valid one, bit for bit."""

    def prepare(self, entry):
        self.ctx.references()
        self.ema, self.net = self.ctx.engine()
        self.before = (self.ctx.engine_hash(), self.ctx.model_hash())

    def call(self, entry):
        return self.ema.load(entry["path"])

    def after(self, entry, outcome, value):
        checks: Dict[str, Any] = {}
        engine_now, model_now = self.ctx.engine_hash(), self.ctx.model_hash()
        checks["model_unchanged"] = model_now == self.before[1]
        if outcome == "returned":
            ref = self.ctx.reference or {}
            if "error" in ref:
                checks["identical"] = False
                checks["identical_detail"] = f"the valid base file did not load: {ref['error']}"
            else:
                same_value = canon_hash(value) == ref["value"] if isinstance(value, dict) else False
                checks["identical"] = engine_now == ref["engine"] and same_value
                if not checks["identical"]:
                    checks["identical_detail"] = ("engine state differs" if engine_now != ref["engine"] else
                                                  "returned dict differs")
                if entry["name"].startswith("valid_base") and self.ctx.setup.get("saved_engine_hash"):
                    checks["identical_to_saved"] = engine_now == self.ctx.setup["saved_engine_hash"]
                    if not checks["identical_to_saved"]:
                        checks["identical_to_saved_detail"] = "the loaded engine's state differs from the saver's"
            self.ctx.dirty = True
        else:
            checks["engine_unchanged"] = engine_now == self.before[0]
            if not checks["engine_unchanged"] or not checks["model_unchanged"]:
                self.ctx.dirty = True
        return checks


class ReadState(Operation):
    def prepare(self, entry):
        self.ctx.references()

    def call(self, entry):
        from ema_callback.files.state_file import read_state

        return read_state(entry["path"])

    def after(self, entry, outcome, value):
        if outcome == "returned" and entry.get("identical"):
            ref = self.ctx.reference or {}
            return {"identical": "value" in ref and canon_hash(value) == ref["value"]}
        return {}


class SnapshotOp(Operation):
    def __init__(self, ctx):
        super().__init__(ctx)
        import ema_callback.posthoc.snapshots  # noqa: F401
        import ema_callback.posthoc.tracking  # noqa: F401

    def call(self, entry):
        from ema_callback.posthoc.snapshots import Snapshot

        return Snapshot(entry["path"])

    def after(self, entry, outcome, value):
        checks = {}
        if outcome == "returned" and "expect_step" in entry:
            checks["step_ok"] = getattr(value, "step", None) == entry["expect_step"]
            try:
                checks["profile_ok"] = canon_hash(np.asarray(value.profile(0))) == entry["expect_profile"]
            except Exception as exc:
                checks["profile_ok"] = False
                checks["profile_detail"] = f"profile(0) raised {type(exc).__name__}: {str(exc)[:200]}"
        return checks


class LoadSnapshotsOp(SnapshotOp):
    def call(self, entry):
        from ema_callback.posthoc.snapshots import load_snapshots

        return load_snapshots(entry["folder"])

    def after(self, entry, outcome, value):
        if outcome == "returned" and "expect_steps" in entry:
            steps = [getattr(s, "step", None) for s in value]
            return {"steps_ok": steps == entry["expect_steps"], "steps": steps}
        return {}


class FolderScan(SnapshotOp):
    """``load_snapshots`` on the odd folder: the valid snapshots, a warning naming each skipped file, and the whole
    case folder (outside included) unchanged."""

    retimed = False  # its warnings are counted

    def prepare(self, entry):
        self.before = tree_state(entry["case"])
        self.capture = WarningsCapture()
        logging.getLogger("ema_callback").addHandler(self.capture)

    def call(self, entry):
        from ema_callback.posthoc.snapshots import load_snapshots

        return load_snapshots(entry["folder"])

    def after(self, entry, outcome, value):
        logging.getLogger("ema_callback").removeHandler(self.capture)
        warnings = self.capture.warnings()
        checks: Dict[str, Any] = {"warnings": warnings,
                                  "tree_changes": tree_diff(self.before, tree_state(entry["case"]))}
        checks["unwarned"] = [n for n in entry["skipped"] if not any(n in w for w in warnings)]
        checks["multiline_warnings"] = [w[:120] for w in warnings if "\n" in w]
        if outcome == "returned":
            steps = [getattr(s, "step", None) for s in value]
            checks["steps"] = steps
            checks["steps_ok"] = steps == entry["expect_steps"]
        return checks


class MoveAside(SnapshotOp):
    """``move_aside`` of a folder holding a snapshot whose run id is ``../../../x``: whatever it moves
    goes into ``<folder>-run-<id>`` siblings (id 12 hex digits, ``legacy`` or ``unreadable``), nowhere else."""

    retimed = False  # it moves files

    def prepare(self, entry):
        self.before = tree_state(entry["case"])

    def call(self, entry):
        from ema_callback.posthoc.tracking import move_aside

        return move_aside(entry["folder"], RUN_ID)

    def after(self, entry, outcome, value):
        import re

        changes = tree_diff(self.before, tree_state(entry["case"]))
        base = os.path.relpath(entry["folder"], entry["case"])
        allowed = re.compile(re.escape(base) + r"(-run-([0-9a-f]{12}|legacy|unreadable))?(/[^/]+)?$")
        bad = [c for c in changes if not (c.startswith(("created ", "removed ")) and allowed.match(c.split(" ", 1)[1]))]
        return {"tree_changes": changes, "outside_changes": bad}


class StartupFit(Operation):
    """``model.fit`` with ``EMACallback(decay=0.9, save_dir=D)``: the resume scan (``_find_resume_file``) is timed and
    traced alone; fit must finish and train, and a warning must name the planted file."""

    traced = False

    def __init__(self, ctx):
        super().__init__(ctx)
        import paddle  # noqa: F401  (imported before the clock starts)
        from fit_helpers import loaders, make_model

        from ema_callback.integrations.model_fit import EMACallback

        self.make_model, self.loaders, self.EMACallback = make_model, loaders, EMACallback
        self.scan: Dict[str, float] = {}
        original = getattr(EMACallback, "_find_resume_file", None)
        self.precise = original is not None
        if original is not None:
            scan = self.scan

            def measured(cb, *args, **kwargs):
                gc.collect()
                tracemalloc.start()
                t0 = time.perf_counter()
                try:
                    return original(cb, *args, **kwargs)
                finally:
                    scan["seconds"] = scan.get("seconds", 0.0) + time.perf_counter() - t0
                    scan["peak"] = max(scan.get("peak", 0), tracemalloc.get_traced_memory()[1])
                    tracemalloc.stop()

            EMACallback._find_resume_file = measured
        t0 = time.perf_counter()
        self.fit(os.path.join(ctx.root, "baseline"))
        self.baseline = time.perf_counter() - t0

    def fit(self, folder):
        os.makedirs(folder, exist_ok=True)
        train, _ = self.loaders()
        model = self.make_model()
        start = {k: v.numpy().copy() for k, v in model.network.state_dict().items()}
        cb = self.EMACallback(decay=0.9, save_dir=folder)
        model.fit(train, epochs=1, verbose=0, callbacks=[cb])
        trained = any(not np.array_equal(start[k], v.numpy()) for k, v in model.network.state_dict().items())
        return cb, trained

    def prepare(self, entry):
        self.scan.clear()
        self.capture = WarningsCapture()
        logging.getLogger("ema_callback").addHandler(self.capture)
        self.t0 = time.perf_counter()

    def call(self, entry):
        return self.fit(entry["folder"])

    def after(self, entry, outcome, value):
        logging.getLogger("ema_callback").removeHandler(self.capture)
        warnings = self.capture.warnings()
        name = os.path.basename(entry["path"])
        checks: Dict[str, Any] = {"fit_seconds": time.perf_counter() - self.t0, "baseline_seconds": self.baseline,
                                  "warnings": warnings, "warned": any(name in w and "\n" not in w for w in warnings)}
        if outcome == "returned":
            cb, trained = value
            checks["trained"] = trained
            checks["ema_steps"] = getattr(cb.ema, "num_steps", None)
        if self.precise:
            checks["seconds"] = self.scan.get("seconds", 0.0)
            checks["peak"] = self.scan.get("peak", 0)
        else:
            checks["seconds"] = max(0.0, checks["fit_seconds"] - self.baseline)
            checks["peak"] = 0
            checks["note"] = "EMACallback._find_resume_file is gone: only fit's wall time against a baseline fit"
        return checks


OPERATIONS = {"checked_load": CheckedLoad, "read_yaml": ReadYaml, "engine_load": EngineLoad, "read_state": ReadState,
              "snapshot": SnapshotOp, "load_snapshots": LoadSnapshotsOp, "folder_scan": FolderScan,
              "move_aside": MoveAside, "startup_fit": StartupFit}


def _limit_resources() -> None:
    import resource

    for limit, value in ((resource.RLIMIT_AS, ADDRESS_SPACE), (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT),
                         (resource.RLIMIT_CORE, 0)):
        soft, hard = resource.getrlimit(limit)
        target = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (target, hard))


def _without_paths(message: str, entry: Dict[str, Any]) -> str:
    """The message with the file's path taken out (a field name must be said, not found inside the path)."""
    for path in sorted({entry["path"], os.path.dirname(entry["path"])} | set(entry.get("names", [])), key=len,
                       reverse=True):
        if path:
            message = message.replace(path, "<file>")
    return message


def run_entry(op: Operation, entry: Dict[str, Any]) -> Dict[str, Any]:
    expected = _expected_error(entry["op"])
    op.prepare(entry)
    gc.collect()
    value, outcome, exc_info = None, "returned", {}
    untraced_seconds = None
    if op.traced and op.retimed:
        t0 = time.perf_counter()
        try:
            op.call(entry)
        except (Exception, SystemExit):
            pass
        untraced_seconds = time.perf_counter() - t0
        gc.collect()
    if op.traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        value = op.call(entry)
    except (Exception, SystemExit) as exc:  # SystemExit: a hostile file that called sys.exit
        outcome = "raised"
        try:
            message = str(exc)
        except BaseException as inner:  # the message itself is hostile (a repr that blows up)
            message = f"<str(exception) raised {type(inner).__name__}>"
        exc_info = {"exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                    "expected_class": isinstance(exc, expected), "message": message[:1500],
                    "message_len": len(message), "multiline": "\n" in message or "\r" in message,
                    "names": {n: n in message for n in entry.get("names", [])},
                    "says": {w: w.lower() in _without_paths(message, entry).lower()
                             for w in entry.get("must_say", []) + entry.get("must_say_any", [])}}
        del exc
    seconds = time.perf_counter() - t0 if untraced_seconds is None else untraced_seconds
    peak = tracemalloc.get_traced_memory()[1] if op.traced else 0
    if op.traced:
        tracemalloc.stop()
    rec = {"outcome": outcome, "seconds": seconds, "peak": peak, **exc_info}
    if outcome == "returned":
        rec["returned_type"] = type(value).__name__
    try:
        checks = op.after(entry, outcome, value)
    except Exception as exc:
        checks = {"after_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    del value
    rec["seconds"] = checks.pop("seconds", rec["seconds"])
    rec["peak"] = checks.pop("peak", rec["peak"])
    rec["checks"] = checks
    return rec


def child_main(manifest_path: str, results_path: str, start: int) -> int:
    faulthandler.enable()
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    sys.path[:0] = [HERE, ROOT]
    _limit_resources()
    out = open(results_path, "a")

    def write(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    entries = manifest["entries"]
    ctx = Context(manifest)
    ops: Dict[str, Operation] = {}
    for i in range(start, len(entries)):
        entry = entries[i]
        write({"event": "start", "i": i, "time": time.time()})
        try:
            if entry["op"] not in ops:  # set-up (a baseline fit for startup_fit), outside the entry's clock
                faulthandler.dump_traceback_later(SETUP_TIMEOUT, exit=True)
                ops[entry["op"]] = OPERATIONS[entry["op"]](ctx)
                write({"event": "start", "i": i, "time": time.time()})
            faulthandler.dump_traceback_later(entry["kill_after"], exit=True)
            rec = run_entry(ops[entry["op"]], entry)
        except Exception as exc:  # the harness itself (setup of an operation): recorded, not hidden
            rec = {"outcome": "harness_error", "message": f"{type(exc).__name__}: {str(exc)[:500]}",
                   "seconds": 0.0, "peak": 0, "checks": {}}
        faulthandler.cancel_dump_traceback_later()
        write({"event": "done", "i": i, **rec})
    out.close()
    return 0


# ====================================================================================== the parent: run and judge
def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore", "GLOG_minloglevel": "2"})
    return env


def run_manifest(manifest_path: str, deadline: float = 240.0) -> List[Dict[str, Any]]:
    """Run the child over every entry, restarting it after an entry that hung or crashed it; one record per entry."""
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    entries = manifest["entries"]
    records: Dict[int, Dict[str, Any]] = {}
    t_start = time.monotonic()
    start, attempt = 0, 0
    while start < len(entries):
        remaining = deadline - (time.monotonic() - t_start)
        if remaining <= 1:
            break
        results = f"{manifest_path}.results.{attempt}"
        errors = f"{manifest_path}.stderr.{attempt}"
        attempt += 1
        with open(errors, "wb") as err:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), manifest_path, results, str(start)],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=_child_env(),
                                    cwd=manifest["root"], start_new_session=True)
            try:
                rc = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "deadline"
        ended = time.time()
        started: Dict[int, float] = {}
        if os.path.exists(results):
            with open(results) as handle:
                for line in handle:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if event["event"] == "start":
                        started[event["i"]] = event["time"]
                    else:
                        records[event["i"]] = event
        with open(errors, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
        timed_out = "Timeout (" in text  # faulthandler's watchdog fired
        lines = text.strip().splitlines()
        tail = "\n".join(lines[:2] + ["..."] + lines[-4:]) if len(lines) > 6 else "\n".join(lines)
        pending = [i for i in started if i not in records]
        if not pending:
            if len(records) == len(entries) or not started:
                if not started:  # died before its first entry
                    for i in range(start, len(entries)):
                        records[i] = {"outcome": "harness_error", "message": f"child exited {rc} before any entry: "
                                      f"{tail[-600:]}", "seconds": 0.0, "peak": 0, "checks": {}}
                break
            start = max(records) + 1
            continue
        i = pending[0]
        hung = timed_out or rc == "deadline"
        records[i] = {"outcome": "hung" if hung else "crashed", "seconds": ended - started[i], "peak": None,
                      "rc": rc, "stderr": tail[-600:], "checks": {}}
        start = i + 1
    for i in range(len(entries)):
        records.setdefault(i, {"outcome": "not_run", "seconds": None, "peak": None, "checks": {},
                               "message": f"category deadline of {deadline:.0f} s reached"})
    return [dict(records[i], entry=entries[i]) for i in range(len(entries))]


def _short_outcome(rec: Dict[str, Any]) -> str:
    o = rec["outcome"]
    if o == "raised":
        return rec["exc_type"].rsplit(".", 1)[-1]
    if o == "returned":
        c = rec.get("checks") or {}
        if "fit_seconds" in c:
            return f"fit finished in {c['fit_seconds']:.1f} s (baseline {c['baseline_seconds']:.1f} s)"
        return f"returned {rec.get('returned_type')}"
    if o == "hung":
        return f"HUNG (killed after {rec['seconds']:.1f} s)"
    if o == "crashed":
        return f"CRASHED (exit {rec.get('rc')})"
    return o.upper()


def judge(rec: Dict[str, Any]) -> List[str]:
    """Every way ``rec`` breaks the contract (empty: it keeps it)."""
    e = rec["entry"]
    out: List[str] = []
    o = rec["outcome"]
    expect = e["expect"]
    c = rec.get("checks") or {}
    if o in ("hung", "crashed", "not_run", "harness_error"):
        detail = {"hung": f"still running after {e['kill_after']:.0f} s (bound {time_bound(e['bytes']):.1f} s): killed",
                  "crashed": f"the loading process died (exit {rec.get('rc')}): "
                             f"{' '.join((rec.get('stderr') or '').split())[-200:]}",
                  "not_run": rec.get("message", ""), "harness_error": rec.get("message", "")}[o]
        out.append(f"{o.upper()}: {detail}")
    elif o == "raised":
        if expect == "load":
            out.append(f"a valid file was refused: {rec['exc_type']}: {rec['message'][:300]}")
        else:
            wanted = "EMAConfigError" if e["op"] == "read_yaml" else "EMAFileError"
            if not rec["expected_class"]:
                out.append(f"raised {rec['exc_type']} (expected {wanted}): {rec['message'][:200]!r}")
            if rec["multiline"]:
                out.append(f"message is not one line: {rec['message'][:200]!r}")
            if rec["message_len"] > MAX_MESSAGE:
                out.append(f"message is {rec['message_len']} characters (at most {MAX_MESSAGE})")
            missing = [n for n, ok in rec["names"].items() if not ok]
            if missing:
                out.append(f"message does not name the file ({missing[0]}): {rec['message'][:200]!r}")
            unsaid = [w for w in e.get("must_say", []) if not rec["says"].get(w)]
            if unsaid:
                out.append(f"message does not say {', '.join(map(repr, unsaid))}: {rec['message'][:200]!r}")
            if e.get("must_say_any") and not any(rec["says"].get(w) for w in e["must_say_any"]):
                out.append(f"message says none of {e['must_say_any']}: {rec['message'][:200]!r}")
    else:  # returned
        if expect == "refuse":
            out.append(f"loaded without an error (returned a {rec.get('returned_type')})")
    if o in ("raised", "returned"):
        if rec["seconds"] is not None and rec["seconds"] > time_bound(e["bytes"]):
            out.append(f"took {rec['seconds']:.2f} s (bound {time_bound(e['bytes']):.2f} s)")
        if rec["peak"] is not None and rec["peak"] > memory_bound(e["bytes"]):
            out.append(f"tracemalloc peak {rec['peak'] / MiB:.1f} MiB (bound {memory_bound(e['bytes']) / MiB:.1f} MiB)")
    if o == "returned" and expect in ("load", "refuse_or_identical", "either"):
        for key in ("identical", "identical_to_saved", "step_ok", "profile_ok", "steps_ok"):
            if c.get(key) is False:
                detail = c.get(key + "_detail") or c.get(key.replace("_ok", "_detail")) or c.get("steps") or ""
                out.append(f"{key} is false: {detail}")
    if c.get("engine_unchanged") is False:
        out.append("the engine's state changed although the load failed")
    if c.get("model_unchanged") is False:
        out.append("the model's weights changed")
    if c.get("after_error"):
        out.append(f"checking the outcome raised {c['after_error']}")
    if c.get("unwarned"):
        out.append(f"no warning names {', '.join(c['unwarned'])} (warnings: {c.get('warnings')})")
    if c.get("multiline_warnings"):
        out.append(f"warnings of several lines: {c['multiline_warnings']}")
    if c.get("tree_changes") and e["op"] == "folder_scan":
        out.append(f"files changed around the folder: {c['tree_changes'][:6]}")
    if c.get("outside_changes"):
        out.append(f"files changed outside the folder and its -run- siblings: {c['outside_changes'][:6]}")
    if e["op"] == "startup_fit" and o in ("raised", "returned"):
        if o == "raised":
            out.append("fit did not run to the end")
        elif not c.get("trained"):
            out.append("fit finished without training the network")
        if not c.get("warned"):
            out.append(f"no one-line warning names {os.path.basename(e['path'])} (warnings: {c.get('warnings')})")
    out += code_effects(e)
    return out


def code_effects(e: Dict[str, Any]) -> List[str]:
    """What running ``e``'s payload left behind: its marker created, its canary file or folder destroyed."""
    out = []
    if e.get("marker") and glob.glob(glob.escape(e["marker"]) + "*"):
        out.append(f"RAN CODE: {e['marker']} was created")
    if e.get("canary"):
        try:
            with open(e["canary"]) as handle:
                intact = handle.read() == e["canary_text"]
        except OSError:
            intact = False
        if not intact:
            out.append(f"RAN CODE: {e['canary']} was removed or changed")
    if e.get("canary_dir") and not os.path.exists(os.path.join(e["canary_dir"], "keep")):
        out.append(f"RAN CODE: {e['canary_dir']} was removed")
    return out


def table(records: List[Dict[str, Any]]) -> str:
    rows = [f"{'file':<58} {'bytes':>10} {'seconds':>8} {'peak MiB':>9}  outcome"]
    for rec in records:
        e = rec["entry"]
        secs = "-" if rec["seconds"] is None else f"{rec['seconds']:.3f}"
        peak = "-" if rec["peak"] is None else f"{rec['peak'] / MiB:.1f}"
        rows.append(f"{e['name'][:58]:<58} {e['bytes']:>10} {secs:>8} {peak:>9}  {_short_outcome(rec)}"
                    f"{'' if not rec.get('violations') else '   <-- ' + rec['violations'][0][:90]}")
    return "\n".join(rows)


def summary(category: str, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    hostile = [r for r in records if r["entry"]["expect"] != "load" and not r["entry"].get("valid")]
    measured = [r for r in hostile if r["outcome"] in ("raised", "returned")]
    worst_t = max(measured, key=lambda r: r["seconds"], default=None)
    worst_m = max((r for r in measured if r["peak"] is not None), key=lambda r: r["peak"], default=None)
    return {"category": category, "files": len(records), "hostile_files": len(hostile),
            "violating_files": sum(1 for r in records if r.get("violations")),
            "hung": sum(1 for r in records if r["outcome"] == "hung"),
            "crashed": sum(1 for r in records if r["outcome"] == "crashed"),
            "worst_seconds": [round(worst_t["seconds"], 4), worst_t["entry"]["name"]] if worst_t else None,
            "worst_peak_mib": [round(worst_m["peak"] / MiB, 2), worst_m["entry"]["name"]] if worst_m else None}


def check_category(manifest_path: str, deadline: float = 240.0):
    """Run and judge a category: (records with their violations, table text, summary)."""
    records = run_manifest(manifest_path, deadline)
    for rec in records:
        rec["violations"] = judge(rec)
    with open(manifest_path) as handle:
        category = json.load(handle)["category"]
    return records, table(records), summary(category, records)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
