"""Quest on the device (``policy="quest"``, ``selector="device"``): a sparse layer's middle tokens
stay resident, as in the Quest paper (Quest saves attention reads, not memory), with each page's
element-wise key bounds; a decode step scores every page's bound for every row and KV head at once,
takes the best pages and copies them into the slot region, with no host round trip.

The bound of a page for a query head is ``sum_j max(q_j min_j, q_j max_j)``, computed as
``q . center + |q| . half`` (center = (max + min) / 2, half = (max - min) / 2: two matrix products
instead of a [rows, heads, group, pages, d] intermediate). The query heads of a KV head are merged
as the host policy does (``gqa="sum"``: per-head softmax of ``bound / sqrt(d)`` over the pages,
summed), so both selectors pick the same pages (tests/test_device_select.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.row_cache import upload


class DeviceQuest:
    """Middle K/V and page bounds of one sparse layer for every row (see module docstring):
    ``middle`` [2, R, H, T, d] (token order, T = ``max_seq_len`` rounded up to whole pages),
    ``center`` / ``half`` [R, H, T / P, d] float32, ``length`` [R] middle tokens per row (host)."""

    def __init__(self, config: IceCacheConfig, kv, max_seq_len: int, device) -> None:
        self.cfg, self.kv, self.device = config, kv, device
        p, d = config.page_size, kv.kv.shape[-1]
        pages = math.ceil(max_seq_len / p)
        self.middle = torch.zeros((2, kv.batch, kv.heads, pages * p, d), dtype=kv.kv.dtype, device=device)
        self.center = torch.zeros((kv.batch, kv.heads, pages, d), dtype=torch.float32, device=device)
        self.half = torch.zeros_like(self.center)
        self.length = np.zeros(kv.batch, np.int64)
        self.scale = 1.0 / math.sqrt(d)  # the host policy's normalisation of the bound

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.middle, self.center, self.half))

    def reset_row(self, row: int) -> None:
        self.length[row] = 0

    # ------------------------------------------------------------------ upkeep
    def load(self, row: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """A prompt's middle tokens K, V [H, m, d] (device) become ``row``'s middle."""
        m = key.shape[1]
        self.middle[0, row, :, :m], self.middle[1, row, :, :m] = key, value
        self.length[row] = m
        self._refresh(np.full(-(-m // self.cfg.page_size), row), np.arange(-(-m // self.cfg.page_size)))

    def append(self, row: int, kv: torch.Tensor) -> None:
        """Tokens that left ``row``'s window, K and V [2, H, m, d] (device), join its middle; their
        pages' bounds are recomputed (selectable from the next step on, like a host insert)."""
        start, m, p = int(self.length[row]), kv.shape[2], self.cfg.page_size
        self.middle[:, row, :, start : start + m] = kv
        self.length[row] = start + m
        pages = np.arange(start // p, -(-(start + m) // p))
        self._refresh(np.full(len(pages), row), pages)

    def _refresh(self, rows: np.ndarray, pages: np.ndarray) -> None:
        """Bounds of pages ``pages`` [m] of rows ``rows`` [m] from the middle tokens they hold."""
        if not len(pages):
            return
        p = self.cfg.page_size
        r, pg, n = upload([rows, pages, self.length[rows]], self.device)
        pos = pg[:, None] * p + torch.arange(p, device=self.device)[None, :]  # [m, P]
        keys = self.middle[0, r[:, None], :, pos].float()  # [m, P, H, d]
        valid = (pos < n[:, None])[:, :, None, None]
        lo = keys.masked_fill(~valid, float("inf")).amin(1)  # [m, H, d]
        hi = keys.masked_fill(~valid, float("-inf")).amax(1)
        self.center[r, :, pg], self.half[r, :, pg] = (hi + lo) / 2, (hi - lo) / 2

    # ------------------------------------------------------------------ the step
    def select_and_load(self, step, q: torch.Tensor, scale: float, mask: torch.Tensor) -> None:
        """q [n, H, g, d] of the decode rows: the best pages of each (row, KV head) into its slot
        region, the slot part of ``mask`` [n, H, L] written, page counters added to ``step``."""
        p, kv = self.cfg.page_size, self.kv
        lengths = self.length[step.decode_rows]
        n_pages = -(-lengths // p)  # [n] host bookkeeping: no device read
        c = max(1, int(n_pages.max()))
        k = min(self.cfg.retrieved_pages, c)
        rows = step.t["decode_rows"]
        n_dev, len_dev = upload([n_pages, lengths], self.device)
        center, half = self.center[rows, :, :c], self.half[rows, :, :c]  # [n, H, C, d]
        bound = torch.matmul(q, center.transpose(-1, -2)) + torch.matmul(q.abs(), half.transpose(-1, -2))  # [n, H, g, C]
        real = torch.arange(c, device=self.device)[None, :] < n_dev[:, None]  # [n, C]
        logits = (bound * self.scale).masked_fill(~real[:, None, None, :], float("-inf"))
        mass = torch.softmax(logits, -1).nan_to_num(0.0).sum(2).masked_fill(~real[:, None, :], -1.0)  # [n, H, C]
        top = mass.topk(k, dim=-1).indices  # [n, H, k]
        pos = top[..., None] * p + torch.arange(p, device=self.device)  # [n, H, k, P]
        ok = (top[..., None] < n_dev[:, None, None, None]) & (pos < len_dev[:, None, None, None])
        pos = pos.flatten(2)  # [n, H, k * P]
        heads = torch.arange(kv.heads, device=self.device)[None, :, None]
        data = self.middle[:, rows[:, None, None], heads, pos]  # [2, n, H, k * P, d]
        end = kv.slot_start + k * p
        kv.kv[:, rows, :, kv.slot_start : end] = data
        mask[..., kv.slot_start : end] = ok.flatten(2)
        mask[..., end : kv.ring_start] = False
        chosen = ok[..., 0].sum((1, 2))  # [n] pages taken
        step.add_device_counts(chosen, chosen, kv.page_bytes(p))
