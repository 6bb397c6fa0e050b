"""Where the shadow lives and how one update pass runs over it.

All stores hold the averaged tensors and implement the same two operations:

* ``lerp_(sources, weight)``: ``s = s + weight * (w - s)`` (= ``(1 - weight) * s + weight * w``, rounded once
  per step instead of twice) for every tensor, or nothing at all when any source holds a NaN/Inf (returns
  ``False``; the device path returns that decision as a device bool); with ``reset=True`` the old ``s`` counts as 0;
* ``copy_(sources)``: ``s = w`` (same NaN/Inf rule).

A store holds ``count`` shadows (several EMAs of the same weights, ``EMA.decays``); ``weight`` is then one value per
shadow and one pass serves them all: the sources are gathered and checked once, and each chunk of a source is read
from memory once and applied to every shadow while it sits in cache. Shadow 0 is the primary; methods that read or
write values take ``shadow=`` (default 0).

``NumpyStore`` (CPU, float32): one contiguous float32 buffer; sources are read through zero-copy views of
the live tensors' memory (``paddle_compat.host_view``, the same on Paddle 2.6 and 3.x) and the update runs in
cache-sized chunks (3 numpy ops per 64Ki elements, one scratch buffer). It is bound by the memory bandwidth of one
core: a flat float32 update moves 12 bytes per element, the guarded one 16 (the NaN/Inf test reads every weight
before anything is written). What ``benchmarks/bench_update.py`` measured, with its spread and the CPU, is in
docs/performance.md.

``PaddleStore`` (the device path: weights on a GPU, or float16/bfloat16 storage): one flat Paddle tensor; an update
makes no host synchronisation (see the class docstring for its passes, bytes and allocations).

``ReferenceStore``: the textbook per-tensor loop ``s = d*s + (1-d)*w``; kept for tests to compare against.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ema_callback.paddle_compat import cast_rounded, data_pointers, host_flat, host_view, move_to, paddle

CHUNK = 1 << 16  # elements per numpy pass: 256 KiB of float32 stays in L2


def _as_fp32(tensor: paddle.Tensor) -> paddle.Tensor:
    return tensor if tensor.dtype == paddle.float32 else tensor.astype(paddle.float32)


def _is_cpu(tensor: paddle.Tensor) -> bool:
    return tensor.place.is_cpu_place()


def _contiguous_view(tensor: paddle.Tensor) -> bool:
    """Whether ``host_flat`` reads the tensor without a copy (so a cached view stays current)."""
    view = host_view(tensor)
    return view is not None and view.flags.c_contiguous


def per_shadow(weight, count: int) -> list:
    """``weight`` (a number, a sequence, or a 0-d/[count] device tensor) as one value per shadow."""
    if isinstance(weight, paddle.Tensor):
        return [weight.reshape([-1])[j] for j in range(count)] if weight.ndim else [weight] * count
    if isinstance(weight, (list, tuple, np.ndarray)):
        if len(weight) != count:
            raise ValueError(f"{len(weight)} weights for {count} shadows")
        return list(weight)
    return [weight] * count


class ShadowStore:
    """Common interface; ``shapes`` are the shapes of the averaged tensors, in order; ``count`` shadows of them."""

    def __init__(self, shapes: Sequence[Sequence[int]], count: int = 1):
        self.count = int(count)
        self.shapes = [list(s) for s in shapes]
        self.sizes = [int(np.prod(s)) if len(s) else 1 for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.numel = int(self.offsets[-1])

    check_finite = True  # the NaN/Inf guard (EMA.nan_guard)
    pausable: frozenset = frozenset()  # shadows whose weight is 0 between their own updates (posthoc.update_every)

    def lerp_(self, sources: Sequence[paddle.Tensor], weight, reset: bool = False) -> bool:
        raise NotImplementedError

    def copy_(self, sources: Sequence[paddle.Tensor]) -> bool:
        return self.lerp_(sources, 1.0, reset=True)

    def read_segments(self, indices: Sequence[int], shadow: int = 0) -> np.ndarray:
        """The listed tensors, flattened and concatenated (float32)."""
        values = self.numpy_values(shadow)
        return np.concatenate([values[i].reshape(-1) for i in indices]) if indices else np.zeros(0, np.float32)

    def write_segments(self, indices: Sequence[int], flat: np.ndarray, shadow: int = 0) -> None:
        values, start = self.numpy_values(shadow), 0
        for i in indices:
            values[i] = flat[start:start + self.sizes[i]].reshape(self.shapes[i])
            start += self.sizes[i]
        self.set_numpy_values(values, shadow)

    def numpy_values(self, shadow: int = 0) -> List[np.ndarray]:
        """float32 copies of the shadow tensors, shaped like the originals."""
        raise NotImplementedError

    def set_numpy_values(self, values: Sequence[np.ndarray], shadow: int = 0) -> None:
        raise NotImplementedError

    def tensor_values(self, indices: Optional[Sequence[int]] = None, shadow: int = 0) -> List[paddle.Tensor]:
        """The shadow tensors (all, or the listed ones) as float32 Paddle tensors (on the store's device)."""
        values = self.numpy_values(shadow)
        return [paddle.to_tensor(values[i]) for i in _selected(indices, len(values))]

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


SMALL = 16384  # tensors below this many elements are gathered with one np.concatenate per step: a copy of up to
# 64 KiB costs less than the Python calls of updating it on its own (models of hundreds of small BatchNorm and bias
# tensors, such as picodet-xs in make bench)
PARALLEL_MIN = 1 << 20  # with several shadows of at least this many elements, two threads share them
BLOCK = 4 * CHUNK  # what one thread takes at a time from the weights when two share them
_WORKER = None


def _worker():
    """One worker thread (numpy releases the GIL in its array loops): with several EMAs it and the calling thread
    take blocks of the weights in turn from one list, each updating every shadow over its blocks, so that a
    thread that gets no core (other work on the machine) leaves its share to the one that has one."""
    global _WORKER
    if _WORKER is None:
        from concurrent.futures import ThreadPoolExecutor

        _WORKER = ThreadPoolExecutor(1, thread_name_prefix="ema-callback")
    return _WORKER


def _lerp_chunks(pairs, indices, takes, scratch) -> None:
    """``s += take * (w - s)`` for the shadows ``indices``, chunk by chunk: each chunk of a source is read from
    memory once and applied to those shadows while it is in cache (3 numpy ops per chunk and shadow)."""
    indices = list(indices)
    for shadows, source in pairs:
        for start in range(0, source.size, CHUNK):
            w = source[start:start + CHUNK]
            for j in indices:
                s = shadows[j][start:start + CHUNK]
                t = scratch[:s.size]
                np.subtract(w, s, out=t)
                t *= takes[j]
                s += t


def _blocks(pairs, size: int) -> list:
    """``pairs`` cut into pieces of at most ``size`` elements (views: the shadows' pieces write into the store)."""
    return [([s[a:a + size] for s in shadows], source[a:a + size]) if size < source.size else (shadows, source)
            for shadows, source in pairs for a in range(0, source.size, size)]


def _lerp_shared(blocks, indices, takes, scratch) -> None:
    """``_lerp_chunks`` over the blocks this thread takes from ``blocks``, an iterator shared with the other thread
    (taking the next block is atomic under the GIL): each block is updated once, by whichever thread is free."""
    for block in blocks:
        _lerp_chunks([block], indices, takes, scratch)


def _finite(array: np.ndarray) -> bool:
    """Whether a flat float32 array holds no NaN/Inf: one BLAS dot of its first half with its second half (the
    middle element in both for an odd size). A NaN or Inf in either half makes its product, hence the dot, NaN or
    Inf (``inf * 0`` and ``inf - inf`` are NaN). The dot reads two streams of memory at once, which one core pulls
    faster than the single stream of a dot of the array with itself. Only finite values whose dot overflows
    (|w| > ~1e19) also land on the element-wise test, which confirms that rare case."""
    half = (array.size + 1) // 2
    return bool(np.isfinite(np.dot(array[:half], array[array.size - half:]))) or bool(np.isfinite(array).all())


class NumpyStore(ShadowStore):
    """float32 shadow in host memory, updated with chunked numpy passes over zero-copy views of the weights.

    Layout: tensors of at least ``SMALL`` elements first, each updated chunk by chunk through a zero-copy
    view of its source; then all small tensors in one contiguous segment, whose sources are gathered with
    one ``np.concatenate`` per step (a model's hundreds of BatchNorm and bias tensors cost one call, not
    hundreds).
    """

    def __init__(self, shapes: Sequence[Sequence[int]], count: int = 1):
        super().__init__(shapes, count)
        self.big = [i for i, n in enumerate(self.sizes) if n >= SMALL]
        self.small = [i for i, n in enumerate(self.sizes) if n < SMALL]
        self.layout = self.big + self.small
        self.flats = [np.zeros(self.numel, dtype=np.float32) for _ in range(self.count)]
        positions, start = {}, 0
        for i in self.layout:
            positions[i] = start
            start += self.sizes[i]
        self.small_start = positions[self.small[0]] if self.small else self.numel
        self._views_of = [[flat[positions[i]:positions[i] + self.sizes[i]] for i in range(len(self.sizes))]
                          for flat in self.flats]
        self._small_buffer = np.empty(self.numel - self.small_start, dtype=np.float32)
        self._scratch = np.empty(min(CHUNK, max(self.numel, 1)), dtype=np.float32)
        self._scratch2: Optional[np.ndarray] = None  # the second thread's, with several shadows
        self._source_ptrs: Optional[List[int]] = None
        self._source_views: List[np.ndarray] = []
        self._strided: List[int] = []
        self._gathered: Optional[paddle.Tensor] = None

    @property
    def flat(self) -> np.ndarray:
        return self.flats[0]

    def view(self, i: int, shadow: int = 0) -> np.ndarray:
        """The flat float32 shadow of tensor ``i`` (a view into the store)."""
        return self._views_of[shadow][i]

    def _pairs(self, sources: Sequence[paddle.Tensor]):
        """(shadows, source) pairs to update, flat float32 arrays: each big tensor, then the small segment; the
        shadows as a list (one array per EMA)."""
        ptrs = data_pointers(sources)
        if ptrs == self._source_ptrs or all(_is_cpu(s) and s.dtype == paddle.float32 for s in sources):
            if ptrs != self._source_ptrs:  # new or re-allocated tensors (set_state_dict, to(), ...)
                # zero-copy views of contiguous tensors stay valid while the allocation does (the pointers are
                # compared every step); a strided tensor flattens to a copy, so those are re-read every step
                self._strided = [i for i, s in enumerate(sources) if not _contiguous_view(s)]
                self._source_views = [host_flat(s.detach()) for s in sources]
                self._source_ptrs = ptrs
            for i in self._strided:
                self._source_views[i] = host_flat(sources[i].detach())
            views = self._source_views
            pairs = [([v[i] for v in self._views_of], views[i]) for i in self.big]
            if self.small:
                np.concatenate([views[i] for i in self.small], out=self._small_buffer)
        else:  # GPU weights or other dtypes: one concat on their device (in layout order), one copy to host
            self._source_ptrs = None
            flat = paddle.concat([_as_fp32(sources[i].detach()).reshape([-1]) for i in self.layout]).cpu()
            self._gathered = flat  # the host view below reads its memory: keep it alive while pairs are used
            host = host_flat(flat)
            pairs, start = [], 0
            for i in self.big:
                pairs.append(([v[i] for v in self._views_of], host[start:start + self.sizes[i]]))
                start += self.sizes[i]
            self._small_buffer[...] = host[start:]
        if self.small:
            pairs.append(([flat[self.small_start:] for flat in self.flats], self._small_buffer))
        return pairs

    @staticmethod
    def _all_finite(arrays: Sequence[np.ndarray]) -> bool:
        return all(_finite(array) for array in arrays)

    def lerp_(self, sources: Sequence[paddle.Tensor], weight, reset: bool = False) -> bool:
        pairs = self._pairs(sources)
        if self.check_finite and not self._all_finite([source for _, source in pairs]):
            return False
        weights = per_shadow(weight, self.count)
        takes = [np.float32(w) for w in weights]
        scratch = self._scratch
        if reset:  # the old shadow counts as 0
            for shadows, source in pairs:
                for shadow, w, take in zip(shadows, weights, takes):
                    if w == 1.0:
                        np.copyto(shadow, source)
                    else:
                        np.multiply(source, take, out=shadow)
            return True
        active = [j for j, w in enumerate(weights) if w != 0.0]  # weight 0 (a profile between its updates): untouched
        if len(active) > 1 and self.numel >= PARALLEL_MIN:  # two threads share the blocks of the weights
            if self._scratch2 is None:
                self._scratch2 = np.empty_like(self._scratch)
            blocks = iter(_blocks(pairs, BLOCK))
            other = _worker().submit(_lerp_shared, blocks, active, takes, self._scratch2)
            try:
                _lerp_shared(blocks, active, takes, scratch)
            finally:
                other.result()
        else:
            _lerp_chunks(pairs, active, takes, scratch)
        return True

    def numpy_values(self, shadow: int = 0) -> List[np.ndarray]:
        return [v.reshape(shape).copy() for v, shape in zip(self._views_of[shadow], self.shapes)]

    def read_segments(self, indices: Sequence[int], shadow: int = 0) -> np.ndarray:
        views = self._views_of[shadow]
        return np.concatenate([views[i] for i in indices]) if indices else np.zeros(0, np.float32)

    def write_segments(self, indices: Sequence[int], flat: np.ndarray, shadow: int = 0) -> None:
        start = 0
        for i in indices:
            self._views_of[shadow][i][...] = flat[start:start + self.sizes[i]]
            start += self.sizes[i]

    def set_numpy_values(self, values: Sequence[np.ndarray], shadow: int = 0) -> None:
        for view, value in zip(self._views_of[shadow], values):
            view[...] = np.asarray(value, dtype=np.float32).reshape(-1)

    def tensor_values(self, indices: Optional[Sequence[int]] = None, shadow: int = 0) -> List[paddle.Tensor]:
        views = self._views_of[shadow]
        return [paddle.to_tensor(views[i].reshape(self.shapes[i]), place=paddle.CPUPlace())
                for i in _selected(indices, len(views))]

    @property
    def nbytes(self) -> int:
        return int(sum(flat.nbytes for flat in self.flats))


class PaddleStore(ShadowStore):
    """The device path: one flat Paddle tensor of ``dtype`` on ``place``; arithmetic in float32.

    An update makes **no host synchronisation**: every decision stays on the device. ``lerp_`` returns a 0-d
    device bool ``ok`` (all sources finite and, under AMP, the step not skipped by the GradScaler) instead of a
    Python bool, and a skipped update leaves the shadow bit-identical through ``where_``. Per update, on the
    gathered float32 temporary ``t`` (the one full-size float32 allocation) and the shadow ``s``::

        t = concat(w)                      gather (4 B/element, the only full-size float32 temporary)
        mask = isfinite(t); ok = mask.all() & ~skip; mask &= ok
                                           one full-size bool (1 B/element): the exact NaN/Inf test, and-ed
                                           in place with ok so that where_ needs no broadcast copy
        s *= 1 - first*ok                  only with bias_correction (the first update starts from 0)
        t.lerp_(s, d)                      in place, one fused pass: t + d*(s - t) = s + (1-d)*(w - s)
        where_(mask, t, s); s <- t         in place; then t becomes the shadow (no copy pass)

    About 41 bytes move per element against the 12 of one flat ``lerp_`` (the floor): 8 for the gather, 8 for
    the mask and its reductions, 12 for the lerp, 13 for the where. With ``nan_guard: false`` and no AMP there is
    no mask and no where: 20 bytes. With float16/bfloat16 storage the float32 view of the shadow and the rounded
    cast back are two more temporaries (4 and 2 B/element). The allocation counts are asserted by
    ``tests/test_device_path.py``; the CPU timings by ``benchmarks/bench_update.py`` (device-path rows).
    """

    deferred = True  # lerp_/copy_ answer with a device bool, read on the host only when asked

    def __init__(self, shapes: Sequence[Sequence[int]], dtype: str = "float32", place=None, count: int = 1):
        super().__init__(shapes, count)
        self.dtype = dtype
        self.place = place
        self.flats = []
        with paddle.no_grad():
            for _ in range(self.count):
                flat = paddle.zeros([self.numel], dtype=dtype)
                flat = move_to(flat, place) if place is not None else flat
                flat.stop_gradient = True
                self.flats.append(flat)

    @property
    def flat(self) -> paddle.Tensor:
        """The primary shadow (one flat tensor)."""
        return self.flats[0]

    def _gather(self, sources: Sequence[paddle.Tensor]) -> paddle.Tensor:
        pieces = [_as_fp32(s.detach()).reshape([-1]) for s in sources]
        flat = paddle.concat(pieces) if len(pieces) > 1 else pieces[0].clone()
        return move_to(flat, self.flat.place)

    def _decision(self, gathered: paddle.Tensor, skip):
        """(ok, condition): ``ok`` a 0-d device bool; ``condition`` the full-size bool for ``where_`` (the NaN/Inf
        mask itself, and-ed in place with ``ok``, so no broadcast copy), or None when nothing can skip."""
        if not self.check_finite:
            if skip is None:
                return None, None
            ok = paddle.logical_not(move_to(skip.reshape([]), gathered.place))
            return ok, ok
        mask = paddle.isfinite(gathered)
        ok = mask.all()
        if skip is not None:
            ok = paddle.logical_and(ok, paddle.logical_not(move_to(skip.reshape([]), ok.place)))
        mask.logical_and_(ok)  # all true where the update goes through, all false where it is skipped
        return ok, mask

    def _write(self, new: paddle.Tensor, shadow: int = 0) -> None:
        """The new shadow: float32 takes ``new``'s allocation (no copy pass); other dtypes a rounded cast into it."""
        if self.dtype == "float32":
            new.stop_gradient = True
            self.flats[shadow] = new
        else:
            paddle.assign(cast_rounded(new, self.dtype), output=self.flats[shadow])

    def lerp_(self, sources: Sequence[paddle.Tensor], weight, reset=False, skip=None):
        """``s += weight * (w - s)`` unless a source is NaN/Inf or ``skip`` (a device bool) is set; with ``reset``
        (a bool or device bool) the old ``s`` counts as 0. ``weight`` is a float or a 0-d device tensor (one per
        shadow: a sequence or a [count] tensor). Returns the device bool ``ok`` (or None when neither the NaN/Inf
        guard nor ``skip`` can skip the update). The sources are gathered and checked once for all shadows; the
        primary (shadow 0) is updated last, in the gathered buffer's allocation, each other shadow in a new one."""
        with paddle.no_grad():
            t = self._gather(sources)
            ok, condition = self._decision(t, skip)
            copy = reset is True and not isinstance(weight, paddle.Tensor) and all(
                w == 1.0 for w in per_shadow(weight, self.count))
            weights = per_shadow(weight, self.count)
            for j in reversed(range(self.count)):
                shadow = self.flats[j] if self.dtype == "float32" else self.flats[j].astype("float32")
                if copy:  # a plain copy: no arithmetic
                    new = t if j == 0 else t.clone()
                    if condition is not None:
                        paddle.where_(condition, new, shadow)
                    self._write(new, j)
                    continue
                if reset is not False:  # zero the shadow where this update is the first one (and goes through)
                    first = reset if ok is None else (paddle.logical_and(ok, reset)
                                                      if isinstance(reset, paddle.Tensor) else ok)
                    if isinstance(first, paddle.Tensor):
                        shadow.multiply_(1.0 - first.astype("float32"))
                    else:
                        shadow.zero_()
                w = weights[j]
                keep = (1.0 - w).astype("float32") if isinstance(w, paddle.Tensor) else \
                    paddle.full_like(t[:1], 1.0 - w).reshape([])
                if j == 0:
                    new = t.lerp_(shadow, keep)  # t + d*(s - t) = s + (1-d)*(w - s): one fused pass, in place
                else:
                    new = paddle.lerp(t, shadow, keep)
                    if j in self.pausable and isinstance(w, paddle.Tensor):  # weight 0: the shadow bit for bit
                        paddle.where_(w.astype("float32") > 0, new, shadow)
                if condition is not None:
                    paddle.where_(condition, new, shadow)  # a skipped update keeps s bit for bit
                self._write(new, j)
        return ok

    def copy_(self, sources: Sequence[paddle.Tensor], skip=None) -> paddle.Tensor:
        return self.lerp_(sources, 1.0, reset=True, skip=skip)

    def numpy_values(self, shadow: int = 0) -> List[np.ndarray]:
        host = _as_fp32(self.flats[shadow]).numpy()
        return [host[self.offsets[i]:self.offsets[i + 1]].reshape(shape).copy()
                for i, shape in enumerate(self.shapes)]

    def read_segments(self, indices: Sequence[int], shadow: int = 0) -> np.ndarray:
        flat = self.flats[shadow]
        pieces = [_as_fp32(flat[int(self.offsets[i]):int(self.offsets[i + 1])]) for i in indices]
        return paddle.concat(pieces).numpy() if pieces else np.zeros(0, np.float32)

    def write_segments(self, indices: Sequence[int], flat: np.ndarray, shadow: int = 0) -> None:
        start, target = 0, self.flats[shadow]
        with paddle.no_grad():
            for i in indices:
                a, b = int(self.offsets[i]), int(self.offsets[i + 1])
                piece = cast_rounded(paddle.to_tensor(flat[start:start + self.sizes[i]]), self.dtype)
                target[a:b] = move_to(piece, target.place)
                start += self.sizes[i]

    def set_numpy_values(self, values: Sequence[np.ndarray], shadow: int = 0) -> None:
        host = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in values]) if values else \
            np.zeros(0, np.float32)
        target = self.flats[shadow]
        with paddle.no_grad():
            paddle.assign(move_to(cast_rounded(paddle.to_tensor(host), self.dtype), target.place), output=target)

    def tensor_values(self, indices: Optional[Sequence[int]] = None, shadow: int = 0) -> List[paddle.Tensor]:
        flat = _as_fp32(self.flats[shadow])
        pieces = paddle.split(flat, self.sizes) if len(self.sizes) > 1 else [flat]
        return [pieces[i].reshape(self.shapes[i]) for i in _selected(indices, len(pieces))]

    @property
    def nbytes(self) -> int:
        return int(self.count * self.numel * self.flats[0].element_size())


class ReferenceStore(ShadowStore):
    """Per-tensor float64 Paddle tensors and the textbook out-of-place update (slow; for tests)."""

    def __init__(self, shapes: Sequence[Sequence[int]], count: int = 1):
        super().__init__(shapes, count)
        self.tensors_of = [[paddle.zeros(shape if shape else [], dtype="float64") for shape in self.shapes]
                           for _ in range(self.count)]

    def lerp_(self, sources: Sequence[paddle.Tensor], weight, reset: bool = False) -> bool:
        with paddle.no_grad():
            ws = [s.detach().astype(paddle.float64).cpu() for s in sources]
            if self.check_finite and not all(bool(paddle.isfinite(w).all()) for w in ws):
                return False
            for tensors, take in zip(self.tensors_of, per_shadow(weight, self.count)):
                d = 1.0 - take
                for i, w in enumerate(ws):
                    old = paddle.zeros_like(tensors[i]) if reset else tensors[i]
                    tensors[i] = d * old + take * w
        return True

    def numpy_values(self, shadow: int = 0) -> List[np.ndarray]:
        return [t.numpy().astype(np.float32) for t in self.tensors_of[shadow]]

    def set_numpy_values(self, values: Sequence[np.ndarray], shadow: int = 0) -> None:
        self.tensors_of[shadow] = [paddle.to_tensor(np.asarray(v, dtype=np.float64).reshape(shape))
                                   for v, shape in zip(values, self.shapes)]

    def tensor_values(self, indices: Optional[Sequence[int]] = None, shadow: int = 0) -> List[paddle.Tensor]:
        tensors = self.tensors_of[shadow]
        return [tensors[i].astype(paddle.float32) for i in _selected(indices, len(tensors))]

    @property
    def nbytes(self) -> int:
        return 8 * self.numel * self.count


def _selected(indices: Optional[Sequence[int]], count: int) -> Sequence[int]:
    return range(count) if indices is None else indices


BACKENDS = ("auto", "numpy", "paddle", "reference")


def choose_backend(backend: Optional[str], update_path: Optional[str], where: str) -> str:
    """The ``backend`` keyword of ``where`` (``ExponentialMovingAverage``, ``EMACallback``), checked: one of
    ``BACKENDS`` (default ``auto``). ``update_path`` is its old name: still read, with one deprecation line; both
    given is an error, as is an unknown value (it would silently run another store)."""
    from ema_callback.config.deprecated import warn_once
    from ema_callback.errors import EMAConfigError

    if update_path is not None:
        if backend is not None:
            raise EMAConfigError(f"{where}(update_path={update_path!r}, backend={backend!r}): one option given twice; "
                                 "update_path is the old name of backend: give backend only")
        warn_once(f"{where}(update_path=...): read as backend={update_path!r} (its new name)")
        backend = update_path
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise EMAConfigError(f"{where}(backend={backend!r}): expected one of {', '.join(BACKENDS)}")
    return backend


def make_store(shapes: Sequence[Sequence[int]], storage_dtype: str, on_host: bool, backend: str = "auto",
               place=None, count: int = 1) -> ShadowStore:
    """Choose the store: ``backend`` is ``auto`` (fastest for the case), ``numpy``, ``paddle`` or ``reference``;
    ``count`` shadows (EMAs) of the same tensors."""
    if backend == "reference":
        return ReferenceStore(shapes, count)
    if backend == "numpy" or (backend == "auto" and on_host and storage_dtype == "float32"):
        if storage_dtype != "float32":
            from ema_callback.errors import EMAConfigError

            raise EMAConfigError(f"EMA.storage_dtype: {storage_dtype} with backend='numpy', which stores float32 "
                                 "only; use backend 'auto' or 'paddle', or storage_dtype float32")
        return NumpyStore(shapes, count)
    return PaddleStore(shapes, dtype=storage_dtype, place=paddle.CPUPlace() if on_host else place, count=count)
