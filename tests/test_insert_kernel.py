"""The numba insert path (``kernels.insert``) builds exactly the index the Python path builds."""

import numpy as np
import pytest

from icecache_ray.config import IndexConfig
from icecache_ray.index.mdci import MDCIIndex
from icecache_ray.pool import PagePool, PoolLayout


def _clustered(rng, n, d=16, centres=12):
    c = rng.standard_normal((centres, d)).astype(np.float32) * 3
    return (c[rng.integers(0, centres, n)] + rng.standard_normal((n, d))).astype(np.float32)


def _grow(fast: bool, batches, build) -> tuple[MDCIIndex, PagePool]:
    pool = PagePool.create(PoolLayout(2048, 16, 16, "float32"))
    index = MDCIIndex(pool, IndexConfig(promote_every=20), 16)
    index.fast_insert = fast
    index.build(*build)
    run, split, index.kernel_rows, index.python_splits = index._insert_plain_run, index._split, 0, 0

    def counted(*args):
        done, wants_split = run(*args)
        index.kernel_rows += done
        return done, wants_split

    def counted_split(*args):
        index.python_splits += 1
        return split(*args)

    index._insert_plain_run, index._split = counted, counted_split
    for k, v in batches:
        index.insert(k, v)
    return index, pool


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_insert_equals_python_insert(seed):
    """Hundreds of inserted tokens (appends, splits, new clusters, growing norms): same pages,
    tokens, rows, clusters and routing, and the same selections afterwards."""
    rng = np.random.default_rng(seed)
    build = (_clustered(rng, 300), _clustered(rng, 300))
    batches = [(_clustered(rng, n) * (1.0 + 0.05 * i), _clustered(rng, n)) for i, n in enumerate([16, 1, 16, 40, 16, 7, 16, 64])]
    (fast, fast_pool), (slow, slow_pool) = _grow(True, batches, build), _grow(False, batches, build)
    try:
        n = slow.n_pages
        inserted = sum(len(k) for k, _ in batches)
        assert slow.kernel_rows == 0 and inserted // 2 < fast.kernel_rows < inserted  # both paths ran
        assert slow.python_splits >= 3 and fast.python_splits == 0  # the kernel made every split
        assert fast.n_tokens == slow.n_tokens == 300 + sum(len(k) for k, _ in batches)
        assert (fast.n_pages, fast.n_clusters) == (n, slow.n_clusters)
        np.testing.assert_array_equal(fast.table.page_tokens[:n], slow.table.page_tokens[:n])
        np.testing.assert_array_equal(fast.table.page_next[:n], slow.table.page_next[:n])
        np.testing.assert_array_equal(fast.table.cluster_size[: slow.n_clusters], slow.table.cluster_size[: slow.n_clusters])
        np.testing.assert_allclose(fast.table.cluster_keys[: slow.n_clusters], slow.table.cluster_keys[: slow.n_clusters], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fast.table.cluster_radius[: slow.n_clusters], slow.table.cluster_radius[: slow.n_clusters], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(fast_pool.pages[fast.table.page_pool[:n]], slow_pool.pages[slow.table.page_pool[:n]])
        assert fast.max_sq_norm == pytest.approx(slow.max_sq_norm, rel=1e-6)
        assert fast.routing.nodes == slow.routing.nodes and fast.routing.parents == slow.routing.parents
        for _ in range(5):
            q = rng.standard_normal((3, 16)).astype(np.float32)
            np.testing.assert_array_equal(fast.select_fast(q, 6)[0], slow.select_fast(q, 6)[0])
    finally:
        for index, pool in ((fast, fast_pool), (slow, slow_pool)):
            index.release()
            pool.close()
            pool.unlink()
