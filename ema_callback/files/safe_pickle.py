"""Reading ``paddle.save`` files without running code and within bounds: a checked pickle reader.

``paddle.load`` is ``pickle.load``: a crafted file runs any code it names, and even a file of "plain data" can hang
or exhaust a process (a few hundred bytes of tuples shared through the pickle memo are exponential to walk or hash;
a declared size or an allowed callable such as ``bytearray(n)`` allocates from a number in the file). Every file
this project reads goes through ``safe_loads``, in two passes:

1. ``scan`` reads every opcode (a declared length beyond the bytes present is an error before anything of that
   length exists) and builds nothing. It keeps, for every object the file would make, its size counted with every shared
   reference (nodes and bytes) and its nesting depth, and refuses the file when an object grows beyond what a file
   of that size can honestly hold (``Limits``), when a container changes after it was referenced (a
   ``paddle.save`` never does that), when an opcode is not one of plain data's, when a global is not allowed, or
   when an allowed callable gets other arguments than ``paddle.save`` gives it (``numpy`` arrays must declare
   exactly the bytes they hold; no object arrays; ``bytearray``/``str`` take only bytes or strings).
2. Only then the C unpickler builds the objects, resolving just those globals (``_RestrictedUnpickler``):

   * containers and scalars (``builtins`` tuple, list, dict, set, frozenset, bytearray, complex, int, float, str,
     bool, and ``collections.OrderedDict``);
   * numpy arrays, dtypes and scalars (``numpy.core.multiarray._reconstruct`` / ``scalar``, ``numpy.ndarray``,
     ``numpy.dtype``, the ``numpy.dtypes`` classes; ``numpy._core`` under numpy 2);
   * Paddle's tensor reductions (``paddle/framework/io.py``): an eager Tensor is saved as ``tuple((name, ndarray))``
     and comes back as the ndarray (``paddle.load(..., return_numpy=True)``); a DenseTensor is saved as
     ``eval('data', {'data': ndarray})``, and only that exact call is honoured, without ``eval``.

Cost: the scan runs at about 1 microsecond an opcode; a ``paddle.save`` of weights has some 20 opcodes a tensor,
so reading is dominated by the bytes. Memory: the file's bytes plus the arrays built from them (about 2x the file).
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

_BUILTINS = {"tuple": tuple, "list": list, "dict": dict, "set": set, "frozenset": frozenset,
             "bytearray": bytearray, "complex": complex, "int": int, "float": float, "str": str, "bool": bool}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
# numpy dtypes a tensor can have: bool, signed/unsigned integers, floats, complex (no objects, strings or records)
_ARRAY_KINDS = "biufc"


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global that plain data never needs (a file that would run code when loaded)."""


class UnsafePickle(pickle.UnpicklingError):
    """The file is not plain data as ``paddle.save`` writes it, or is larger walked than stored (the reason)."""


def _dense_tensor(expression: Any, namespace: Any = None) -> Any:
    """Paddle's DenseTensor reduction ``eval('data', {'data': ndarray})``, without eval."""
    if expression == "data" and isinstance(namespace, dict) and isinstance(namespace.get("data"), np.ndarray):
        return namespace["data"]
    raise RefusedGlobal("builtins.eval with other arguments than Paddle's tensor reduction")


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how pickle protocol 2 writes bytes (other encodings are refused)."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    raise RefusedGlobal("_codecs.encode with other arguments than protocol 2's bytes")


def _global_name(module: str, name: str) -> Optional[str]:
    """The allowed global's kind (``builtins.<name>``, ``odict``, ``reconstruct``, ``scalar``, ``ndarray``,
    ``dtype``, ``eval``), or None when it is not allowed."""
    if module == "builtins" and name in _BUILTINS:
        return "builtins." + name
    if module == "builtins" and name == "eval":
        return "eval"
    if module == "collections" and name == "OrderedDict":
        return "odict"
    if module == "_codecs" and name == "encode":  # protocol 2 writes bytes as _codecs.encode(str, 'latin1')
        return "encode"
    if module in _NUMPY_MODULES and name == "_reconstruct":
        return "reconstruct"
    if module in _NUMPY_MODULES and name == "scalar":
        return "scalar"
    if module == "numpy" and name == "ndarray":
        return "ndarray"
    if module == "numpy" and name == "dtype":
        return "dtype"
    if module == "numpy.dtypes" and name.endswith("DType") and name.isidentifier():
        return "dtype-class"
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        kind = _global_name(module, name)
        if kind is None:
            raise RefusedGlobal(f"{module}.{name}")
        if kind.startswith("builtins."):
            return _BUILTINS[name]
        if kind == "eval":
            return _dense_tensor
        if kind == "odict":
            return collections.OrderedDict
        if kind == "encode":
            return _latin1_bytes
        if kind in ("reconstruct", "scalar"):
            return getattr(_multiarray, name)
        if kind == "dtype-class":
            import numpy.dtypes as dtypes  # numpy >= 1.25 pickles dtype classes by name

            found = getattr(dtypes, name, None)
            if isinstance(found, type) and issubclass(found, np.dtype):
                return found
            raise RefusedGlobal(f"{module}.{name}")
        return getattr(np, name)  # ndarray, dtype


# ---------------------------------------------------------------------------------------------------------- scan
class Limits:
    """What a file of ``size`` bytes may make.

    * ``ops``: opcodes, 500,000 + one per 16 bytes (``paddle.save`` writes some 20 a tensor);
    * ``nodes``: objects in any one object, every shared reference counted again: 2 x ``ops`` (a tiny file of tuples
      shared through the memo would otherwise stand for 2**40 of them);
    * ``data``: bytes of strings and buffers in any one object, shared references counted again: 2 x the file + 1 MiB;
    * ``depth``: nesting, 64 (a state dict nests about 5 deep);
    * ``memo``: the largest memo index, ``ops`` (the C unpickler sizes its memo table by the largest index);
    * ``stack``: objects on the stack at once, 32,768 (pickle batches containers 1,000 items at a time).
    """

    def __init__(self, size: int):
        self.ops = 500_000 + size // 16
        self.nodes = 2 * self.ops
        self.data = 2 * size + (1 << 20)
        self.depth = 64
        self.memo = self.ops
        self.stack = 32_768


class _Obj:
    """What the scan knows of one object the unpickler would build."""

    __slots__ = ("kind", "nodes", "data", "depth", "shared", "value", "items", "span")

    def __init__(self, kind: str, nodes: int = 1, data: int = 0, depth: int = 1, value: Any = None,
                 items: Optional[List["_Obj"]] = None):
        self.kind, self.nodes, self.data, self.depth = kind, nodes, data, depth
        self.shared, self.value, self.items, self.span = False, value, items, None


_MARK = object()
_SCALAR_KINDS = ("none", "bool", "int", "float", "str", "bytes")
_HASH_MODULUS = 2 ** 61 - 1  # CPython hashes ints modulo this: larger ones can be made to collide at will
_TEXT_CODECS = ("utf-8", "utf8", "latin1", "latin-1", "ascii")


def _check_keys(keys: List["_Obj"], what: str) -> None:
    """Keys of a dict or items of a set: strings, booleans, None and ints below 2**61 - 1 (``paddle.save`` writes
    string keys). Others are refused: tuples or floats could be crafted to collide in the hash table (quadratic
    time), and large ints collide by construction."""
    for key in keys:
        if key.kind in ("str", "bool", "none"):
            continue
        if key.kind == "int" and isinstance(key.value, int) and abs(key.value) < _HASH_MODULUS:
            continue
        raise UnsafePickle(f"a {what} of kind {key.kind} (only strings and small integers are read as keys)")


def _dtype_itemsize(text: Any) -> Optional[int]:
    """The item size of a numpy type string a tensor can have (``'f4'``, ``'<i8'``, ``'b1'``), else None."""
    if not isinstance(text, str) or len(text) > 8:
        return None
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError):
        return None
    return dtype.itemsize if dtype.kind in _ARRAY_KINDS and not dtype.fields and not dtype.subdtype else None


# -- reading opcode arguments: each reader takes (data, position after the opcode, size) -> (argument, position);
# a declared length beyond the bytes present is an error before anything of that length exists.
def _need(data: bytes, pos: int, size: int, length: int, what: str) -> int:
    if length < 0 or length > size - pos:
        raise UnsafePickle(f"{what} of {length:,} bytes declared at offset {pos:,}, {max(size - pos, 0):,} present")
    return pos + length


def _fixed(fmt: str):
    packed = struct.Struct(fmt)

    def read(data, pos, size):
        end = _need(data, pos, size, packed.size, "an argument")
        return packed.unpack_from(data, pos)[0], end
    return read


def _counted(length_fmt: Optional[str], decode: Optional[str]):
    """A length (``length_fmt``), then that many bytes: ``(length, text)`` with ``text`` decoded for short strings."""
    packed = struct.Struct(length_fmt) if length_fmt else None

    def read(data, pos, size):
        if packed is None:
            end = _need(data, pos, size, 1, "a length")
            length, pos = data[pos], end
        else:
            end = _need(data, pos, size, packed.size, "a length")
            length, pos = packed.unpack_from(data, pos)[0], end
        end = _need(data, pos, size, length, "a string or bytes")
        text = None
        if decode is not None and length <= 256:
            try:
                text = data[pos:end].decode(decode)
            except UnicodeDecodeError:
                raise UnsafePickle(f"a string at offset {pos:,} that is not {decode}") from None
        return (length, text, pos), end
    return read


def _line(data: bytes, pos: int, size: int) -> Tuple[bytes, int]:
    end = data.find(b"\n", pos, min(size, pos + 4096))
    if end < 0:
        raise UnsafePickle(f"an argument line at offset {pos:,} without its end (lines are at most 4096 bytes)")
    return data[pos:end], end + 1


def _decimal(data, pos, size):
    line, pos = _line(data, pos, size)
    if line in (b"00", b"01"):
        return line == b"01", pos
    if len(line) > 160:
        raise UnsafePickle(f"a number line of {len(line):,} digits at offset {pos:,}")
    try:
        return int(line.rstrip(b"L")), pos
    except ValueError:
        raise UnsafePickle(f"a number line {line[:40]!r} at offset {pos:,}") from None


def _text_line(data, pos, size):
    start = pos
    line, pos = _line(data, pos, size)
    return (len(line), line.decode("raw_unicode_escape") if len(line) <= 256 else None, start), pos


def _long(length_fmt: Optional[str]):
    counted = _counted(length_fmt, None)

    def read(data, pos, size):
        (length, _, _), end = counted(data, pos, size)
        if length > 64:
            raise UnsafePickle(f"an integer of {length:,} bytes at offset {pos:,} (at most 64 are read)")
        return int.from_bytes(data[end - length:end], "little", signed=True), end
    return read


def _global_pair(data, pos, size):
    module, pos = _line(data, pos, size)
    attr, pos = _line(data, pos, size)
    return (module.decode("utf-8", "replace"), attr.decode("utf-8", "replace")), pos


_READERS = {"uint1": _fixed("<B"), "uint2": _fixed("<H"), "int4": _fixed("<i"), "uint4": _fixed("<I"),
            "uint8": _fixed("<Q"), "float8": _fixed(">d"), "long1": _long(None), "long4": _long("<i"),
            "string1": _counted(None, "latin-1"), "string4": _counted("<i", "latin-1"),
            "bytes1": _counted(None, None), "bytes4": _counted("<I", None), "bytes8": _counted("<Q", None),
            "bytearray8": _counted("<Q", None), "unicodestring1": _counted(None, "utf-8"),
            "unicodestring4": _counted("<I", "utf-8"), "unicodestring8": _counted("<Q", "utf-8"),
            "decimalnl_short": _decimal, "decimalnl_long": _decimal, "floatnl": _line, "stringnl": _text_line,
            "unicodestringnl": _text_line, "stringnl_noescape": _line, "stringnl_noescape_pair": _global_pair}
_OPCODES = {ord(op.code): (op.name, _READERS[op.arg.name] if op.arg else None) for op in pickletools.opcodes}
_TEXT_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING")
# immutable scalars are shared by every opcode that makes one (the scan keeps no per-object state for them)
_NONE, _TRUE, _FALSE, _FLOAT = _Obj("none"), _Obj("bool", value=True), _Obj("bool", value=False), _Obj("float")
_SMALL_INTS = [_Obj("int", value=i) for i in range(256)]


class _Scan:
    """One pass over the opcodes (see the module docstring); ``run`` raises ``UnsafePickle``/``RefusedGlobal``."""

    def __init__(self, data: bytes):
        self.size = len(data)
        self.data = data
        self.limits = Limits(self.size)
        self.stack: List[Any] = []
        self.memo: Dict[int, _Obj] = {}

    # -- helpers ---------------------------------------------------------------------------------------------
    def _check(self, obj: _Obj) -> _Obj:
        limits = self.limits
        if obj.nodes > limits.nodes:
            raise UnsafePickle(f"an object of more than {limits.nodes:,} parts counting shared references (a file of "
                               f"{self.size:,} bytes cannot hold that many honestly: shared references nested)")
        if obj.data > limits.data:
            raise UnsafePickle(f"an object of more than {limits.data:,} bytes counting shared references (the file "
                               f"holds {self.size:,})")
        if obj.depth > limits.depth:
            raise UnsafePickle(f"objects nested more than {limits.depth} deep")
        return obj

    def _push(self, obj: _Obj) -> None:
        if len(self.stack) >= self.limits.stack:
            raise UnsafePickle(f"more than {self.limits.stack:,} objects on the stack at once (objects nested or "
                               "listed beyond what paddle.save writes)")
        self.stack.append(self._check(obj))

    def _pop(self) -> _Obj:
        if not self.stack or self.stack[-1] is _MARK:
            raise UnsafePickle("an opcode takes an object from an empty stack")
        return self.stack.pop()

    def _pop_mark(self) -> List[_Obj]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise UnsafePickle("an opcode needs a MARK that is not there")

    def _container(self, kind: str, items: List[_Obj], keep: bool = False) -> _Obj:
        nodes, data, depth = 1, 0, 0
        for item in items:
            nodes, data = nodes + item.nodes, data + item.data
            depth = item.depth if item.depth > depth else depth
        return _Obj(kind, nodes, data, depth + 1, items=items if keep else None)

    def _add_to(self, target: Any, kinds: tuple, items: List[_Obj], what: str) -> None:
        if target is _MARK or target.kind not in kinds:
            raise UnsafePickle(f"{what} into a {getattr(target, 'kind', 'mark')}")
        if target.kind == "dict":
            _check_keys(items[0::2], "dict key")
        elif target.kind == "set":
            _check_keys(items, "set item")
        if target.shared:
            raise UnsafePickle(f"{what} into a container after it was referenced (paddle.save never does that)")
        for item in items:
            target.nodes += item.nodes
            target.data += item.data
            if item.depth >= target.depth:
                target.depth = item.depth + 1
        self._check(target)

    # -- the calls plain data makes ------------------------------------------------------------------------------
    def _reduce(self, func: _Obj, args: _Obj) -> _Obj:
        if func.kind != "global":
            raise UnsafePickle(f"a call of a {func.kind}, not of an allowed global")
        if args.kind != "tuple":
            raise UnsafePickle(f"a call of {func.value} with arguments that are not a tuple")
        kind, a = func.value, args.items or []
        made = self._container("", a)
        if kind in ("builtins.tuple", "builtins.list", "builtins.set", "builtins.frozenset", "builtins.dict"):
            if len(a) > 1 or (a and a[0].kind not in ("list", "tuple", "dict", "set", "frozenset")):
                raise UnsafePickle(f"{kind} called with other arguments than one container")
            if a and kind in ("builtins.set", "builtins.frozenset", "builtins.dict") and a[0].kind != "dict":
                if a[0].items is None or a[0].nodes > 1:  # its items are not known here: only an empty one
                    raise UnsafePickle(f"{kind} built from a {a[0].kind} (its items would be hashed unchecked)")
            made.kind = {"builtins.tuple": "tuple", "builtins.list": "list", "builtins.set": "set",
                         "builtins.frozenset": "frozenset", "builtins.dict": "dict"}[kind]
            return made
        if kind in ("builtins.int", "builtins.float", "builtins.complex", "builtins.bool", "builtins.str",
                    "builtins.bytearray"):
            if len(a) > 2 or any(x.kind not in _SCALAR_KINDS for x in a):
                raise UnsafePickle(f"{kind} called with other arguments than a number, string or bytes")
            if kind == "builtins.bytearray" and a and a[0].kind not in ("bytes", "str"):
                raise UnsafePickle("builtins.bytearray called with a size (it would allocate from a number in the "
                                   "file); only bytes or a string are read")
            if len(a) == 2 and (a[1].kind != "str" or str(a[1].value).lower() not in _TEXT_CODECS):
                raise UnsafePickle(f"{kind} called with the encoding {str(a[1].value)[:20]!r} (only "
                                   f"{', '.join(_TEXT_CODECS)} are read)")
            made.kind = {"builtins.str": "str", "builtins.bytearray": "bytes"}.get(kind, "int")
            return made
        if kind == "odict":
            if len(a) > 1 or (a and (a[0].kind not in ("list", "tuple") or a[0].nodes > 1)):
                raise UnsafePickle("collections.OrderedDict called with pairs (its keys would be hashed unchecked); "
                                   "paddle.save writes OrderedDict() then its items")
            made.kind = "dict"
            return made
        if kind == "encode":
            if len(a) != 2 or a[0].kind != "str" or a[1].kind != "str" or a[1].value not in ("latin1", "latin-1"):
                raise RefusedGlobal("_codecs.encode with other arguments than protocol 2's bytes")
            begin, end, codec = a[0].span or (0, 0, "utf-8")
            try:  # latin-1 bytes: as many as the string has characters
                length = len(self.data[begin:end].decode(codec)) if a[0].value is None else len(a[0].value)
            except UnicodeDecodeError:
                raise UnsafePickle("_codecs.encode of a string that does not decode") from None
            return _Obj("bytes", 1, length, 1)
        if kind == "reconstruct":  # numpy's array reduction: _reconstruct(ndarray, (0,), b'b'), then BUILD
            if len(a) != 3 or a[0].kind != "global" or a[0].value != "ndarray" or a[1].kind != "tuple" or \
                    [i.value for i in a[1].items or []] != [0] or a[2].kind not in ("bytes", "str"):
                raise UnsafePickle("numpy _reconstruct called with other arguments than an empty array's")
            made.kind = "array"
            return made
        if kind == "scalar":  # numpy scalar(dtype, bytes)
            if len(a) != 2 or a[0].kind != "dtype" or a[1].kind not in ("bytes", "str") or \
                    a[1].data != a[0].value:
                raise UnsafePickle("numpy scalar called with a dtype and bytes of another size")
            made.kind = "scalar"
            return made
        if kind == "dtype":  # np.dtype('f4', False, True)
            size = _dtype_itemsize(a[0].value) if a and a[0].kind == "str" else None
            if size is None or len(a) > 3 or any(x.kind != "bool" for x in a[1:]):
                shown = repr(a[0].value)[:40] if a else "nothing"
                raise UnsafePickle(f"numpy dtype {shown}: only numeric dtypes are read (no objects, strings or "
                                   "records)")
            made.kind, made.value = "dtype", size
            return made
        if kind == "dtype-class":
            if a:
                raise UnsafePickle("a numpy dtype class called with arguments")
            made.kind = "dtype-class"
            return made
        if kind == "eval":
            if len(a) != 2 or a[0].kind != "str" or a[0].value != "data" or a[1].kind != "dict":
                raise RefusedGlobal("builtins.eval with other arguments than Paddle's tensor reduction")
            made.kind = "array"
            made.shared = True  # the array inside the dict: complete, never built again
            return made
        raise UnsafePickle(f"{kind} is not callable here")

    def _build(self, target: _Obj, state: _Obj) -> None:
        if target.kind == "dtype":  # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
            items = state.items or []
            if state.kind != "tuple" or len(items) < 5 or any(i.kind != "none" for i in items[2:5]):
                raise UnsafePickle("a numpy dtype with a sub-array, names or fields (only numeric dtypes are read)")
        elif target.kind == "array":  # (version, shape, dtype, is_fortran, raw bytes)
            items = state.items or []
            if state.kind != "tuple" or len(items) != 5 or items[1].kind != "tuple" or items[2].kind != "dtype" or \
                    items[4].kind not in ("bytes", "str"):
                raise UnsafePickle("a numpy array whose state is not (version, shape, dtype, order, bytes) (object "
                                   "arrays are not read)")
            shape = [i.value for i in items[1].items or []]
            if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
                raise UnsafePickle(f"a numpy array of shape {str(shape)[:60]}")
            count = 1
            for d in shape:
                count *= d
            declared, held = count * items[2].value, items[4].data
            if declared != held:
                raise UnsafePickle(f"a numpy array of shape {str(tuple(shape))[:60]} declares {declared:,} bytes and "
                                   f"holds {held:,}")
        else:
            raise UnsafePickle(f"BUILD on a {target.kind} (plain data sets the state of arrays and dtypes only)")
        if target.shared:
            raise UnsafePickle("BUILD on an object after it was referenced (paddle.save never does that)")
        target.nodes += state.nodes
        target.data += state.data
        target.depth = max(target.depth, 1 + state.depth)
        self._check(target)

    # -- the opcodes -------------------------------------------------------------------------------------------
    def run(self) -> None:
        limits, stack, memo, data, size = self.limits, self.stack, self.memo, self.data, self.size
        count, pos = 0, 0
        while True:
            if pos >= size:
                raise UnsafePickle("no STOP opcode (the file is truncated)")
            count += 1
            if count > limits.ops:
                raise UnsafePickle(f"more than {limits.ops:,} opcodes for {size:,} bytes (paddle.save of weights "
                                   "writes some 20 a tensor)")
            entry = _OPCODES.get(data[pos])
            if entry is None:
                raise UnsafePickle(f"byte {data[pos]:#04x} at offset {pos:,} is no pickle opcode")
            name, reader = entry
            start, pos = pos, pos + 1
            arg = None
            if reader is not None:
                arg, pos = reader(data, pos, size)
            if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                index = len(memo) if name == "MEMOIZE" else arg
                if not stack or stack[-1] is _MARK:
                    raise UnsafePickle("a memo entry of an empty stack")
                if not isinstance(index, int) or not 0 <= index <= limits.memo:
                    raise UnsafePickle(f"memo index {index!r:.20} (the file has {count:,} opcodes)")
                memo[index] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise UnsafePickle(f"memo index {arg!r:.20} read before it was written")
                memo[arg].shared = True
                stack.append(memo[arg])
            elif len(stack) >= limits.stack:
                raise UnsafePickle(f"more than {limits.stack:,} objects on the stack at once (objects nested or "
                                   "listed beyond what paddle.save writes)")
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "NONE":
                stack.append(_NONE)
            elif name in ("BININT1", "BININT2", "BININT", "INT", "LONG", "LONG1", "LONG4"):
                if isinstance(arg, bool):
                    stack.append(_TRUE if arg else _FALSE)
                elif 0 <= arg < 256:
                    stack.append(_SMALL_INTS[arg])
                else:
                    self._push(_Obj("int", 1, (abs(arg).bit_length() + 7) // 8, value=arg))
            elif name in _TEXT_OPS:
                length, text, begin = arg
                obj = _Obj("str", 1, length, value=text)
                obj.span = (begin, begin + length, "utf-8" if "UNICODE" in name else "latin-1")
                self._push(obj)
            elif name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"):
                self._push(_Obj("bytes", 1, arg[0]))
            elif name in ("BINFLOAT", "FLOAT"):
                stack.append(_FLOAT)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(_TRUE if name == "NEWTRUE" else _FALSE)
            elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE"):
                kind = name[6:].lower()
                self._push(_Obj(kind, items=[] if kind == "tuple" else None))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [self._pop() for _ in range(n)][::-1]
                self._push(self._container("tuple", items, keep=True))
            elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
                items = self._pop_mark()
                if name == "DICT" and len(items) % 2:
                    raise UnsafePickle("DICT of an odd number of items")
                if name in ("DICT", "FROZENSET"):
                    _check_keys(items[0::2] if name == "DICT" else items, "dict key" if name == "DICT" else "set item")
                self._push(self._container(name.lower(), items, keep=name == "TUPLE"))
            elif name == "APPEND":
                item = self._pop()
                self._add_to(stack[-1] if stack else _MARK, ("list",), [item], "APPEND")
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                items = self._pop_mark()
                if name == "SETITEMS" and len(items) % 2:
                    raise UnsafePickle("SETITEMS of an odd number of items")
                kinds = {"APPENDS": ("list",), "SETITEMS": ("dict",), "ADDITEMS": ("set",)}[name]
                self._add_to(stack[-1] if stack else _MARK, kinds, items, name)
            elif name == "SETITEM":
                value, key = self._pop(), self._pop()
                self._add_to(stack[-1] if stack else _MARK, ("dict",), [key, value], "SETITEM")
            elif name == "GLOBAL":
                module, attr = arg
                self._global(module, attr)
            elif name == "STACK_GLOBAL":
                attr, module = self._pop(), self._pop()
                if attr.kind != "str" or module.kind != "str" or attr.value is None or module.value is None:
                    raise UnsafePickle("STACK_GLOBAL of other objects than short strings")
                self._global(module.value, attr.value)
            elif name == "REDUCE":
                args, func = self._pop(), self._pop()
                self._push(self._reduce(func, args))
            elif name == "BUILD":
                state = self._pop()
                if not stack or stack[-1] is _MARK:
                    raise UnsafePickle("BUILD with no object")
                self._build(stack[-1], state)
            elif name == "POP":
                if stack and stack[-1] is _MARK:
                    stack.pop()
                else:
                    self._pop()
            elif name == "POP_MARK":
                self._pop_mark()
            elif name == "DUP":
                top = self._pop()
                top.shared = True
                stack += [top, top]
            elif name == "PROTO":
                if not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
                    raise UnsafePickle(f"pickle protocol {arg}")
            elif name == "FRAME":
                if arg > size - pos:
                    raise UnsafePickle(f"a frame of {arg:,} bytes where {size - pos:,} remain")
            elif name == "STOP":
                if len(stack) != 1 or stack[0] is _MARK:
                    raise UnsafePickle("the pickle stops with other than one object")
                if pos != size:
                    raise UnsafePickle(f"{size - pos:,} bytes after the end of the pickle")
                return
            else:  # INST, OBJ, NEWOBJ(_EX), EXT1/2/4, PERSID, BINPERSID, NEXT_BUFFER, READONLY_BUFFER
                raise UnsafePickle(f"opcode {name} at offset {start:,} (plain data never needs it)")

    def _global(self, module: str, attr: str) -> None:
        kind = _global_name(module, attr)
        if kind is None:
            raise RefusedGlobal(f"{module[:80]}.{attr[:80]}")
        self._push(_Obj("global", value=kind))


def scan(data: bytes) -> None:
    """Check ``data`` as described in the module docstring, building nothing; raises ``UnsafePickle`` (or
    ``RefusedGlobal``) with the reason."""
    _Scan(data).run()


# ---------------------------------------------------------------------------------------------------------- load
def _tensors_to_arrays(obj: Any, seen: Optional[Dict[int, Any]] = None) -> Any:
    """Paddle's ``tuple((name, ndarray))`` tensor reduction -> the ndarray, through dicts, lists and tuples (each
    object converted once: shared references stay shared)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ARRAY_KINDS:
            raise UnsafePickle(f"a numpy array of dtype {obj.dtype} (only numeric arrays are read)")
        return obj
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        out = _tensors_to_arrays(obj[1], seen)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _tensors_to_arrays(value, seen)
        out = obj
    elif isinstance(obj, list):
        out = [_tensors_to_arrays(v, seen) for v in obj]
    else:
        out = tuple(_tensors_to_arrays(v, seen) for v in obj)
    seen[id(obj)] = out
    return out


NAME_TABLE = "StructuredToParameterName@@"  # paddle.save's table of parameter names (paddle.load drops it)
BIG_PARAMS = "UnpackBigParamInfor@@"  # protocol 2/3 saves split arrays over 4 GB into slices


def _unpack_top_level(obj: Any) -> Any:
    """What ``paddle.load`` does to a loaded dict (``io_utils._pack_loaded_dict`` and the name table)."""
    if not isinstance(obj, dict):
        return obj
    big = obj.pop(BIG_PARAMS, None) or {}
    if not isinstance(big, dict):
        raise UnsafePickle(f"{BIG_PARAMS} is not a mapping")
    for key, info in big.items():
        if not isinstance(info, dict) or not isinstance(info.get("slices"), list):
            raise UnsafePickle(f"{BIG_PARAMS}[{str(key)[:60]!r}] is not a mapping with a list of slices")
        parts = [obj.pop(part) for part in info["slices"]]
        if not all(isinstance(p, np.ndarray) for p in parts):
            raise UnsafePickle(f"{BIG_PARAMS}[{str(key)[:60]!r}]: a slice that is not an array")
        obj[key] = np.concatenate(parts).reshape(info["OriginShape"])
    obj.pop(NAME_TABLE, None)
    return obj


def safe_loads(data: bytes) -> Any:
    """Unpickle ``paddle.save`` bytes of plain data as ``paddle.load(..., return_numpy=True)`` would return them
    (tensors as numpy arrays), after ``scan``; raises ``RefusedGlobal`` or ``UnsafePickle`` with the reason."""
    scan(data)
    return _unpack_top_level(_tensors_to_arrays(_RestrictedUnpickler(io.BytesIO(data)).load()))
