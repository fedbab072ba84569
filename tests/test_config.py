"""Configuration validation: ValueError naming the field and the value, before any work."""

import pytest

from icecache_ray.config import BeamRule, IceCacheConfig, IndexConfig, PoolConfig


def test_defaults_match_the_paper_layout():
    cfg = IceCacheConfig()
    assert (cfg.page_size, cfg.budget, cfg.sink_tokens, cfg.window_tokens, cfg.n_full_layers) == (16, 256, 32, 32, 2)
    assert cfg.retrieved_pages == 12


@pytest.mark.parametrize("budget,sink,window,pages", [(128, 16, 32, 5), (64, 16, 16, 2)])
def test_smaller_budgets_pick_sensible_sink_and_window(budget, sink, window, pages):
    cfg = IceCacheConfig(budget=budget)
    assert (cfg.sink_tokens, cfg.window_tokens, cfg.retrieved_pages) == (sink, window, pages)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(page_size=0), r"IceCacheConfig.page_size=0"),
        (dict(budget=-16), r"IceCacheConfig.budget=-16"),
        (dict(budget=250), r"budget=250: must be a multiple of page_size=16"),
        (dict(sink_tokens=10), r"sink_tokens=10: must be a multiple"),
        (dict(window_tokens=0), r"window_tokens=0"),
        (dict(budget=64, sink_tokens=32, window_tokens=32), r"budget=64: leaves no room for one retrieved page"),
        (dict(policy="magic"), r"policy='magic'"),
        (dict(n_full_layers=-1), r"n_full_layers=-1"),
    ],
)
def test_bad_top_level_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IceCacheConfig(**kwargs)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: IndexConfig(promote_every=1), r"promote_every=1"),
        (lambda: IndexConfig(packing="zorder"), r"packing='zorder'"),
        (lambda: IndexConfig(gqa="union"), r"gqa='union'"),
        (lambda: IndexConfig(page_score="mean"), r"page_score='mean'"),
        (lambda: IndexConfig(radius_weight=2.0), r"radius_weight=2.0"),
        (lambda: BeamRule(kind="cubic"), r"kind='cubic'"),
        (lambda: BeamRule(width=0), r"width=0"),
        (lambda: BeamRule(upper_factor=0.5), r"upper_factor=0.5"),
        (lambda: BeamRule(pages_per_slot=-1), r"pages_per_slot=-1"),
        (lambda: BeamRule(pages_per_slot=float("inf")), r"pages_per_slot=inf"),
        (lambda: PoolConfig(dtype="int8"), r"dtype='int8'"),
        (lambda: PoolConfig(dtype="float64"), r"dtype='float64'.*bfloat16"),
        (lambda: PoolConfig(capacity_pages=0), r"capacity_pages=0"),
    ],
)
def test_bad_nested_values_name_the_field(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_configs_are_frozen():
    cfg = IceCacheConfig()
    with pytest.raises(Exception):
        cfg.budget = 128  # type: ignore[misc]


def test_with_rederives_sink_and_window():
    cfg = IceCacheConfig().with_(budget=64)
    assert (cfg.sink_tokens, cfg.window_tokens) == (16, 16)
    assert IceCacheConfig().with_(budget=128, sink_tokens=32).sink_tokens == 32


def test_beam_rules():
    assert BeamRule(kind="fixed", width=16).clusters(10) == 10
    assert BeamRule(kind="fixed", width=16).clusters(10_000) == 16
    assert BeamRule(kind="log", width=2).clusters(1024) == 20
    assert BeamRule(kind="linear", width=1).clusters(10_000) == 100
    assert BeamRule().clusters(0) == 0


def test_beam_widens_with_the_slots_it_must_fill():
    # 77 clusters of ~6.2 pages (SmolLM2 at 7.5k): budget 256 fills 12 slots, 1024 fills 60
    assert BeamRule().clusters(77, 480, 12) == 16  # 4 x 12 pages fit in the fixed 16 clusters
    assert BeamRule().clusters(77, 480, 60) == 39  # ceil(4 x 60 x 77 / 480)
    assert BeamRule().clusters(77, 480, 252) == 77
    assert BeamRule(pages_per_slot=0).clusters(77, 480, 60) == 16


def test_public_names_resolve_lazily():
    """Every name in ``icecache_ray.__all__`` resolves; importing the package alone loads none of
    torch / ray / transformers (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, icecache_ray\n"
        "assert not {'torch', 'ray', 'transformers'} & set(sys.modules), sorted(sys.modules)\n"
        "for name in icecache_ray.__all__: getattr(icecache_ray, name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_pages_default_validation_and_rederivation():
    cfg = IceCacheConfig()
    assert (cfg.token_pages, cfg.page_slots) == (4, 8)  # 12 retrieved slots: a third hold single tokens
    assert IceCacheConfig(budget=64).token_pages == 0
    assert IceCacheConfig(token_pages=0).page_slots == 12
    assert cfg.with_(budget=512).token_pages == IceCacheConfig(budget=512).retrieved_pages // 3
    assert cfg.with_(budget=512, token_pages=1).token_pages == 1
    with pytest.raises(ValueError, match=r"IceCacheConfig.token_pages=12: must leave at least one"):
        IceCacheConfig(token_pages=12)
    with pytest.raises(ValueError, match=r"IceCacheConfig.token_pages=-1: must be a non-negative integer"):
        IceCacheConfig(token_pages=-1)
