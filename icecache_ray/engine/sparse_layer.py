"""One sparse (budgeted) layer of the IceCache: sink + window on the device, the rest in host stores.

Prefill: the layer returns the full prompt K/V for dense causal attention, keeps only the sink and
the window, and hands the middle tokens to a background thread that builds one store per
(sequence, KV head) while later layers compute. Decode: the attention function calls
:meth:`SparseLayer.attend`, which selects pages per KV head, loads only missing pages into device
slots, and attends over sink + slots + window. Tokens leaving the window are inserted into the
stores asynchronously after the step's selection, and stay in the window until the insertion has
finished, so no token is ever lost or attended twice.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from icecache_ray.engine.runtime import SparseRuntime
from icecache_ray.engine.slots import PageSlots
from icecache_ray.engine.stats import StepStats


class SparseLayer(CacheLayerMixin):
    """Cache layer for layers >= n_full_layers (see module docstring)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer_idx: int, runtime: SparseRuntime) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.rt = runtime
        self.seq_len = 0
        self.sink_k = self.sink_v = None  # [B, H, S, d]
        self.win_k = self.win_v = None  # [B, H, w, d]: tokens win_start .. seq_len - 1
        self.win_start = 0
        self.offloaded_end = 0  # tokens [sink, offloaded_end) are in, or on their way to, the stores
        self.stores: list[list] | None = None  # [B][H]
        self.slots: list[list[PageSlots]] | None = None
        self.pending: Future | None = None
        self.pending_end = 0  # window tokens below this leave once ``pending`` finishes
        self.prefill_step = False

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states: [B, H, n, d] post-RoPE. Prefill returns the full prompt K/V; decode
        returns sink + window (the attention function adds the selected pages)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.seq_len == 0:
            return self._prefill(key_states, value_states)
        self.prefill_step = False
        self.win_k = torch.cat([self.win_k, key_states], dim=2)
        self.win_v = torch.cat([self.win_v, value_states], dim=2)
        self.seq_len += key_states.shape[2]
        return torch.cat([self.sink_k, self.win_k], dim=2), torch.cat([self.sink_v, self.win_v], dim=2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.close()
        self.__init__(self.layer_idx, self.rt)

    # ------------------------------------------------------------------ prefill
    def _window_start(self, pos: int) -> int:
        cfg = self.rt.config
        sink = min(cfg.sink_tokens, pos)
        return max(sink, (pos // cfg.page_size - (cfg.window_pages - 1)) * cfg.page_size)

    def _prefill(self, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[2]
        sink = min(self.rt.config.sink_tokens, n)
        start = self._window_start(n)  # window of the first decoded token (position n)
        self.sink_k, self.sink_v = k[:, :, :sink].clone(), v[:, :, :sink].clone()
        self.win_k, self.win_v = k[:, :, start:].clone(), v[:, :, start:].clone()
        self.win_start = self.offloaded_end = self.pending_end = start
        host_k = k[:, :, sink:start].float().cpu().numpy().copy()
        host_v = v[:, :, sink:start].float().cpu().numpy().copy()
        self.pending = self.rt.submit(self._build_stores, host_k, host_v)
        self.seq_len, self.prefill_step = n, True
        return k, v  # dense causal attention over the whole prompt, this step only

    def _build_stores(self, host_k: np.ndarray, host_v: np.ndarray) -> None:
        """Background: one store per (sequence, KV head) over the middle tokens [B, H, m, d]."""
        b, h = host_k.shape[:2]
        self.stores = [[self.rt.policy.build(host_k[i, j], host_v[i, j]) for j in range(h)] for i in range(b)]
        if self.rt.uses_slots:
            n_slots, cfg = self.rt.config.retrieved_pages, self.rt.config
            self.slots = [[PageSlots(n_slots, cfg.page_size, host_k.shape[-1], self.dtype, self.device) for _ in range(h)] for _ in range(b)]

    # ------------------------------------------------------------------ decode
    def _settle(self) -> None:
        """Wait for the background job (normally long finished) and retire what it inserted."""
        if self.pending is None:
            return
        dirty = self.pending.result()
        self.pending = None
        drop = self.pending_end - self.win_start
        if drop > 0:
            self.win_k, self.win_v = self.win_k[:, :, drop:], self.win_v[:, :, drop:]
            self.win_start = self.pending_end
        if dirty is not None and self.slots is not None:
            for i, row in enumerate(dirty):
                for j, pages in enumerate(row):
                    self.slots[i][j].invalidate(pages)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query: [B, Hq, n, d] post-RoPE for positions seq_len - n .. seq_len - 1.
        Returns the attention output [B, n, Hq, d]."""
        self._settle()
        stats = StepStats()
        b, hq, n, d = query.shape
        hkv = self.sink_k.shape[1]
        group = hq // hkv
        host_q = query.float().cpu().numpy()  # one device->host copy per layer, not per head
        parts = [[self._retrieved(host_q[i, j * group : (j + 1) * group], i, j, stats) for j in range(hkv)] for i in range(b)]
        t0 = time.perf_counter()
        keys, values, mask = self._assemble(parts, n)
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        mask = mask.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
        stats.attend_ms += 1e3 * (time.perf_counter() - t0)
        self.rt.record(stats)
        self._offload_leaving_tokens()
        return out.transpose(1, 2).contiguous()

    def _retrieved(self, qs: np.ndarray, i: int, j: int, stats: StepStats):
        """Selected middle K/V of sequence i, KV head j: (keys [r, d], values [r, d], valid [r])."""
        t0 = time.perf_counter()
        store = self.stores[i][j]
        selection = self.rt.policy.select(store, qs.reshape(-1, qs.shape[-1]), self.rt.config.retrieved_pages)
        stats.select_ms += 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        if self.rt.uses_slots:
            pool_pages = store.index.table.page_pool[selection.pages]
            loaded, hit, nbytes = self.slots[i][j].load(self.rt.pool, pool_pages, selection.counts)
            stats.pages_selected += len(selection.pages)
            stats.pages_loaded += loaded
            stats.pages_hit += hit
            stats.bytes_loaded += nbytes
            result = self.slots[i][j].flat()
        else:
            rows = selection.tokens
            k = torch.from_numpy(store.keys[rows]).to(self.device, self.dtype)
            v = torch.from_numpy(store.values[rows]).to(self.device, self.dtype)
            stats.bytes_loaded += 2 * k.numel() * k.element_size()
            result = (k, v, torch.ones(len(rows), dtype=torch.bool, device=self.device))
        stats.load_ms += 1e3 * (time.perf_counter() - t0)
        return result

    def _assemble(self, parts, n_queries: int):
        """Stack sink | retrieved (padded) | window into [B, H, L, d] plus a [B, H, n, L] mask."""
        b, h, sink, d = self.sink_k.shape
        width = max(len(p[2]) for row in parts for p in row)
        ret_k = self.sink_k.new_zeros(b, h, width, d)
        ret_v = self.sink_v.new_zeros(b, h, width, d)
        ret_mask = torch.zeros(b, h, width, dtype=torch.bool, device=self.device)
        for i, row in enumerate(parts):
            for j, (k, v, valid) in enumerate(row):
                ret_k[i, j, : len(valid)], ret_v[i, j, : len(valid)], ret_mask[i, j, : len(valid)] = k, v, valid
        keys = torch.cat([self.sink_k, ret_k, self.win_k], dim=2)
        values = torch.cat([self.sink_v, ret_v, self.win_v], dim=2)
        query_pos = torch.arange(self.seq_len - n_queries, self.seq_len, device=self.device)
        win_pos = torch.arange(self.win_start, self.seq_len, device=self.device)
        causal = win_pos[None, :] <= query_pos[:, None]  # [n, w]
        mask = torch.cat(
            [
                torch.ones(b, h, n_queries, sink, dtype=torch.bool, device=self.device),
                ret_mask[:, :, None, :].expand(b, h, n_queries, width),
                causal[None, None].expand(b, h, n_queries, causal.shape[1]),
            ],
            dim=3,
        )
        return keys, values, mask

    def _offload_leaving_tokens(self) -> None:
        """Hand the pages that left the window to the stores, in the background."""
        end = self._window_start(self.seq_len)  # window of the next query (position seq_len)
        if end <= self.offloaded_end:
            return
        lo, hi = self.offloaded_end - self.win_start, end - self.win_start
        host_k = self.win_k[:, :, lo:hi].float().cpu().numpy().copy()
        host_v = self.win_v[:, :, lo:hi].float().cpu().numpy().copy()
        self.offloaded_end = self.pending_end = end
        self.pending = self.rt.submit(self._insert, host_k, host_v)

    def _insert(self, host_k: np.ndarray, host_v: np.ndarray):
        """Background: append rows [B, H, m, d]; returns the dirty pool pages per (seq, head)."""
        dirty = []
        for i, row in enumerate(self.stores):
            dirty.append([])
            for j, store in enumerate(row):
                pages = store.insert(host_k[i, j], host_v[i, j])
                dirty[-1].append(store.index.table.page_pool[pages] if self.rt.uses_slots else pages)
        return dirty

    def close(self) -> None:
        """Wait for background work and give the stores' host pages back."""
        if self.pending is not None:
            try:
                self.pending.result()
            finally:
                self.pending = None
        for row in self.stores or []:
            for store in row:
                store.release()
        self.stores = None
