"""Frozen, validated configuration for icecache_ray.

Every config is a frozen dataclass validated on construction: a bad value raises ``ValueError``
naming the field and the value received, before any index, pool or actor is created.
This module imports neither torch nor ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

PAGE_SCORES = ("max", "mass")
GQA_RULES = ("interleave", "max", "sum")
PACKINGS = ("projection", "pca")
BEAM_KINDS = ("fixed", "log", "linear")
# A 16-bit pool halves the bytes copied to the device; the index then keeps a float32 copy of the
# keys it scores (icecache_ray.index.storage says what that costs).
POOL_DTYPES = ("float32", "bfloat16", "float16")
POLICIES = ("icecache", "quest", "oracle", "streaming", "full")
SELECTORS = ("device", "host")


def _fail(owner: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r}: {why}")


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(owner, name, value, "must be a positive integer")


def _non_negative_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(owner, name, value, "must be a non-negative integer")


def _choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(owner, name, value, f"must be one of {list(choices)}")


@dataclass(frozen=True)
class BeamRule:
    """How many level-1 clusters (per query head) the beam keeps, as a function of the index size.

    ``fixed``: ``width`` clusters whatever N; ``log``: ``width * log2(n_clusters)``;
    ``linear``: ``width * n_clusters / 100`` (the published code's rule, linear cost in N).
    The result is clamped to ``[min_width, n_clusters]``, and raised (when the caller says how many
    slots it fills) until the clusters hold about ``pages_per_slot`` candidate pages per selected
    slot: a fixed width that is ample at budget 256 leaves a budget of 1024 choosing among barely
    more pages than it takes, so its selection is the routing's order, not the tokens' scores
    (README "Why niah_single #5 lost its last digit"). 0 turns that off.
    """

    kind: str = "fixed"
    width: float = 16.0
    min_width: int = 4
    upper_factor: float = 8.0  # beam at levels >= 2 = upper_factor * level-1 beam (cheap: ~5 children each)
    pages_per_slot: float = 4.0

    def __post_init__(self) -> None:
        _choice("BeamRule", "kind", self.kind, BEAM_KINDS)
        if not (isinstance(self.width, (int, float)) and math.isfinite(self.width) and self.width > 0):
            _fail("BeamRule", "width", self.width, "must be a positive finite number")
        _positive_int("BeamRule", "min_width", self.min_width)
        if not (isinstance(self.upper_factor, (int, float)) and self.upper_factor >= 1.0):
            _fail("BeamRule", "upper_factor", self.upper_factor, "must be a number >= 1")
        if not (isinstance(self.pages_per_slot, (int, float)) and math.isfinite(self.pages_per_slot)
                and self.pages_per_slot >= 0):
            _fail("BeamRule", "pages_per_slot", self.pages_per_slot, "must be a finite number >= 0")

    def clusters(self, n_clusters: int, n_pages: int = 0, slots: int = 0) -> int:
        """Level-1 beam width for an index with ``n_clusters`` level-1 nodes holding ``n_pages``
        pages, for a query that fills ``slots`` page slots (whole pages + token slots' pages)."""
        if n_clusters <= 0:
            return 0
        if self.kind == "fixed":
            width = self.width
        elif self.kind == "log":
            width = self.width * math.log2(max(n_clusters, 2))
        else:
            width = self.width * n_clusters / 100.0
        if slots > 0 and n_pages > 0:  # mean pages per cluster = n_pages / n_clusters
            width = max(width, self.pages_per_slot * slots * n_clusters / n_pages)
        return int(min(n_clusters, max(self.min_width, math.ceil(width))))


@dataclass(frozen=True)
class IndexConfig:
    """M-DCI index parameters (one index per sequence x layer x KV head).

    promote_every: about 1 in ``promote_every`` indexed tokens becomes a level-1 node (cluster
        centre); the paper's p1 = 0.01 is ``promote_every=100``.
    promote_every_upper: about 1 in ``promote_every_upper`` level-l nodes is promoted to level l+1
        (p2 = 0.2 is 5).
    packing: how a cluster's children are cut into pages at build time: ``projection`` sorts them
        along one random projection (the published code), ``pca`` bisects recursively along the
        principal direction of the augmented keys.
    page_score: a page's score for one query head: ``max`` = its best token's q.k (the paper),
        ``mass`` = the softmax mass of its tokens among the scored candidates.
    radius_weight: routing scores a node by ``q.mean + radius_weight * |q| * radius`` (its
        members' mean key and their max distance to it): 0 trusts the mean, 1 is the ball bound.
    gqa: how the query heads of one KV head are combined: ``interleave`` (rank round-robin of
        per-head lists, the published code), ``max`` (max over heads of the per-head normalised
        score), ``sum`` (sum over heads of the per-head page softmax mass).
    """

    promote_every: int = 100
    promote_every_upper: int = 5
    packing: str = "pca"
    page_score: str = "mass"
    gqa: str = "sum"
    beam: BeamRule = field(default_factory=BeamRule)
    radius_weight: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.promote_every, bool) or not isinstance(self.promote_every, int) or self.promote_every < 2:
            _fail("IndexConfig", "promote_every", self.promote_every, "must be an integer >= 2")
        if (
            isinstance(self.promote_every_upper, bool)
            or not isinstance(self.promote_every_upper, int)
            or self.promote_every_upper < 2
        ):
            _fail("IndexConfig", "promote_every_upper", self.promote_every_upper, "must be an integer >= 2")
        _choice("IndexConfig", "packing", self.packing, PACKINGS)
        _choice("IndexConfig", "page_score", self.page_score, PAGE_SCORES)
        _choice("IndexConfig", "gqa", self.gqa, GQA_RULES)
        if not (isinstance(self.radius_weight, (int, float)) and 0.0 <= self.radius_weight <= 1.0):
            _fail("IndexConfig", "radius_weight", self.radius_weight, "must be a number in [0, 1]")
        if not isinstance(self.beam, BeamRule):
            _fail("IndexConfig", "beam", self.beam, "must be a BeamRule")
        _non_negative_int("IndexConfig", "seed", self.seed)


@dataclass(frozen=True)
class PoolConfig:
    """Host page pool: storage dtype and hard capacity in pages (one page = K and V of one head).

    dtype: ``float32`` (the default; the index kernels read the pool's keys in place),
        ``bfloat16`` or ``float16`` (half the host -> device bytes; the index keeps a float32 copy
        of the keys, 4 * head_dim B per page slot, see :mod:`icecache_ray.index.storage`).
    """

    dtype: str = "float32"
    capacity_pages: int = 1 << 16

    def __post_init__(self) -> None:
        _choice("PoolConfig", "dtype", self.dtype, POOL_DTYPES)
        _positive_int("PoolConfig", "capacity_pages", self.capacity_pages)


def default_sink_window(budget: int, page_size: int) -> tuple[int, int]:
    """Sink and window tokens used when the caller does not set them.

    Budget 256 keeps the paper's 2 sink pages + 2 window pages; smaller budgets shrink the sink
    first (one page is enough for the attention-sink tokens) so retrieval keeps most slots.
    """
    if budget >= 16 * page_size:
        return 2 * page_size, 2 * page_size
    if budget >= 8 * page_size:
        return page_size, 2 * page_size
    return page_size, page_size


@dataclass(frozen=True)
class IceCacheConfig:
    """Top-level configuration of the KV-cache policy.

    page_size: tokens per host page (default 16).
    budget: tokens attended per (layer, KV head) in sparse layers: sink + retrieved pages + window.
    sink_tokens / window_tokens: ``None`` picks :func:`default_sink_window` for the budget.
        The window holds ``window_tokens // page_size - 1`` full pages plus the page being filled.
    n_full_layers: leading layers that keep full attention (no index).
    policy: one of ``icecache``, ``quest``, ``oracle``, ``streaming``, ``full``.
    layer_reuse: the paper's IceCache(r): sparse layers are grouped in runs of ``layer_reuse``;
        the first (anchor) layer of a run selects pages, the next ``layer_reuse - 1`` layers attend
        over the anchor's pages (their own K/V of those pages). 1 = every layer selects.
    token_pages: icecache only: how many of the ``retrieved_pages`` slots hold single tokens
        instead of whole pages: the ``token_pages * page_size`` tokens of largest attention mass
        among the candidate pages not chosen whole (the index scores them exactly anyway).
        ``None`` picks ``retrieved_pages // 3``; 0 = pages only (the paper); at most
        ``retrieved_pages - 1``. Same budget either way.
    selector: icecache and quest: where a decode step chooses its pages. icecache ``device``:
        every page's mean key is scored on the device, the best ``shortlist * retrieved_pages``
        pages are re-scored exactly from their keys (no host round trip per layer); ``host``: the
        M-DCI beam search of the index service (the paper's search; the reference). quest
        ``device``: the middle tokens stay on the device (as in the Quest paper) with per-page key
        bounds scored there; ``host``: bounds and tokens in host stores. ``None`` picks ``device``,
        or ``host`` with ``layer_reuse > 1`` (``device`` needs ``layer_reuse=1``). Streaming never
        selects; oracle always reads the host stores.
    shortlist: with ``selector="device"``, shortlisted pages per retrieved slot (>= 1). 12: on
        RULER at 7.5k tokens 8 lost 3.4 points against 12 (docs/accuracy.md), for ~25 ms less a
        B = 8 step on a 2-core CPU.
    """

    page_size: int = 16
    budget: int = 256
    sink_tokens: int | None = None
    window_tokens: int | None = None
    n_full_layers: int = 2
    policy: str = "icecache"
    index: IndexConfig = field(default_factory=IndexConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    layer_reuse: int = 1
    token_pages: int | None = None
    selector: str | None = None
    shortlist: float = 12.0

    def __post_init__(self) -> None:
        _positive_int("IceCacheConfig", "page_size", self.page_size)
        _positive_int("IceCacheConfig", "layer_reuse", self.layer_reuse)
        _positive_int("IceCacheConfig", "budget", self.budget)
        _non_negative_int("IceCacheConfig", "n_full_layers", self.n_full_layers)
        _choice("IceCacheConfig", "policy", self.policy, POLICIES)
        if self.selector is None:
            object.__setattr__(self, "selector", "device" if self.layer_reuse == 1 else "host")
        _choice("IceCacheConfig", "selector", self.selector, SELECTORS)
        if not (isinstance(self.shortlist, (int, float)) and not isinstance(self.shortlist, bool)
                and math.isfinite(self.shortlist) and self.shortlist >= 1):
            _fail("IceCacheConfig", "shortlist", self.shortlist, "must be a finite number >= 1")
        if self.selector == "device" and self.policy in ("icecache", "quest") and self.layer_reuse > 1:
            _fail("IceCacheConfig", "layer_reuse", self.layer_reuse,
                  "the device selector needs layer_reuse=1 (followers read the host selector's token ids); use selector='host'")
        sink, window = default_sink_window(self.budget, self.page_size)
        if self.sink_tokens is None:
            object.__setattr__(self, "sink_tokens", sink)
        if self.window_tokens is None:
            object.__setattr__(self, "window_tokens", window)
        self._check_layout()
        if self.token_pages is None:
            object.__setattr__(self, "token_pages", self.retrieved_pages // 3)
        _non_negative_int("IceCacheConfig", "token_pages", self.token_pages)
        if self.token_pages >= self.retrieved_pages:
            _fail("IceCacheConfig", "token_pages", self.token_pages,
                  f"must leave at least one of the {self.retrieved_pages} retrieved slots for a whole page")

    def _check_layout(self) -> None:
        p = self.page_size
        _non_negative_int("IceCacheConfig", "sink_tokens", self.sink_tokens)
        _positive_int("IceCacheConfig", "window_tokens", self.window_tokens)
        for name in ("sink_tokens", "window_tokens", "budget"):
            value = getattr(self, name)
            if value % p:
                _fail("IceCacheConfig", name, value, f"must be a multiple of page_size={p}")
        if self.retrieved_pages < 1:
            _fail(
                "IceCacheConfig",
                "budget",
                self.budget,
                f"leaves no room for one retrieved page after sink_tokens={self.sink_tokens} "
                f"and window_tokens={self.window_tokens} (page_size={p})",
            )

    @property
    def retrieved_pages(self) -> int:
        """Number of page slots filled by retrieval per (layer, KV head)."""
        return (self.budget - self.sink_tokens - self.window_tokens) // self.page_size

    @property
    def page_slots(self) -> int:
        """Retrieved slots that hold whole pages (the rest hold single tokens, ``token_pages``)."""
        return self.retrieved_pages - self.token_pages

    @property
    def window_pages(self) -> int:
        return self.window_tokens // self.page_size

    def with_(self, **changes: Any) -> "IceCacheConfig":
        """A copy with some fields changed (re-validated). Sink, window and token_pages are re-derived
        unless given."""
        if "budget" in changes or "page_size" in changes:
            changes.setdefault("sink_tokens", None)
            changes.setdefault("window_tokens", None)
        if "layer_reuse" in changes:
            changes.setdefault("selector", None)
        if {"budget", "page_size", "sink_tokens", "window_tokens"} & set(changes):
            changes.setdefault("token_pages", None)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = {g.name: getattr(value, g.name) for g in fields(value)} if hasattr(value, "__dataclass_fields__") else value
        out["index"]["beam"] = {g.name: getattr(self.index.beam, g.name) for g in fields(self.index.beam)}
        return out
