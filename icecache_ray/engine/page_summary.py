"""The device page summary of one sparse layer: every offloaded page's mean key, pool page and
valid rows, per (row, KV head), in static device tensors.

The index service owns the pages (it clusters keys into them, inserts, splits); what the device
needs to choose among them is this table (ClusterKV's and RetroInfer's centroids). It changes only
by :class:`~icecache_ray.engine.index_service.PageChange` answers of finished builds and inserts,
applied at the start of the step after the one that issued them, whatever the load (so a
sequence's tokens never depend on background timing). A page's mean key is computed on the device
from the pool pages themselves: only ids and counts come from the service.
"""

from __future__ import annotations

import numpy as np
import torch

from icecache_ray.engine.row_cache import upload


class PageSummary:
    """``mean`` [R, H, C, d] float32, ``pool`` [R, H, C] (pool page, -1 = none), ``count`` [R, H, C]
    (valid rows, 0 = none), ``log_count`` [R, H, C] (log of the valid rows, -inf = none: a page's
    centroid logit is ``q . mean + log_count``, its share of mass if its keys were all alike), with
    C index pages per (row, KV head), grown when a store outgrows it."""

    def __init__(self, n_rows: int, heads: int, head_dim: int, pages: int, device) -> None:
        self.device = device
        self.mean = torch.zeros((n_rows, heads, pages, head_dim), dtype=torch.float32, device=device)
        self.pool = torch.full((n_rows, heads, pages), -1, dtype=torch.long, device=device)
        self.count = torch.zeros((n_rows, heads, pages), dtype=torch.long, device=device)
        self.log_count = torch.full((n_rows, heads, pages), float("-inf"), dtype=torch.float32, device=device)
        self.used = np.zeros(n_rows, np.int64)  # pages in use per row (max over heads): what a step scores

    @property
    def capacity(self) -> int:
        return self.pool.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.pool, self.count, self.log_count))

    def reset_row(self, row: int) -> None:
        self.pool[row] = -1
        self.count[row] = 0
        self.log_count[row] = float("-inf")
        self.mean[row] = 0
        self.used[row] = 0

    def apply(self, rows: np.ndarray, heads: np.ndarray, pages: np.ndarray, pool_pages: np.ndarray, counts: np.ndarray,
              pool_t: torch.Tensor) -> torch.Tensor:
        """Record changed pages (flat [m] arrays: buffer row, KV head, index page, pool page, valid
        rows) and recompute their mean keys from ``pool_t`` [capacity, 2, P, d]. Returns the
        changed pool pages [m] (device) so slots holding their old contents can be dropped."""
        self.reserve(rows, pages)
        r, h, p, pp, c = upload([rows, heads, pages, pool_pages, counts], self.device)
        keys = pool_t.index_select(0, pp)[:, 0].float()  # [m, P, d]
        valid = torch.arange(keys.shape[1], device=self.device)[None, :] < c[:, None]
        total = (keys * valid[..., None]).sum(1)
        self.mean[r, h, p] = total / c.clamp(min=1)[:, None]
        self.pool[r, h, p] = pp
        self.count[r, h, p] = c
        self.log_count[r, h, p] = torch.where(c > 0, c.float().log(), float("-inf"))
        return pp

    def reserve(self, rows: np.ndarray, pages: np.ndarray) -> None:
        """Room for index pages ``pages`` [m] of buffer rows ``rows`` [m] (grown when a store
        outgrows the table) and the rows' pages in use."""
        if len(pages) and int(pages.max()) >= self.capacity:
            self._grow(int(pages.max()) + 1)
        np.maximum.at(self.used, rows, pages + 1)

    def _grow(self, need: int) -> None:
        size = max(need, 2 * self.capacity)
        pad = size - self.capacity
        self.mean = torch.cat([self.mean, self.mean.new_zeros(self.mean.shape[:2] + (pad, self.mean.shape[3]))], 2)
        self.pool = torch.cat([self.pool, self.pool.new_full(self.pool.shape[:2] + (pad,), -1)], 2)
        self.count = torch.cat([self.count, self.count.new_zeros(self.count.shape[:2] + (pad,))], 2)
        self.log_count = torch.cat([self.log_count, self.log_count.new_full(self.log_count.shape[:2] + (pad,), float("-inf"))], 2)
