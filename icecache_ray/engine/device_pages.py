"""A sparse layer's decode on the device (``IceCacheConfig.selector="device"``): its page summary,
its page slots and one batched selection, hit/miss and copy for every decode row and KV head.

Per layer and step, all device work (no host round trip):
scores of every page's mean key → shortlist → exact scores over the shortlist's keys (read from
the pool view) → whole pages + single tokens per (row, KV head) → hit/miss against the slots →
only the missing pages copied from the pool view into their slots, the single tokens into the
token slots → the attention mask of the slot region. Page counters stay on the device and travel
to the host with the step's sampled ids.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.device_select import pick, shortlist
from icecache_ray.engine.device_slots import DeviceSlots
from icecache_ray.engine.page_summary import PageSummary
from icecache_ray.engine.pool_view import pool_tensor
from icecache_ray.engine.sizing import PAGE_FILL_SLACK
from icecache_ray.kernels import device_copy_cuda
from icecache_ray.kernels.device_select_cpu import apply_changes as apply_changes_cpu
from icecache_ray.kernels.device_select_cpu import select_and_load as select_and_load_cpu


class DevicePages:
    """Summary + slots of one sparse layer for ``n_rows`` rows (see module docstring)."""

    fused = True  # CPU: one numba call per layer (False: the torch ops CUDA runs; the parity tests set it)

    def __init__(self, config: IceCacheConfig, kv, max_seq_len: int, device) -> None:
        self.cfg, self.kv, self.device = config, kv, device
        p = config.page_size
        pages = max(8, math.ceil(math.ceil(max_seq_len / p) * PAGE_FILL_SLACK))
        self.summary = PageSummary(kv.batch, kv.heads, kv.keys.shape[-1], pages, device)
        self.slots = DeviceSlots(kv.batch, kv.heads, config.page_slots, device)
        self.n_tokens = config.token_pages * p
        self.short = max(config.retrieved_pages, math.ceil(config.shortlist * config.retrieved_pages))
        self.pool_t: torch.Tensor | None = None  # the pool view, made on first use
        self._pool_of_view = None

    def nbytes(self) -> int:
        return self.summary.nbytes() + 2 * self.slots.page.numel() * self.slots.page.element_size()

    def reset_row(self, row: int) -> None:
        self.summary.reset_row(row)
        self.slots.reset_row(row)

    # ------------------------------------------------------------------ summary upkeep
    def apply(self, changes: list, reset: bool, row_of: dict[str, int], pool) -> None:
        """Page changes of the stores (oldest first); ``reset``: the service was replayed, so
        every row's summary and slots start over from these."""
        if pool is not None and pool is not self._pool_of_view:  # first use, or a replayed service's new pool
            self.pool_t, self._pool_of_view = pool_tensor(pool, self.device), pool
        if reset:
            for row in set(row_of.values()):
                self.reset_row(row)
        live = [c for c in changes if c.seq in row_of and len(c.pages)]
        if not live:
            return
        rows = np.concatenate([np.full(len(c.pages), row_of[c.seq], np.int64) for c in live])
        heads = np.concatenate([np.full(len(c.pages), c.head, np.int64) for c in live])
        cat = lambda name: np.concatenate([getattr(c, name) for c in live]).astype(np.int64)  # noqa: E731
        pages, pool_pages, counts = cat("pages"), cat("pool_pages"), cat("counts")
        if not self._fused_cpu(self.slots.page):
            self.slots.drop(self.summary.apply(rows, heads, pages, pool_pages, counts, self.pool_t))
            return
        s = self.summary
        s.reserve(rows, pages)
        apply_changes_cpu(rows, heads, pages, pool_pages, counts, self.pool_t.numpy(), s.mean.numpy(), s.pool.numpy(),
                          s.count.numpy(), s.log_count.numpy(), self.slots.page.numpy(), self.slots.count.numpy())

    # ------------------------------------------------------------------ the step
    def select_and_load(self, step, q: torch.Tensor, scale: float, mask: torch.Tensor) -> None:
        """q [n, H, g, d] of the decode rows. Fills their slots, writes the slot region of the
        attention ``mask`` [n, H, L] and adds the page counters to ``step``."""
        if self._fused_cpu(mask):
            self._select_and_load_cpu(step, q, scale, mask)
            return
        rows = step.t["decode_rows"]
        used = max(1, int(self.summary.used[step.decode_rows].max()))  # host bookkeeping: no device read
        s, span = self.summary, step.dense
        t0 = time.perf_counter()
        if span.n_rows == len(step.decode_rows):  # consecutive rows: views, no gather
            mean, log_count = s.mean[span.lo : span.lo + span.n_rows], s.log_count[span.lo : span.lo + span.n_rows]
            pool, count = s.pool[span.lo : span.lo + span.n_rows], s.count[span.lo : span.lo + span.n_rows]
        else:
            mean, log_count, pool, count = s.mean[rows, :, :used], s.log_count[rows, :, :used], s.pool[rows, :, :used], s.count[rows, :, :used]
        best = shortlist(q, mean, log_count, self.short, scale)  # [n, H, S]
        short_pool, short_count = pool.gather(-1, best), count.gather(-1, best)
        n, heads, size = best.shape
        keys = self.pool_t[:, 0].index_select(0, short_pool.clamp(min=0).reshape(-1))
        keys = keys.view(n, heads, size, *keys.shape[1:])
        picks = pick(q, keys, short_count, self.cfg.page_slots, self.n_tokens, scale)
        want = short_pool.gather(-1, picks.pages).masked_fill(~picks.page_ok, -1)
        want_count = short_count.gather(-1, picks.pages).masked_fill(~picks.page_ok, 0)
        missing, slot = self.slots.plan(rows, want, want_count)
        step.stats.select_ms += 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        self._copy_pages(rows, missing, want, slot)
        token_pool = short_pool.gather(-1, picks.tokens // self.cfg.page_size)
        self._copy_tokens(rows, token_pool, picks.tokens % self.cfg.page_size)
        step.stats.load_ms += 1e3 * (time.perf_counter() - t0)
        token_pages = (picks.token_ok.sum(-1) + self.cfg.page_size - 1) // self.cfg.page_size  # [n, H]
        step.add_device_counts(picks.page_ok.sum((1, 2)) + token_pages.sum(1), missing.sum((1, 2)) + token_pages.sum(1),
                               self.kv.page_bytes(self.cfg.page_size))
        mask[..., self.kv.slot_start : self.kv.ring_start] = self._slot_mask(rows, picks.token_ok)

    def _fused_cpu(self, on: torch.Tensor) -> bool:
        """The numba kernels serve float32 buffers on a CPU (see kernels.device_select_cpu); ``on``:
        a tensor of this layer's step (where the work runs)."""
        return (self.fused and on.device.type == "cpu" and self.kv.kv.dtype == torch.float32
                and self.pool_t is not None and self.pool_t.dtype == torch.float32)

    def _select_and_load_cpu(self, step, q: torch.Tensor, scale: float, mask: torch.Tensor) -> None:
        s, n = self.summary, len(step.decode_rows)
        used = max(1, int(s.used[step.decode_rows].max()))
        selected, loaded = np.zeros(n, np.int64), np.zeros(n, np.int64)
        t0 = time.perf_counter()
        select_and_load_cpu(q.contiguous().numpy(), s.mean.numpy(), s.log_count.numpy(), s.count.numpy(), s.pool.numpy(), used,
                            self.pool_t.numpy(), self.short, self.cfg.page_slots, self.n_tokens, scale, self.slots.page.numpy(),
                            self.slots.count.numpy(), step.decode_rows, self.kv.kv.numpy(), self.kv.slot_start, mask.numpy(),
                            selected, loaded)
        step.stats.select_ms += 1e3 * (time.perf_counter() - t0)
        step.add_device_counts(torch.from_numpy(selected), torch.from_numpy(loaded), self.kv.page_bytes(self.cfg.page_size))

    def _copy_pages(self, rows: torch.Tensor, missing: torch.Tensor, want: torch.Tensor, slot: torch.Tensor) -> None:
        """The missing pages, pool view → their slots (K and V in one indexed copy; on CUDA one
        kernel over the static plan, see kernels.device_copy_cuda)."""
        p = self.cfg.page_size
        if device_copy_cuda.supports(self.pool_t, self.kv.flat):
            dst = self.kv.flat_base(rows)[:, :, None] + self.kv.slot_start + slot * p  # [n, H, k]
            device_copy_cuda.copy_missing_pages(self.pool_t, want.clamp(min=0), missing, dst, self.kv.flat, self.kv.v_offset)
            return
        item, head, j = missing.nonzero(as_tuple=True)  # the reference; on CUDA a host sync (data-dependent size)
        src = want[item, head, j]
        base = self.kv.flat_base(rows)[item, head] + self.kv.slot_start + slot[item, head, j] * p  # [m]
        dst = base[:, None] + torch.arange(p, device=rows.device)[None, :]  # [m, P]
        data = self.pool_t.index_select(0, src)  # [m, 2, P, d]
        self.kv.write_t(dst, data.transpose(0, 1))

    def _copy_tokens(self, rows: torch.Tensor, pool_pages: torch.Tensor, in_page: torch.Tensor) -> None:
        """Every token slot re-read: (pool page, row) [n, H, t] → the token region (static size)."""
        if not pool_pages.shape[-1]:
            return
        data = self.pool_t[pool_pages.clamp(min=0), :, in_page]  # [n, H, t, 2, d]
        start = self.kv.slot_start + self.cfg.page_slots * self.cfg.page_size
        dst = self.kv.flat_base(rows)[:, :, None] + start + torch.arange(pool_pages.shape[-1], device=rows.device)
        self.kv.write_t(dst, data.movedim(3, 0))

    def _slot_mask(self, rows: torch.Tensor, token_ok: torch.Tensor) -> torch.Tensor:
        """[n, H, slot_rows]: valid rows of the page slots, then of the token slots."""
        p = self.cfg.page_size
        count = self.slots.count[rows]  # [n, H, S]
        pages = (torch.arange(p, device=rows.device) < count[..., None]).flatten(2)
        short = token_ok.new_zeros(token_ok.shape[:2] + (self.n_tokens - token_ok.shape[-1],))  # fewer candidates than slots
        return torch.cat([pages, token_ok, short], -1)
