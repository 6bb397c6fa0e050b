"""The host store's NaN/Inf test (``storage._finite``: a dot of an array's two halves) misses no position: a NaN or
Inf anywhere, the middle element of an odd size included, skips the update and leaves every shadow bit for bit; finite
values whose dot overflows are still finite."""
import numpy as np
import pytest

from ema_callback.core.storage import NumpyStore, _finite

SIZES = [1, 2, 3, 4, 5, 8, 4097, 65537]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_position_is_tested(size, bad):
    for partner in (0.0, 1.5):  # inf * 0 is NaN; inf * x is inf
        for position in range(size) if size < 100 else (0, size // 2, size // 2 + 1, size - 1):
            array = np.full(size, partner, np.float32)
            array[position] = bad
            assert not _finite(array), (size, bad, partner, position)


@pytest.mark.parametrize("size", SIZES + [0])
def test_finite_arrays_pass_even_where_the_dot_overflows(size):
    rng = np.random.default_rng(size)
    assert _finite(rng.standard_normal(size).astype(np.float32))
    assert _finite(np.full(size, 3e30, np.float32))  # the dot is inf: confirmed element-wise


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_poisoned_element_anywhere_skips_the_whole_update(bad):
    shapes = [[4097], [7], [3, 3], [65537]]  # big tensors updated through views, small ones gathered
    store = NumpyStore(shapes, count=2)
    rng = np.random.default_rng(0)
    for shadow in range(2):
        store.set_numpy_values([rng.standard_normal(s).astype(np.float32) for s in shapes], shadow)
    before = [flat.copy() for flat in store.flats]
    import paddle

    for i, shape in enumerate(shapes):
        for position in sorted({0, int(np.prod(shape)) // 2, int(np.prod(shape)) - 1}):
            values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            values[i].flat[position] = bad
            assert store.lerp_([paddle.to_tensor(v) for v in values], [0.1, 0.01]) is False
            assert all(np.array_equal(a, b) for a, b in zip(store.flats, before))
