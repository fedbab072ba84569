"""M-DCI index: page invariants, insertion/split, query contract, determinism, bad input."""

import numpy as np
import pytest

from icecache_ray.config import BeamRule, IndexConfig
from icecache_ray.index.levels import level_of, levels_of
from icecache_ray.index.mdci import MDCIIndex
from icecache_ray.pool import PagePool, PoolExhausted, PoolLayout

D = 16


@pytest.fixture
def pool():
    with PagePool.create(PoolLayout(capacity_pages=4096, page_size=16, head_dim=D, dtype="float32")) as p:
        yield p


def _data(n, seed=0, n_topics=12):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_topics, D)).astype(np.float32) * 3
    keys = centres[rng.integers(0, n_topics, n)] + rng.standard_normal((n, D)).astype(np.float32)
    values = rng.standard_normal((n, D)).astype(np.float32)
    return keys.astype(np.float32), values


def _check_pages(index, keys, values):
    """Every token in exactly one page; page rows in the pool equal the token's K and V."""
    tokens = index.table.page_tokens[: index.n_pages]
    counts = index.table.page_count[: index.n_pages]
    valid = tokens >= 0
    assert (valid.sum(axis=1) == counts).all()
    assert (counts >= 1).all() and (counts <= index.page_size).all()
    for p in range(index.n_pages):  # rows are packed from slot 0
        assert valid[p, : counts[p]].all() and not valid[p, counts[p] :].any()
    ids = tokens[valid]
    assert sorted(ids.tolist()) == list(range(index.n_tokens))
    page_of = index.token_pages()
    rows = index.table.pool.pages[index.table.page_pool[page_of]]
    slot = np.array([np.flatnonzero(tokens[page_of[t]] == t)[0] for t in range(index.n_tokens)])
    np.testing.assert_array_equal(rows[np.arange(index.n_tokens), 0, slot], keys[: index.n_tokens])
    np.testing.assert_array_equal(rows[np.arange(index.n_tokens), 1, slot], values[: index.n_tokens])


def test_levels_schedule_is_deterministic_and_continues():
    levels = levels_of(0, 10000, 100, 5)
    assert levels[0] == 1 and levels[1] == 0 and levels[500] == 2 and levels[2500] == 3
    assert (levels > 0).sum() == 100 and (levels >= 2).sum() == 19
    np.testing.assert_array_equal(levels_of(4321, 777, 100, 5), levels[4321 : 4321 + 777])
    assert level_of(500, 100, 5) == 2


@pytest.mark.parametrize("packing", ["pca", "projection"])
def test_build_every_token_in_exactly_one_page(pool, packing):
    keys, values = _data(3000)
    index = MDCIIndex(pool, IndexConfig(packing=packing), D)
    index.build(keys, values)
    _check_pages(index, keys, values)
    assert index.n_clusters == 30
    # pages of a bulk build are near-full: a cluster of n tokens uses ceil(n / 16) pages
    assert index.table.page_count[: index.n_pages].mean() > 12


def test_insert_and_split_keep_every_token_and_report_dirty_pages(pool):
    keys, values = _data(2600, seed=1)
    index = MDCIIndex(pool, IndexConfig(), D)
    index.build(keys[:2000], values[:2000])
    for start in range(2000, 2600, 16):
        before_tokens = index.table.page_tokens[: index.n_pages].copy()
        before_pages = index.n_pages
        result = index.insert(keys[start : start + 16], values[start : start + 16])
        after = index.table.page_tokens[: before_pages]
        changed = np.flatnonzero((after != before_tokens).any(axis=1))
        # the dirty list is exactly the pages whose contents changed, plus the new ones
        new = np.arange(before_pages, index.n_pages)
        np.testing.assert_array_equal(np.sort(result.dirty_pages), np.union1d(changed, new))
        np.testing.assert_array_equal(result.new_pages, new)
    _check_pages(index, keys, values)
    assert index.n_tokens == 2600 and index.n_clusters == 26  # promotion continued (token 2000..2500)


def test_insert_into_empty_index_builds(pool):
    keys, values = _data(40)
    index = MDCIIndex(pool, IndexConfig(), D)
    result = index.insert(keys, values)
    assert index.n_tokens == 40 and len(result.new_pages) == index.n_pages
    _check_pages(index, keys, values)


def test_query_k_at_least_pages_returns_all(pool):
    keys, values = _data(500)
    index = MDCIIndex(pool, IndexConfig(), D)
    index.build(keys, values)
    q = np.random.default_rng(5).standard_normal((3, D)).astype(np.float32)
    for k in (index.n_pages, index.n_pages + 7):
        result = index.query(q, k)
        assert sorted(result.pages.tolist()) == list(range(index.n_pages))
    result = index.query(q, 4)
    assert len(result.pages) == 4 and len(set(result.pages.tolist())) == 4
    np.testing.assert_array_equal(result.counts, index.table.page_count[result.pages])
    np.testing.assert_array_equal(result.pool_pages, index.table.page_pool[result.pages])


def test_query_widens_when_the_beam_holds_too_few_pages(pool):
    keys, values = _data(4000, seed=2)
    index = MDCIIndex(pool, IndexConfig(beam=BeamRule(width=1, min_width=1, upper_factor=1.0)), D)
    index.build(keys, values)
    q = keys[7] * 2
    result = index.query(q[None], 60)  # 60 pages > one cluster's pages: the beam must widen
    assert len(result.pages) == 60 and len(set(result.pages.tolist())) == 60


def test_large_selections_choose_among_pages_per_slot_times_as_many_candidates(pool):
    """A fixed beam that is ample for a few pages would leave a large k choosing among barely more
    pages than it takes; the beam widens with the slots instead (BeamRule.pages_per_slot)."""
    keys, values = _data(6000, seed=5, n_topics=40)
    rule = BeamRule(width=4, min_width=1)
    fixed = MDCIIndex(pool, IndexConfig(beam=BeamRule(width=4, min_width=1, pages_per_slot=0)), D)
    scaled = MDCIIndex(pool, IndexConfig(beam=rule), D)
    for index in (fixed, scaled):
        index.build(keys, values)
    q = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    small, large = fixed.query(q, 2).n_scored, fixed.query(q, 40).n_scored
    assert small == large  # the fixed beam scores the same candidates for 2 pages and for 40
    for k, n_tokens in ((40, 0), (30, 160)):
        slots = k + n_tokens // 16
        n_scored = scaled.query(q, k, n_tokens).n_scored
        assert n_scored >= 0.6 * rule.pages_per_slot * slots * 16, (k, n_tokens, n_scored)
    # with a factor that asks for every page, the query equals the beam over every cluster
    every = MDCIIndex(pool, IndexConfig(beam=BeamRule(width=1e6)), D)
    wide = MDCIIndex(pool, IndexConfig(beam=BeamRule(width=4, min_width=1, pages_per_slot=1e6)), D)
    for index in (every, wide):
        index.build(keys, values)
    np.testing.assert_array_equal(wide.query(q, 10, 32).pages, every.query(q, 10, 32).pages)
    np.testing.assert_array_equal(wide.select_fast(q, 10, 32)[0], every.select_fast(q, 10, 32)[0])


def test_query_finds_the_page_of_the_best_token(pool):
    keys, values = _data(4000, seed=2)
    index = MDCIIndex(pool, IndexConfig(), D)
    index.build(keys, values)
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(20):
        q = keys[rng.integers(0, 4000)] * 2
        result = index.query(q[None], 8)
        found += int(np.argmax(keys @ q)) in index.table.page_tokens[result.pages]
    assert found >= 18


def test_query_is_deterministic_given_seed(pool):
    keys, values = _data(2000, seed=4)
    q = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    results = []
    for _ in range(2):
        index = MDCIIndex(pool, IndexConfig(seed=7), D)
        index.build(keys, values)
        results.append(index.query(q, 8).pages)
        index.release()
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("gqa", ["interleave", "max", "sum"])
@pytest.mark.parametrize("page_score", ["max", "mass"])
def test_gqa_rules_return_distinct_pages(pool, gqa, page_score):
    keys, values = _data(1500, seed=6)
    index = MDCIIndex(pool, IndexConfig(gqa=gqa, page_score=page_score), D)
    index.build(keys, values)
    q = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    result = index.query(q, 10)
    assert len(set(result.pages.tolist())) == 10


def test_bad_inputs_raise_clear_errors(pool):
    index = MDCIIndex(pool, IndexConfig(), D)
    keys, values = _data(100)
    bad = keys.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="row 5 holds NaN or inf"):
        index.build(bad, values)
    bad[5, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        index.insert(bad, values)
    with pytest.raises(ValueError, match=r"expected shape \[n, 16\]"):
        index.build(keys[:, :8], values[:, :8])
    with pytest.raises(TypeError, match="floating dtype"):
        index.build(keys.astype(np.int32), values)
    with pytest.raises(ValueError, match="0 tokens"):
        index.build(keys[:0], values[:0])
    index.build(keys, values)
    with pytest.raises(ValueError, match="needs an empty index"):
        index.build(keys, values)
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="k="):
            index.query(keys[:1], k)
    with pytest.raises(ValueError, match="NaN or inf"):
        index.query(np.full((1, D), np.nan, np.float32), 3)
    assert index.n_tokens == 100  # failed calls changed nothing


def test_pool_exhausted_is_clear_and_loses_nothing():
    with PagePool.create(PoolLayout(capacity_pages=10, page_size=16, head_dim=D, dtype="float32")) as small:
        index = MDCIIndex(small, IndexConfig(), D)
        keys, values = _data(1000)
        with pytest.raises(PoolExhausted):
            index.build(keys, values)


def test_metadata_is_at_most_16_bytes_per_token(pool):
    keys, values = _data(3000)
    index = MDCIIndex(pool, IndexConfig(), D)
    index.build(keys, values)
    assert index.metadata_bytes() / index.n_tokens <= 16


def test_release_returns_pool_pages(pool):
    free = pool.num_free
    index = MDCIIndex(pool, IndexConfig(), D)
    index.build(*_data(700))
    assert pool.num_free < free
    index.release()
    assert pool.num_free == free


@pytest.mark.parametrize("gqa", ["interleave", "max", "sum"])
@pytest.mark.parametrize("page_score", ["max", "mass"])
@pytest.mark.parametrize("k", [1, 10, 40, 10_000])
@pytest.mark.parametrize("n_tokens", [0, 48])
def test_fused_select_equals_step_by_step_query(pool, gqa, page_score, k, n_tokens):
    """The decode hot path (one numba call) ranks exactly like the step-by-step reference query,
    and picks the same single tokens, before and after insertions (which change clusters, pages
    and the routing cache)."""
    keys, values = _data(3000, seed=8)
    index = MDCIIndex(pool, IndexConfig(gqa=gqa, page_score=page_score), D)
    index.build(keys[:2000], values[:2000])
    rng = np.random.default_rng(2)
    for step in range(2):
        for _ in range(5):
            q = rng.standard_normal((3, D)).astype(np.float32)
            reference = index.query(q, k, n_tokens)
            _, pool_pages, counts, token_pages, token_rows = index.select_fast(q, k, n_tokens)
            np.testing.assert_array_equal(pool_pages, reference.pool_pages)
            np.testing.assert_array_equal(counts, reference.counts)
            np.testing.assert_array_equal(token_pages, reference.token_pages)
            np.testing.assert_array_equal(token_rows, reference.token_rows)
            expected = 0 if k >= index.n_pages else n_tokens
            assert len(token_pages) == expected
            assert not np.isin(token_pages, reference.pages).any()  # never a token of a page taken whole
        index.insert(keys[2000 + 500 * step : 2500 + 500 * step], values[2000 + 500 * step : 2500 + 500 * step])


def test_bulk_cluster_stats_equal_the_scatter_definition(pool):
    """set_members' segment sums give bit-identical means and radii to np.add.at / np.maximum.at."""
    from icecache_ray.index.storage import PageTable

    rng = np.random.default_rng(3)
    keys = rng.standard_normal((997, D)).astype(np.float32) * 4
    table = PageTable(pool, D)
    for _ in range(23):
        table.add_cluster(np.zeros(D, np.float32))
    assign = rng.integers(0, 23, len(keys))
    assign[:23] = np.arange(23)  # every cluster has a member, as in a build
    table.set_members(assign, keys)
    sums = np.zeros((23, D), np.float64)
    np.add.at(sums, assign, keys)
    means = (sums / np.bincount(assign)[:, None]).astype(np.float32)
    radius = np.zeros(23, np.float32)
    np.maximum.at(radius, assign, np.linalg.norm(keys - means[assign], axis=1).astype(np.float32))
    np.testing.assert_array_equal(table.cluster_keys[:23], means)
    np.testing.assert_array_equal(table.cluster_radius[:23], radius)
    np.testing.assert_array_equal(table.cluster_size[:23], np.bincount(assign))


def test_token_slots_take_the_heaviest_tokens_outside_the_chosen_pages(pool):
    """Single tokens are the candidates' largest group-mass tokens among the pages not chosen
    whole (brute force over the candidate set, which is every page when the beam takes them all)."""
    keys, values = _data(1500, seed=11)
    index = MDCIIndex(pool, IndexConfig(beam=BeamRule(width=1e6)), D)
    index.build(keys, values)
    q = np.random.default_rng(5).standard_normal((3, D)).astype(np.float32)
    result = index.query(q, 6, 32)
    logits = (q @ keys.T) * index.scale
    prob = np.exp(logits - logits.max(1, keepdims=True))
    mass = (prob / prob.sum(1, keepdims=True)).sum(0)
    token_pages = index.token_pages()
    outside = np.flatnonzero(~np.isin(token_pages, result.pages))
    want = np.sort(outside[np.argsort(-mass[outside])[:32]])
    got = np.sort(index.table.page_tokens[result.token_pages, result.token_rows])
    np.testing.assert_array_equal(got, want)
