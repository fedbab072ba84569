"""The device selector as a selection policy over one store, for the retrieval benchmark: the same
:func:`~icecache_ray.engine.device_select.shortlist` and :func:`~icecache_ray.engine.device_select.pick`
the engine runs, over a page summary of the store's M-DCI pages (mean keys from the pool)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.device_select import pick, shortlist
from icecache_ray.engine.pool_view import pool_tensor
from icecache_ray.policies.base import Selection


@dataclass(frozen=True)
class DeviceSelectPolicy:
    """``base``: an ``icecache`` policy (its index builds and inserts the pages); selection scores
    every page's mean key, shortlists ``shortlist`` pages per retrieved slot and re-scores them."""

    base: object
    shortlist: float = IceCacheConfig.shortlist
    name: str = "icecache_device"

    @property
    def head_dim(self) -> int:
        return self.base.head_dim

    def build(self, keys: np.ndarray, values: np.ndarray):
        return self.base.build(keys, values)

    def select(self, store, queries: np.ndarray, n_pages: int, context_logits=None) -> Selection:
        """queries [g, d] of one KV head's group; ``n_pages`` retrieved slots (pages + token slots)."""
        if store.n_tokens == 0:
            return Selection.empty()
        pool = pool_tensor(self.base.pool, "cpu")
        pages = np.arange(store.n_pages)
        pool_ids = torch.from_numpy(store.pool_pages(pages).astype(np.int64))
        count = torch.from_numpy(store.page_counts(pages).astype(np.int64))
        keys = pool.index_select(0, pool_ids)[:, 0].float()  # [C, P, d]
        valid = torch.arange(keys.shape[1]) < count[:, None]
        mean = (keys * valid[..., None]).sum(1) / count.clamp(min=1)[:, None]
        log_count = torch.where(count > 0, count.float().log(), float("-inf"))
        whole, n_tokens = self.base.split(n_pages)
        scale = 1.0 / math.sqrt(self.head_dim)
        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))[None, None]  # [1, 1, g, d]
        size = max(n_pages, math.ceil(self.shortlist * n_pages))
        best = shortlist(q, mean[None, None], log_count[None, None], size, scale)[0, 0]  # index pages [S]
        picks = pick(q, keys[best][None, None], count[best][None, None], whole, n_tokens, scale)
        chosen = best[picks.pages[0, 0][picks.page_ok[0, 0]]].numpy()
        flat = picks.tokens[0, 0][picks.token_ok[0, 0]]
        p = keys.shape[1]
        t_pages, t_rows = best[flat // p].numpy(), (flat % p).numpy()
        tokens = store.tokens_of(chosen, t_pages, t_rows)
        return Selection(chosen.astype(np.int64), store.page_counts(chosen).astype(np.int64), tokens)

    def release(self) -> None:
        pass
