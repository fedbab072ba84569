"""Parity of every numba kernel with its slow NumPy reference."""

import numpy as np
import pytest
from numba import njit

from icecache_ray.kernels import mdci as K
from icecache_ray.kernels import reference as R


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("n,page_size", [(1, 16), (16, 16), (17, 16), (100, 16), (257, 8), (40, 9)])
def test_pca_pack_parity_and_page_sizes(n, page_size):
    rng = _rng(n)
    x = rng.standard_normal((n, 9)).astype(np.float32)
    init = rng.standard_normal(9).astype(np.float32)
    init /= np.linalg.norm(init)
    order, bounds = K.pca_pack(x, page_size, init, 8)
    order_ref, bounds_ref = R.pca_pack_ref(x, page_size, init, 8)
    np.testing.assert_array_equal(bounds, bounds_ref)
    # pages may differ only by float rounding at a tie; compare page membership sets
    for p in range(len(bounds) - 1):
        got = set(order[bounds[p] : bounds[p + 1]].tolist())
        want = set(order_ref[bounds_ref[p] : bounds_ref[p + 1]].tolist())
        assert len(got ^ want) <= 2
    sizes = np.diff(bounds)
    assert sizes.max() <= page_size and sizes.min() >= 1
    assert len(sizes) == -(-n // page_size)
    assert sorted(order.tolist()) == list(range(n))


def test_pca_pack_identical_rows_do_not_hang():
    x = np.ones((50, 4), np.float32)
    order, bounds = K.pca_pack(x, 16, np.ones(4, np.float32) / 2, 8)
    assert sorted(order.tolist()) == list(range(50)) and bounds[-1] == 50


def _routing_tree(rng, n_clusters=60, dim=8):
    from icecache_ray.index.routing import Routing

    keys = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    routing = Routing()
    routing.nodes = [list(range(n_clusters)), list(range(0, n_clusters, 5)), [0, 25]]
    routing.parents = [
        [c if c % 5 == 0 else (c // 5) * 5 for c in range(n_clusters)],
        [0 if c < 25 else 25 for c in range(0, n_clusters, 5)],
        [-1, -1],
    ]
    return keys, routing.snapshot()


def test_route_clusters_parity():
    rng = _rng(1)
    keys, snap = _routing_tree(rng)
    slack = rng.uniform(0, 1, len(snap.cluster)).astype(np.float32)
    qs = rng.standard_normal((3, 8)).astype(np.float32)
    for beam in (1, 2, 4, 100):
        nodes, scores = K.route_clusters(qs, keys, slack, snap.cluster, snap.block_start, snap.child_start, snap.child_end, beam)
        nodes_ref, scores_ref = R.route_clusters_ref(qs, keys, slack, snap.cluster, snap.block_start, snap.child_start, snap.child_end, beam)
        np.testing.assert_array_equal(np.sort(nodes), np.sort(nodes_ref))
        order, order_ref = np.argsort(nodes), np.argsort(nodes_ref)
        np.testing.assert_allclose(scores[:, order], scores_ref[:, order_ref], rtol=1e-5, atol=1e-5)
    # a beam as wide as the tree reaches every level-1 node
    nodes, _ = K.route_clusters(qs, keys, slack, snap.cluster, snap.block_start, snap.child_start, snap.child_end, 100)
    assert sorted(snap.cluster[nodes].tolist()) == list(range(60))


def test_subtree_radius_parity():
    rng = _rng(2)
    keys, snap = _routing_tree(rng)
    radius = rng.uniform(0, 2, 60).astype(np.float32)
    got = K.subtree_radius(keys, radius, snap.cluster, snap.block_start, snap.child_start, snap.child_end)
    want = R.subtree_radius_ref(keys, radius, snap.cluster, snap.block_start, snap.child_start, snap.child_end)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_score_pages_and_cluster_pages_parity():
    rng = _rng(3)
    pool_k = rng.standard_normal((10, 2, 4, 6)).astype(np.float32)
    page_pool = np.array([3, 1, 7, 0], np.int32)
    page_count = np.array([4, 2, 1, 3], np.int32)
    pages = np.array([2, 0, 3], np.int64)
    qs = rng.standard_normal((2, 6)).astype(np.float32)
    got = K.score_pages(qs, pool_k, page_pool, page_count, pages)
    want = R.score_pages_ref(qs, pool_k, page_pool, page_count, pages)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    first = np.array([0, 2, -1], np.int32)
    nxt = np.array([1, -1, 3, -1], np.int32)
    clusters = np.array([1, 0, 2], np.int64)
    np.testing.assert_array_equal(K.cluster_pages(first, nxt, clusters), R.cluster_pages_ref(first, nxt, clusters))


def test_exp_vec_parity_with_libm():
    """The vectorisable exp stays within 1 ulp of np.exp on [-708, 709] and is 0 below (and for -inf)."""
    x = np.concatenate([-_rng(9).exponential(20.0, 20000), _rng(10).uniform(-5, 5, 2000), np.linspace(-708, 709, 2001)])

    @njit
    def many(xs):
        out = np.empty_like(xs)
        for i in range(xs.shape[0]):
            out[i] = K.exp_vec(xs[i])
        return out

    got, want = many(x), np.exp(x)
    np.testing.assert_allclose(got[x >= -708], want[x >= -708], rtol=2.3e-16, atol=0)
    assert (got[x < -708] == 0).all()
    assert many(np.array([-np.inf, np.nan, -708.5, 0.0])).tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("use_mass", [False, True])
def test_page_log_values_parity(use_mass):
    rng = _rng(4)
    scores = rng.standard_normal((3, 7, 16)).astype(np.float32) * 4
    scores[:, 2, 5:] = -np.inf  # a partially filled page
    scores[1, 4, :] = -np.inf  # an empty page for one head
    got = K.page_log_values(scores, 0.125, use_mass)
    want = R.page_log_values_ref(scores, 0.125, use_mass)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    from icecache_ray.index.select import per_head_page_values

    np.testing.assert_allclose(got, per_head_page_values(scores, "mass" if use_mass else "max", 0.125), rtol=1e-5)


def test_head_union_parity():
    rng = _rng(5)
    clusters = rng.permutation(40)[:25].astype(np.int64)
    scores = rng.standard_normal((3, 25)).astype(np.float32)
    for width in (1, 4, 30):
        np.testing.assert_array_equal(K.head_union(clusters, scores, width, 40), R.head_union_ref(clusters, scores, width, 40))


@pytest.mark.parametrize("use_mass", [False, True])
def test_page_values_and_token_mass_parity(use_mass):
    rng = _rng(12)
    scores = rng.standard_normal((3, 9, 16)).astype(np.float32) * 4
    scores[:, 3, 7:] = -np.inf  # a partially filled page
    values, got = K.page_values_and_token_mass(scores, 0.125, use_mass)
    # Two compiled loops (with and without the token pass) under fastmath: equal up to rounding,
    # not bit for bit (CI's CPU differed in the last bit).
    np.testing.assert_allclose(values, K.page_log_values(scores, 0.125, use_mass), rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, R.group_token_mass_ref(scores, 0.125), rtol=1e-12, atol=1e-15)
    assert got[3, 7:].max() == 0.0
    np.testing.assert_allclose(got.sum(), 3.0)  # each head's probabilities sum to 1


@pytest.mark.parametrize("n", [0, 1, 5, 40, 1000])
def test_top_tokens_outside_parity(n):
    rng = _rng(13)
    mass = rng.random((8, 4))
    mass[5, 1] = mass[5, 2] = mass[6, 0]  # equal masses: the lowest positions win
    counts = np.array([4, 4, 2, 4, 0, 4, 3, 4], np.int64)
    chosen = np.array([3, 0], np.int64)
    got = K.top_tokens_outside(mass, counts, chosen, n)
    np.testing.assert_array_equal(got, R.top_tokens_outside_ref(mass, counts, chosen, n))
    assert not np.isin(got // 4, chosen).any()
    assert (got % 4 < counts[got // 4]).all()
    assert len(got) == min(n, int(counts.sum() - counts[chosen].sum()))
