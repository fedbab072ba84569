"""Shared-memory page pool: layout, allocation, dtype round trips, cross-process attach, cleanup."""

import gc
import multiprocessing as mp
import pickle
import subprocess
import sys
import textwrap
import time
import weakref
from multiprocessing import shared_memory

import numpy as np
import pytest

from icecache_ray import pool as pool_mod
from icecache_ray.pool import (
    HEADER_BYTES,
    PagePool,
    PoolExhausted,
    PoolLayout,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    list_leaked_segments,
)

P, D = 4, 3  # page_size, head_dim of the small test pools


def _layout(dtype="float32", capacity=8):
    return PoolLayout(capacity_pages=capacity, page_size=P, head_dim=D, dtype=dtype)


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 -> float32, computed one value at a time in Python."""
    out = []
    for value in np.asarray(x, np.float32).ravel():
        bits = int(value.view(np.uint32))
        upper, lower = bits >> 16, bits & 0xFFFF
        if lower > 0x8000 or (lower == 0x8000 and upper & 1):
            upper += 1
        out.append(np.uint32(upper << 16).view(np.float32))
    return np.array(out, np.float32).reshape(np.shape(x))


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="int8"), r"PoolLayout\.dtype='int8'"),
        (dict(dtype=np.float32), r"PoolLayout\.dtype=.*float32"),
        (dict(capacity=0), r"PoolLayout\.capacity_pages=0"),
        (dict(capacity=-3), r"PoolLayout\.capacity_pages=-3"),
        (dict(capacity=2.0), r"PoolLayout\.capacity_pages=2\.0"),
        (dict(capacity=True), r"PoolLayout\.capacity_pages=True"),
    ],
)
def test_layout_validation_names_the_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _layout(**kwargs)
    with pytest.raises(ValueError, match=r"PoolLayout\.head_dim=0"):
        PoolLayout(4, 4, 0)


@pytest.mark.parametrize("dtype, storage", [("float32", np.float32), ("float16", np.float16), ("bfloat16", np.uint16)])
def test_layout_sizes(dtype, storage):
    lay = PoolLayout(np.int64(8), page_size=P, head_dim=D, dtype=dtype)
    assert type(lay.capacity_pages) is int
    assert lay.numpy_dtype == np.dtype(storage) and lay.itemsize == np.dtype(storage).itemsize
    assert lay.page_shape == (2, P, D)
    assert lay.page_bytes == 2 * P * D * lay.itemsize
    assert lay.total_bytes == HEADER_BYTES + 8 * lay.page_bytes
    assert HEADER_BYTES % 64 == 0


# ---------------------------------------------------------------------------------- allocation
def test_alloc_free_lowest_first_and_contiguous_runs():
    with PagePool.create(_layout()) as pool:
        assert pool.owner and pool.name.startswith("icr_")
        ids = pool.alloc(3)
        assert ids.dtype == np.int32 and ids.tolist() == [0, 1, 2]
        pool.free([1])
        assert pool.alloc(2).tolist() == [1, 3]
        assert (pool.num_used, pool.num_free) == (4, 4)
        assert pool.alloc(4).tolist() == [4, 5, 6, 7]  # one contiguous run
        pool.free(np.array([6, 2, 5], np.int32))
        assert pool.alloc(2).tolist() == [2, 5]
        assert pool.alloc(1).tolist() == [6]
        assert pool.num_free == 0


def test_alloc_matches_a_lowest_first_reference_model():
    """Random alloc/free traffic on a pool larger than one search chunk."""
    rng = np.random.default_rng(1)
    capacity = 5000
    with PagePool.create(_layout(capacity=capacity)) as pool:
        used: set[int] = set()
        for _ in range(300):
            if used and rng.random() < 0.45:
                victims = rng.choice(sorted(used), size=min(len(used), int(rng.integers(1, 200))), replace=False)
                pool.free(victims)
                used -= set(victims.tolist())
            else:
                n = int(rng.integers(1, 300))
                if n > capacity - len(used):
                    with pytest.raises(PoolExhausted):
                        pool.alloc(n)
                    continue
                expected = [i for i in range(capacity) if i not in used][:n]
                assert pool.alloc(n).tolist() == expected
                used |= set(expected)
            assert pool.num_used == len(used)


def test_pool_exhausted_is_clear_and_takes_nothing():
    with PagePool.create(_layout()) as pool:
        pool.alloc(4)
        with pytest.raises(PoolExhausted, match="5 pages requested but only 4 of 8 are free") as info:
            pool.alloc(5)
        assert (info.value.requested, info.value.free, info.value.capacity) == (5, 4, 8)
        assert isinstance(info.value, RuntimeError)
        assert pool.num_free == 4
        assert pool.alloc(4).tolist() == [4, 5, 6, 7]


def test_alloc_and_free_reject_bad_arguments():
    with PagePool.create(_layout()) as pool:
        for n in (0, -2):
            with pytest.raises(ValueError, match=f"n={n}"):
                pool.alloc(n)
        with pytest.raises(TypeError, match="n must be an int, got 1.5"):
            pool.alloc(1.5)
        pool.alloc(3)
        with pytest.raises(ValueError, match=r"double free of page\(s\) \[0\]"):
            pool.free([0, 0])
        assert pool.num_used == 3  # nothing freed by a failed free
        pool.free([0])
        with pytest.raises(ValueError, match=r"double free of page\(s\) \[0\]"):
            pool.free([0, 1])
        assert pool.num_used == 2  # page 1 still allocated: the call was all-or-nothing
        with pytest.raises(ValueError, match=r"must be in \[0, 8\), got \[99\]"):
            pool.free([99])
        with pytest.raises(ValueError, match=r"got \[-1\]"):
            pool.free([-1])
        with pytest.raises(TypeError, match="must be integers"):
            pool.free([1.0])
        pool.free([])  # a no-op


def test_attached_pool_cannot_allocate_or_unlink():
    with PagePool.create(_layout()) as owner:
        view = PagePool.attach(owner.name)
        try:
            assert not view.owner and view.layout == owner.layout
            for call in (lambda: view.alloc(1), lambda: view.free([0]), lambda: view.num_free):
                with pytest.raises(RuntimeError, match="only the creating \\(owner\\) process"):
                    call()
            with pytest.raises(RuntimeError, match="only the creating process unlinks"):
                view.unlink()
        finally:
            view.close()


# ---------------------------------------------------------------------------------- data
@pytest.mark.parametrize("in_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_write_read_roundtrip(dtype, in_dtype):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, D)).astype(in_dtype)
    v = (100 * rng.standard_normal((3, D))).astype(in_dtype)
    with PagePool.create(_layout(dtype)) as pool:
        pool.write(5, k, v, offset=1)
        page = pool.read([5])[0]
        assert page.dtype == np.float32 and page.shape == (2, P, D)
        if dtype == "bfloat16":
            expected_k, expected_v = _bf16_reference(k.astype(np.float32)), _bf16_reference(v.astype(np.float32))
            np.testing.assert_array_equal(page[0, 1:], expected_k)
            np.testing.assert_array_equal(page[1, 1:], expected_v)
            np.testing.assert_allclose(page[0, 1:], k, rtol=2**-8)
        else:
            storage = np.dtype(dtype)
            np.testing.assert_array_equal(page[0, 1:], k.astype(storage).astype(np.float32))
            np.testing.assert_array_equal(page[1, 1:], v.astype(storage).astype(np.float32))
        assert (page[:, 0] == 0).all()  # untouched slot reads as zeros
        assert (pool.read([0, 7]) == 0).all()  # a new pool is zero-filled
        np.testing.assert_array_equal(pool.keys([5, 0]), np.stack([page[0], np.zeros((P, D))]))
        np.testing.assert_array_equal(pool.values([5]), page[None, 1])


def test_read_variants():
    with PagePool.create(_layout("bfloat16")) as pool:
        pool.write(3, np.full((P, D), 1.0), np.full((P, D), -2.0))
        raw = pool.read([3, 3], as_float32=False)
        assert raw.dtype == np.uint16 and (raw[:, 0] == 0x3F80).all() and (raw[:, 1] == 0xC000).all()
        out = np.full((2, 2, P, D), 9.0, np.float32)
        assert pool.read(np.array([[3], [1]]), out=out) is out
        assert (out[0, 0] == 1.0).all() and (out[0, 1] == -2.0).all() and (out[1] == 0).all()
        got = pool.read([3])
        got[...] = 5.0  # a copy: the pool does not change
        assert (pool.read([3])[0, 0] == 1.0).all()
        assert pool.read([]).shape == (0, 2, P, D)
        with pytest.raises(ValueError, match=r"out must be a writeable float32 array of shape \(1, 2, 4, 3\)"):
            pool.read([3], out=np.empty((2, 2, P, D), np.float32))
        with pytest.raises(ValueError, match=r"got \[8\]"):
            pool.read([8])
        with pytest.raises(TypeError, match="must be integers"):
            pool.keys(np.array([0.5]))


def test_bf16_conversion_rounds_to_nearest_even():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF800000], np.uint32)
    assert float32_to_bf16_bits(bits.view(np.float32)).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0xFF80]
    assert float32_to_bf16_bits(np.float32(1.0)).tolist() == 0x3F80  # scalars keep their shape
    nan = float32_to_bf16_bits(np.array([np.nan, -np.nan, np.uint32(0x7F800001).view(np.float32)], np.float32))
    assert np.isnan(bf16_bits_to_float32(nan)).all()  # a NaN never rounds to inf
    x = np.random.default_rng(2).standard_normal((5, 7)).astype(np.float32) * 1e3
    back = bf16_bits_to_float32(float32_to_bf16_bits(x))
    assert back.shape == x.shape and back.dtype == np.float32
    np.testing.assert_array_equal(back, _bf16_reference(x))
    np.testing.assert_allclose(back, x, rtol=2**-8)
    with pytest.raises(TypeError, match="uint16 bit patterns"):
        bf16_bits_to_float32(np.zeros(3, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bad_writes_are_rejected_and_write_nothing(dtype):
    with PagePool.create(_layout(dtype)) as pool:
        good = np.ones((2, D), np.float32)
        with pytest.raises(ValueError, match="page 0: k holds NaN or inf"):
            pool.write(0, np.full((2, D), np.nan), good)
        with pytest.raises(ValueError, match="page 1: v holds NaN or inf"):
            pool.write(1, good, np.full((2, D), np.inf))
        assert (pool.read([0, 1]) == 0).all()  # k of page 1 was not written either
        with pytest.raises(ValueError, match=r"must both be \[n, 3\], got \(2, 5\)"):
            pool.write(0, np.zeros((2, 5)), np.zeros((2, 5)))
        with pytest.raises(ValueError, match=r"must both be \[n, 3\]"):
            pool.write(0, good, np.ones((3, D)))
        with pytest.raises(ValueError, match=r"must both be \[n, 3\]"):
            pool.write(0, np.ones(D), np.ones(D))
        with pytest.raises(ValueError, match="offset=3 \\+ n=2 exceeds page_size=4"):
            pool.write(0, good, good, offset=3)
        with pytest.raises(ValueError, match="offset=-1"):
            pool.write(0, good, good, offset=-1)
        with pytest.raises(ValueError, match="page_id=8"):
            pool.write(8, good, good)
        with pytest.raises(TypeError, match="page_id must be an int"):
            pool.write(1.0, good, good)
        with pytest.raises(TypeError, match="k must be float16, float32 or float64, got int32"):
            pool.write(0, good.astype(np.int32), good)
        with pytest.raises(ValueError, match=f"too large for {dtype} storage"):
            pool.write(0, np.full((2, D), 1e300), good)


def test_float16_overflow_is_rejected():
    with PagePool.create(_layout("float16")) as pool:
        with pytest.raises(ValueError, match="page 2: k holds values too large for float16"):
            pool.write(2, np.full((1, D), 1e5, np.float32), np.zeros((1, D), np.float32))


def test_pages_are_contiguous_and_page_major():
    with PagePool.create(_layout()) as pool:
        buffer_start = np.frombuffer(pool._shm.buf, np.uint8).__array_interface__["data"][0]
        base = pool.pages.__array_interface__["data"][0]
        assert base - buffer_start == HEADER_BYTES
        for p in (0, 3, 7):
            page = pool.pages[p]
            start = page.__array_interface__["data"][0]
            assert page.flags["C_CONTIGUOUS"] and page.nbytes == pool.layout.page_bytes
            assert start - base == p * pool.layout.page_bytes
            # K rows, then V rows, inside the page's own slice
            assert pool.pages[p, 1].__array_interface__["data"][0] - start == P * D * 4
        del page


# ---------------------------------------------------------------------------------- processes
def _child(name, queue):
    pool = PagePool.attach(name)
    try:
        queue.put(pool.read([2])[0].tolist())
        pool.write(6, np.full((P, D), 7.0), np.full((P, D), 8.0))
        try:
            pool.alloc(1)
            queue.put("alloc allowed")
        except RuntimeError as exc:
            queue.put(str(exc))
    finally:
        pool.close()


def test_attach_from_a_second_process_shares_pages_without_copies():
    with PagePool.create(_layout()) as pool:
        pool.write(2, np.full((P, D), 1.5), np.full((P, D), -1.5))
        view_of_page_6 = pool.pages[6]  # taken before the child writes: proves no copy is involved
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(pool.name, queue))
        proc.start()
        seen = np.asarray(queue.get(timeout=60))
        alloc_msg = queue.get(timeout=60)
        proc.join(timeout=60)
        assert proc.exitcode == 0
        assert (seen[0] == 1.5).all() and (seen[1] == -1.5).all()
        assert "only the creating (owner) process may allocate" in alloc_msg
        assert (view_of_page_6[0] == 7.0).all() and (view_of_page_6[1] == 8.0).all()
        del view_of_page_6
        time.sleep(0.2)  # give the shared resource tracker time to act if it were going to
        assert pool.name in list_leaked_segments()  # the child's exit did not unlink it
        again = PagePool.attach(pool.name)
        assert (again.read([6])[0, 0] == 7.0).all()
        again.close()
    assert pool.name not in list_leaked_segments()


_TRACKER_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, sys
    from icecache_ray.pool import PagePool, PoolLayout

    def child(name):
        PagePool.attach(name).close()

    if __name__ == "__main__":
        pool = PagePool.create(PoolLayout(4, 4, 3))
        PagePool.attach(pool.name).close()  # same process, same resource tracker
        proc = mp.get_context("spawn").Process(target=child, args=(pool.name,))
        proc.start(); proc.join()
        print(pool.name, flush=True)
        if sys.argv[1] == "unlink":
            pool.close(); pool.unlink()
        # "crash": exit without unlinking; the owner's resource tracker must still clean up
    """
)


@pytest.mark.parametrize("mode", ["unlink", "crash"])
def test_attaching_never_steals_the_owners_tracker_registration(tmp_path, mode):
    """Attaches (in the owner and in a spawned child sharing its resource tracker) must leave the
    owner's registration alone: a clean unlink makes the tracker print nothing, and an owner that
    dies without unlinking still has its segment removed by its tracker."""
    script = tmp_path / "tracker_check.py"
    script.write_text(_TRACKER_SCRIPT)
    res = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60)
    name = res.stdout.strip()
    try:
        assert res.returncode == 0, res.stderr
        assert name.startswith("icr_")
        if mode == "unlink":
            assert "Traceback" not in res.stderr and "KeyError" not in res.stderr, res.stderr
        deadline = time.monotonic() + 10
        while name in list_leaked_segments() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert name not in list_leaked_segments()
    finally:
        if name.startswith("icr_") and name in list_leaked_segments():
            shared_memory.SharedMemory(name, create=False).unlink()


_KILLED_TRACKER_SCRIPT = textwrap.dedent(
    """
    import os, signal, time
    from multiprocessing import resource_tracker
    from icecache_ray.pool import PagePool, PoolLayout

    pool = PagePool.create(PoolLayout(4, 4, 3))
    print(pool.name, flush=True)
    os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL)  # as Ray does at a worker's exit
    time.sleep(0.2)
    pool.close(); pool.unlink()
    """
)


def test_owner_whose_resource_tracker_was_killed_unlinks_without_a_traceback(tmp_path):
    """Ray kills a worker's child processes (its resource tracker among them) before the worker's
    exit handlers close the engine: the owner's unlink must not start a new tracker that prints
    ``KeyError: '/icr_...'`` for a name it never saw (every Ray job used to end with that)."""
    script = tmp_path / "killed_tracker.py"
    script.write_text(_KILLED_TRACKER_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    name = res.stdout.strip()
    assert res.returncode == 0, res.stderr
    assert name.startswith("icr_") and name not in list_leaked_segments()
    assert "Traceback" not in res.stderr and "KeyError" not in res.stderr and "relaunching" not in res.stderr, res.stderr


def test_pickling_a_pool_attaches_by_name():
    with PagePool.create(_layout()) as pool:
        pool.write(1, np.ones((1, D)), np.ones((1, D)))
        clone = pickle.loads(pickle.dumps(pool))
        try:
            assert not clone.owner and clone.name == pool.name
            assert (clone.read([1])[0, :, 0] == 1.0).all()
        finally:
            clone.close()


# ---------------------------------------------------------------------------------- lifecycle
def test_close_unlink_idempotent_and_attach_after_unlink_fails():
    pool = PagePool.create(_layout())
    name = pool.name
    assert name in list_leaked_segments()
    pool.close()
    pool.close()
    assert pool.closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.read([0])
    pool.unlink()
    pool.unlink()
    assert name not in list_leaked_segments()
    with pytest.raises(FileNotFoundError, match=name):
        PagePool.attach(name)
    pool.__del__()  # never raises


def test_close_with_a_live_view_defers_the_unmap_safely():
    """A view of ``pages`` that outlives close() keeps its memory mapped (never a dangling
    pointer); the mapping goes when the view does."""
    with PagePool.create(_layout()) as pool:
        pool.write(0, np.full((P, D), 3.0), np.zeros((P, D)))
        view = pool.pages[:, 0]
        mapping = weakref.ref(pool._shm._mmap)
        pool.close()  # does not raise BufferError
        assert pool.closed
        with pytest.raises(RuntimeError, match="closed"):
            pool.pages
        assert (view[0] == 3.0).all()  # still mapped: reading is safe
        assert mapping() is not None
        del view
        gc.collect()
        assert mapping() is None  # unmapped with the last view
        pool.close()


def test_create_and_attach_argument_errors():
    with pytest.raises(ValueError, match="name='mine' must start with 'icr_'"):
        PagePool.create(_layout(), name="mine")
    with pytest.raises(TypeError, match="layout must be a PoolLayout"):
        PagePool.create((8, 4, 3))
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        PagePool.attach(None)
    with PagePool.create(_layout(), name=f"icr_test_{time.time_ns()}") as pool:
        with pytest.raises(FileExistsError, match=pool.name):
            PagePool.create(_layout(), name=pool.name)
    foreign = shared_memory.SharedMemory(f"icr_foreign_{time.time_ns()}", create=True, size=256)
    tiny = shared_memory.SharedMemory(f"icr_tiny_{time.time_ns()}", create=True, size=16)
    try:
        foreign.buf[:8] = b"NOTAPOOL"
        with pytest.raises(ValueError, match="is not an icecache_ray page pool"):
            PagePool.attach(foreign.name)
        if tiny.size < HEADER_BYTES:  # some systems round segment sizes up to a page
            with pytest.raises(ValueError, match="too small"):
                PagePool.attach(tiny.name)
        else:
            with pytest.raises(ValueError, match="is not an icecache_ray page pool"):
                PagePool.attach(tiny.name)
    finally:
        for shm in (foreign, tiny):
            shm.close()
            shm.unlink()


def test_list_leaked_segments(monkeypatch):
    with PagePool.create(_layout(), name=f"icr_listed_{time.time_ns()}") as pool:
        assert pool.name in list_leaked_segments()
        assert pool.name in list_leaked_segments("icr_listed_")
        assert pool.name not in list_leaked_segments("zz_")

    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(pool_mod.os, "listdir", missing)
    assert list_leaked_segments() == []


def test_module_imports_neither_torch_nor_ray():
    code = "import sys, icecache_ray.pool; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_segments_of_killed_owners_are_swept_and_live_ones_kept():
    import signal
    import subprocess
    import sys

    from icecache_ray.pool import list_leaked_segments, remove_orphaned_segments

    code = ("from icecache_ray.pool import PagePool, PoolLayout; import sys, time; "
            "p = PagePool.create(PoolLayout(capacity_pages=2, page_size=4, head_dim=8)); print(p.name, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
        prefix = f"icr_{proc.pid}_"
        assert name.startswith(prefix)
        assert remove_orphaned_segments(prefix) == []  # its owner still runs
        proc.send_signal(signal.SIGKILL)  # no cleanup at all: the segment stays behind
        proc.wait()
        assert list_leaked_segments(prefix) == [name]
        assert remove_orphaned_segments(prefix) == [name]
        assert list_leaked_segments(prefix) == []
    finally:
        proc.kill()
        proc.wait()
