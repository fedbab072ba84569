"""Selection policies share one interface and behave as their definitions say."""

import math

import numpy as np
import pytest

from icecache_ray.bench.harness import replay_head, window_start
from icecache_ray.config import IceCacheConfig
from icecache_ray.policies import make_policy
from icecache_ray.pool import PagePool, PoolLayout

D = 16


@pytest.fixture
def pool():
    with PagePool.create(PoolLayout(capacity_pages=2048, page_size=16, head_dim=D, dtype="float32")) as p:
        yield p


def _keys(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, D)) * 3
    return (centres[rng.integers(0, 8, n)] + rng.standard_normal((n, D))).astype(np.float32)


@pytest.mark.parametrize("name", ["icecache", "quest", "oracle", "oracle_seqpage", "streaming", "full"])
def test_every_policy_selects_valid_tokens_within_budget(pool, name):
    keys = _keys(700)
    policy = make_policy(name, D, 16, pool=pool)
    store = policy.build(keys[:600], np.zeros_like(keys[:600]))
    store.insert(keys[600:], np.zeros_like(keys[600:]))
    q = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    sel = policy.select(store, q, 5)
    assert len(np.unique(sel.tokens)) == len(sel.tokens)
    assert sel.tokens.min(initial=0) >= 0 and sel.tokens.max(initial=0) < 700
    if name == "full":
        assert len(sel.tokens) == 700
    elif name == "streaming":
        assert len(sel.tokens) == 0
    else:
        assert 0 < len(sel.tokens) <= 5 * 16
    store.release()


def test_token_oracle_picks_the_exact_top_tokens(pool):
    keys = _keys(500)
    policy = make_policy("oracle", D, 16)
    store = policy.build(keys, np.zeros_like(keys))
    q = np.random.default_rng(2).standard_normal((1, D)).astype(np.float32)
    sel = policy.select(store, q, 2)
    want = np.sort(np.argsort(-(keys @ q[0]))[:32])
    np.testing.assert_array_equal(sel.tokens, want)


def test_seqpage_oracle_is_the_best_token_order_paging(pool):
    keys = _keys(320)
    q = np.random.default_rng(3).standard_normal((2, D)).astype(np.float32)
    oracle = make_policy("oracle_seqpage", D, 16)
    store = oracle.build(keys, np.zeros_like(keys))
    best = oracle.select(store, q, 3)
    probs = np.exp(q @ keys.T / math.sqrt(D))
    probs /= probs.sum(axis=1, keepdims=True)
    page_mass = probs.mean(axis=0).reshape(20, 16).sum(axis=1)
    assert sorted(best.pages.tolist()) == sorted(np.argsort(-page_mass)[:3].tolist())
    quest = make_policy("quest", D, 16)
    got = quest.select(quest.build(keys, np.zeros_like(keys)), q, 3)
    assert page_mass[got.pages].sum() <= page_mass[best.pages].sum() + 1e-9


def test_unknown_policy_and_missing_pool_are_clear():
    with pytest.raises(ValueError, match="policy='bogus'"):
        make_policy("bogus", D)
    with pytest.raises(ValueError, match="needs a host page pool"):
        make_policy("icecache", D)


def test_full_budget_recall_is_one_and_streaming_is_lowest(pool):
    """The key invariant at the selection level: a budget covering every page attends to
    everything (recall 1), whatever the policy's ranking."""
    keys = _keys(640, seed=4)
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((3, 8, D)).astype(np.float32)
    positions = np.arange(632, 640)
    big = IceCacheConfig(budget=1024)
    recalls = {}
    for name in ("icecache", "quest", "oracle_seqpage", "streaming"):
        res = replay_head(make_policy(name, D, 16, pool=pool), keys, queries, positions, big)
        recalls[name] = float(np.mean(res.recall))
    for name in ("icecache", "quest", "oracle_seqpage"):
        assert recalls[name] == pytest.approx(1.0, abs=1e-9)
    assert recalls["streaming"] < 0.99


def test_window_start_keeps_full_pages_plus_current():
    cfg = IceCacheConfig()  # 2 window pages, 32 sink
    assert window_start(100, cfg) == 80  # page [96, 112) being filled + page [80, 96)
    assert window_start(40, cfg) == 32  # never inside the sink
