"""Selection policies (small dataclass plugins with one interface, see :mod:`.base`)."""

from __future__ import annotations

from icecache_ray.config import IndexConfig
from icecache_ray.policies.base import Selection, SelectionPolicy
from icecache_ray.policies.dense import FullPolicy, OraclePolicy, QuestPolicy, StreamingPolicy
from icecache_ray.policies.icecache import IceCachePolicy

__all__ = [
    "Selection",
    "SelectionPolicy",
    "FullPolicy",
    "OraclePolicy",
    "QuestPolicy",
    "StreamingPolicy",
    "IceCachePolicy",
    "make_policy",
]


def make_policy(name: str, head_dim: int, page_size: int = 16, pool=None, index: IndexConfig | None = None,
                token_pages: int = 0) -> SelectionPolicy:
    """Build a policy by name: icecache (needs ``pool``; ``token_pages`` of its retrieved slots
    hold single tokens), quest, oracle (token), oracle_seqpage, streaming, full."""
    index = index or IndexConfig()
    if name == "icecache":
        if pool is None:
            raise ValueError("policy 'icecache' needs a host page pool (pool=None given)")
        return IceCachePolicy(head_dim=head_dim, pool=pool, index=index, token_pages=token_pages)
    if name == "quest":
        return QuestPolicy(head_dim=head_dim, page_size=page_size, gqa=index.gqa)
    if name in ("oracle", "oracle_token"):
        return OraclePolicy(head_dim=head_dim, page_size=page_size, mode="token")
    if name == "oracle_seqpage":
        return OraclePolicy(head_dim=head_dim, page_size=page_size, mode="seqpage")
    if name == "streaming":
        return StreamingPolicy(head_dim=head_dim, page_size=page_size)
    if name == "full":
        return FullPolicy(head_dim=head_dim, page_size=page_size)
    raise ValueError(
        f"policy={name!r}: unknown; choose one of icecache, quest, oracle, oracle_seqpage, streaming, full"
    )
