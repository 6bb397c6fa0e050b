"""The safetensors format, written and read here without a dependency, and read within bounds.

Layout (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header length ``N``, ``N``
bytes of JSON ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data, each tensor's bytes at its offsets from the start of the data (little-endian, C order). The format
holds no code and declares every size: ``SafetensorsFile`` checks all of them against the bytes present before it
builds any array (a header of at most 100 MB that fits in the file, known dtypes,
``prod(shape) x item size == end - begin``, offsets inside the data, neither overlapping nor leaving gaps), and
refuses anything else with one
``EMAFileError`` line naming the file. Files written here are read by ``safetensors.numpy.load_file`` and the
other way round (``tests/test_posthoc.py`` checks both).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ema_callback.errors import EMAFileError, one_line

MAX_HEADER = 16 << 20  # a snapshot's header lists its tensors: ~100 bytes each (the library itself allows 100 MB)
DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "F16": np.float16,
          "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64, "I64": np.int64,
          "F64": np.float64}
NAMES = {np.dtype(v).str.lstrip("<|="): k for k, v in DTYPES.items()}


def _code(dtype: np.dtype) -> str:
    code = NAMES.get(np.dtype(dtype).newbyteorder("<").str.lstrip("<|="))
    if code is None:
        raise EMAFileError(f"dtype {dtype}: safetensors stores numeric and bool tensors only")
    return code


def dumps(tensors: Mapping[str, np.ndarray],
          metadata: Union[None, Mapping[str, str], Callable[[str], Mapping[str, str]]] = None) -> bytes:
    """The safetensors bytes of ``tensors`` (in their order) with ``metadata`` (strings), or with
    ``metadata(sha256 of the data section)`` when it is a function (to sign the data in the header)."""
    chunks, entries, offset = [], {}, 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(value, dtype=np.dtype(value.dtype).newbyteorder("<"))
        data = array.tobytes()
        entries[name] = {"dtype": _code(array.dtype), "shape": list(array.shape),
                         "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    body = b"".join(chunks)
    if callable(metadata):
        metadata = metadata(hashlib.sha256(body).hexdigest())
    header: Dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    header.update(entries)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text + body


class SafetensorsFile:
    """A safetensors file opened for reading: the header is read and every declared size checked against the file
    (see the module docstring); tensors are read on demand (``array``, ``data_sha256``), each read reopening the file
    and checking it is still the one checked, so a folder of snapshots holds neither memory nor file handles. A FIFO
    or device under the name is refused without blocking."""

    def __init__(self, path: str):
        self.path = path
        fd = self._open()
        try:
            info = os.fstat(fd)
            self.size = info.st_size
            self._identity = (info.st_ino, info.st_size, info.st_mtime_ns)
            self._header(fd)
        finally:
            os.close(fd)

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise EMAFileError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise EMAFileError(f"{self.path}: not a regular file")
        return fd

    def _reopened(self) -> int:
        fd = self._open()
        info = os.fstat(fd)
        if (info.st_ino, info.st_size, info.st_mtime_ns) != self._identity:
            os.close(fd)
            raise EMAFileError(f"{self.path}: changed since it was checked; read it again")
        return fd

    def _read(self, fd: int, offset: int, length: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise EMAFileError(f"{self.path}: truncated ({len(data):,} of {length:,} bytes at offset {offset:,})")
        return data

    def _header(self, fd: int) -> None:
        path = self.path
        if self.size < 8:
            raise EMAFileError(f"{path}: not a safetensors file ({self.size} bytes, shorter than its header length)")
        (size,) = struct.unpack("<Q", self._read(fd, 0, 8))
        if size > MAX_HEADER or size > self.size - 8:
            raise EMAFileError(f"{path}: not a safetensors file (a header of {size:,} bytes declared; the file holds "
                               f"{self.size - 8:,} after the length, and at most {MAX_HEADER:,} are read)")
        text = self._read(fd, 8, size)
        containers = text.count(b"{") + text.count(b"[")
        if containers > size // 16 + 16:  # a tensor entry is ~60 bytes with 3 of them: '{},{},...' is not
            raise EMAFileError(f"{path}: damaged safetensors header ({containers:,} objects in {size:,} bytes)")
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise EMAFileError(f"{path}: damaged safetensors header ({type(exc).__name__}: {one_line(exc, 100)})") \
                from None
        if not isinstance(header, dict):
            raise EMAFileError(f"{path}: damaged safetensors header (not a mapping)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise EMAFileError(f"{path}: damaged safetensors header (__metadata__ is not a mapping of strings)")
        self.metadata: Dict[str, str] = metadata
        self.data_start = 8 + size
        body = self.size - self.data_start
        spans, self.tensors = [], {}
        for name, entry in header.items():
            shown = one_line(repr(name), 80)
            if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
                raise EMAFileError(f"{path}: tensor {shown}: no known dtype ({', '.join(DTYPES)})")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not isinstance(shape, list) or len(shape) > 32 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 48 for d in shape):
                raise EMAFileError(f"{path}: tensor {shown}: shape {one_line(repr(shape), 80)} is not a list of sizes")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                    isinstance(o, int) and not isinstance(o, bool) for o in offsets) or \
                    not 0 <= offsets[0] <= offsets[1] <= body:
                raise EMAFileError(f"{path}: tensor {shown}: offsets {one_line(repr(offsets), 80)} lie outside the "
                                   f"{body:,} bytes of data")
            dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
            count = 1
            for d in shape:
                count *= d
            if count * dtype.itemsize != offsets[1] - offsets[0]:
                raise EMAFileError(f"{path}: tensor {shown}: shape {shape} of {entry['dtype']} needs "
                                   f"{count * dtype.itemsize:,} bytes, its offsets hold {offsets[1] - offsets[0]:,}")
            spans.append((offsets[0], offsets[1], name))
            self.tensors[name] = (dtype, tuple(shape), offsets[0], offsets[1])
        position = 0
        for begin, end, name in sorted(spans):
            if begin != position:
                raise EMAFileError(f"{path}: tensor {one_line(repr(name), 80)}: its bytes "
                                   f"{'overlap another tensor' if begin < position else 'leave a gap'} (offset "
                                   f"{begin:,}, expected {position:,})")
            position = end
        if position != body:
            raise EMAFileError(f"{path}: {body - position:,} bytes of data belong to no tensor")

    def names(self) -> List[str]:
        return list(self.tensors)

    def spec(self, name: str) -> Optional[Tuple[np.dtype, Tuple[int, ...]]]:
        """``(dtype, shape)`` of a tensor (native byte order), None if the file has no such tensor."""
        entry = self.tensors.get(name)
        return (entry[0].newbyteorder("="), entry[1]) if entry else None

    def array(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.tensors[name]
        fd = self._reopened()
        try:
            data = self._read(fd, self.data_start + begin, end - begin)
        finally:
            os.close(fd)
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def data_sha256(self) -> str:
        """sha256 of the data section, read in blocks."""
        digest, offset = hashlib.sha256(), self.data_start
        fd = self._reopened()
        try:
            while offset < self.size:
                block = self._read(fd, offset, min(1 << 22, self.size - offset))
                digest.update(block)
                offset += len(block)
        finally:
            os.close(fd)
        return digest.hexdigest()
