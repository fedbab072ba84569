"""Shared-memory page pool: layout, allocation, dtype round trips, cross-process attach, cleanup."""

import multiprocessing as mp

import numpy as np
import pytest

from icecache_ray.pool import (
    PagePool,
    PoolExhausted,
    PoolLayout,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    list_leaked_segments,
)


def _layout(dtype="float32", capacity=8):
    return PoolLayout(capacity_pages=capacity, page_size=4, head_dim=3, dtype=dtype)


def test_layout_validation_names_the_field():
    with pytest.raises(ValueError, match="PoolLayout.dtype='int8'"):
        _layout(dtype="int8")
    with pytest.raises(ValueError, match="PoolLayout.capacity_pages=0"):
        _layout(capacity=0)
    assert _layout().page_bytes == 2 * 4 * 3 * 4


def test_alloc_free_lowest_first_and_exhaustion():
    with PagePool.create(_layout()) as pool:
        assert pool.alloc(3).tolist() == [0, 1, 2]
        pool.free([1])
        assert pool.alloc(2).tolist() == [1, 3]
        assert (pool.num_used, pool.num_free) == (4, 4)
        with pytest.raises(PoolExhausted, match="5 pages requested but only 4 of 8 are free"):
            pool.alloc(5)
        assert pool.num_free == 4  # a failed alloc takes nothing
        with pytest.raises(ValueError, match="double free"):
            pool.free([0, 0])
        pool.free([0])
        with pytest.raises(ValueError, match="double free"):
            pool.free([0])
        with pytest.raises(ValueError, match="n must be a positive integer"):
            pool.alloc(0)
        with pytest.raises(ValueError, match="must be in"):
            pool.free([99])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_write_read_roundtrip(dtype):
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((3, 3)).astype(np.float32), rng.standard_normal((3, 3)).astype(np.float32)
    with PagePool.create(_layout(dtype)) as pool:
        pool.write(5, k, v, offset=1)
        page = pool.read([5])[0]
        tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
        np.testing.assert_allclose(page[0, 1:4], k, rtol=tol, atol=tol)
        np.testing.assert_allclose(page[1, 1:4], v, rtol=tol, atol=tol)
        assert (page[:, 0] == 0).all()


def test_bf16_conversion_rounds_to_nearest_even():
    x = np.array([1.0, -2.5, 3.14159, 1e-20, 65504.0], np.float32)
    back = bf16_bits_to_float32(float32_to_bf16_bits(x))
    np.testing.assert_allclose(back, x, rtol=2**-8)
    assert float32_to_bf16_bits(np.array([1.0], np.float32))[0] == 0x3F80


def test_bad_writes_are_rejected():
    with PagePool.create(_layout()) as pool:
        good = np.zeros((2, 3), np.float32)
        with pytest.raises(ValueError, match="NaN or inf"):
            pool.write(0, np.full((2, 3), np.nan), good)
        with pytest.raises(ValueError, match=r"must both be \[n, 3\]"):
            pool.write(0, np.zeros((2, 5)), np.zeros((2, 5)))
        with pytest.raises(ValueError, match="exceeds page_size=4"):
            pool.write(0, good, good, offset=3)
        with pytest.raises(ValueError, match="page_id=8"):
            pool.write(8, good, good)
        with pytest.raises(TypeError, match="floating point"):
            pool.write(0, good.astype(np.int32), good)


def test_pages_are_contiguous_and_page_major():
    with PagePool.create(_layout()) as pool:
        base = pool.pages.__array_interface__["data"][0]
        for p in (0, 3, 7):
            page = pool.pages[p]
            assert page.flags["C_CONTIGUOUS"]
            assert page.__array_interface__["data"][0] - base == p * pool.layout.page_bytes
            # K rows then V rows, inside the page's own slice
            assert pool.pages[p, 1].__array_interface__["data"][0] - page.__array_interface__["data"][0] == 4 * 3 * 4


def _child(name, queue):
    pool = PagePool.attach(name)
    try:
        queue.put(pool.read([2])[0].tolist())
        pool.write(6, np.full((4, 3), 7.0), np.full((4, 3), 8.0))
        try:
            pool.alloc(1)
            queue.put("alloc allowed")
        except RuntimeError as exc:
            queue.put(str(exc))
    finally:
        pool.close()


def test_attach_from_a_second_process_shares_pages_without_copies():
    with PagePool.create(_layout()) as pool:
        pool.write(2, np.full((4, 3), 1.5), np.full((4, 3), -1.5))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(pool.name, queue))
        proc.start()
        seen = queue.get(timeout=60)
        alloc_msg = queue.get(timeout=60)
        proc.join(timeout=60)
        assert proc.exitcode == 0
        assert np.allclose(np.asarray(seen)[0], 1.5) and np.allclose(np.asarray(seen)[1], -1.5)
        assert "only the creating process" in alloc_msg
        assert (pool.pages[6, 0] == 7.0).all() and (pool.pages[6, 1] == 8.0).all()
        assert pool.name in list_leaked_segments()  # the child's exit did not unlink it
    assert pool.name not in list_leaked_segments()


def test_close_unlink_idempotent_and_attach_after_unlink_fails():
    pool = PagePool.create(_layout())
    name = pool.name
    pool.close()
    pool.close()
    pool.unlink()
    pool.unlink()
    assert name not in list_leaked_segments()
    with pytest.raises(FileNotFoundError, match=name):
        PagePool.attach(name)
    attached_error = None
    other = PagePool.create(_layout())
    try:
        view = PagePool.attach(other.name)
        with pytest.raises(RuntimeError, match="only the creating process unlinks"):
            view.unlink()
        view.close()
    finally:
        other.close()
        other.unlink()
    assert attached_error is None
