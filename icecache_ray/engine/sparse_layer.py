"""One sparse (budgeted) layer of the IceCache: sink + window on the device, the rest in host stores.

Prefill: the layer hands the whole prompt's K/V to dense causal attention, then (in
:meth:`SparseLayer.finish_prefill`, once the attention mask tells each sequence's left padding)
keeps only each sequence's sink and window on the device and gives the middle tokens to a
background thread that builds one store per (sequence, KV head) while later layers compute.

Decode: new tokens go into the window ring; :meth:`SparseLayer.attend` selects pages per KV head,
copies only the pages that are not resident (one gather, one copy, one scatter per layer) and
attends over sink + slots + window in one call. Tokens leaving the window are inserted into the
stores in the background and stay attended until the insertion is done (the next step's settle),
so no token is ever lost or counted twice.
"""

from __future__ import annotations

import time
import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from icecache_ray.engine.resident import ResidentKV
from icecache_ray.engine.runtime import SparseRuntime
from icecache_ray.engine.slots import SlotTable
from icecache_ray.engine.stats import StepStats
from icecache_ray.engine.stores import LocalStores
from icecache_ray.engine.window import WindowBook


def left_padding(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Per-sequence left padding from the 4D mask [B, 1, q, kv] (bool: True = attend, or additive
    float) given to the prefill's attention; ``None`` means no padding. Rejects other layouts."""
    if attention_mask is None:
        return [0] * batch
    last = attention_mask[:, 0, -1, -length:]
    valid = last if last.dtype == torch.bool else last == 0
    valid = valid.expand(batch, length).cpu().numpy()
    pads = length - valid.sum(axis=1)
    for b, pad in enumerate(pads.tolist()):
        if not valid[b, pad:].all() or pad == length:
            raise ValueError(f"sequence {b} of the batch: only left padding with at least one real token is supported")
    return [int(p) for p in pads]


class SparseLayer(CacheLayerMixin):
    """Cache layer for layers >= n_full_layers (see module docstring). With ``anchor`` set, the
    layer reuses that layer's selected tokens instead of selecting (IceCache(r)).
    ``stores_factory`` makes the host-side store backend (default: :class:`LocalStores`)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer_idx: int, runtime: SparseRuntime, anchor: "SparseLayer | None" = None, stores_factory=None) -> None:
        super().__init__()
        self.layer_idx, self.rt, self.anchor = layer_idx, runtime, anchor
        self.seq_len = 0  # padded length, as transformers counts it
        self.book: WindowBook | None = None
        self.kv: ResidentKV | None = None
        self.slots: SlotTable | None = None
        self.ret_valid: np.ndarray | None = None  # [B, H, R * P] valid rows of the slot region
        self._stores_factory = stores_factory  # () -> a store backend (e.g. RemoteStores); default local
        self.stores = stores_factory() if stores_factory is not None else LocalStores(runtime)
        self.selected: list[list[np.ndarray]] | None = None  # [B][H] middle-token ids chosen this step
        self.prefill_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.heads = np.zeros(0, np.int64)  # arange(KV heads), for row arithmetic
        self.prefill_step = False

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states: [B, H, n, d] post-RoPE. Prefill returns the prompt K/V for dense
        attention; decode writes the new tokens into the window ring (attention reads the buffer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        if self.seq_len == 0:
            self.prefill_kv, self.seq_len, self.prefill_step = (key_states, value_states), n, True
            return key_states, value_states
        if self.book is None:
            raise RuntimeError(f"layer {self.layer_idx}: decode before the prefill finished (attention not run?)")
        if n > self.rt.config.page_size:
            raise ValueError(f"a decode step may add at most page_size={self.rt.config.page_size} tokens, got {n}")
        self._settle()
        self.prefill_step = False
        ring = self.book.place_next(n)  # [B, n]
        rows = self.kv.rows(np.arange(ring.shape[0])[:, None, None], self.heads[None, :, None], self.kv.ring_start + ring[:, None, :])
        self.kv.write(rows, torch.stack([key_states, value_states]))
        self.book.length += n
        self.seq_len += n
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.close()
        self.__init__(self.layer_idx, self.rt, self.anchor, self._stores_factory)

    # ------------------------------------------------------------------ prefill
    def finish_prefill(self, attention_mask: torch.Tensor | None) -> None:
        """After dense attention over the prompt: keep sink + window per sequence, send the middle
        to the background store build, and drop this layer's full prompt K/V."""
        k, v = self.prefill_kv
        self.prefill_kv = None
        batch, heads, total, dim = k.shape
        cfg = self.rt.config
        pads = left_padding(attention_mask, batch, total)
        self.book = WindowBook([total - p for p in pads], cfg.sink_tokens, cfg.window_pages, cfg.page_size)
        slot_rows = cfg.retrieved_pages * cfg.page_size
        self.kv = ResidentKV(batch, heads, cfg.sink_tokens, slot_rows, self.book.ring_tokens, dim, self.dtype, self.device)
        self.ret_valid = np.zeros((batch, heads, slot_rows), bool)
        if self.rt.uses_slots and self.anchor is None:
            self.slots = SlotTable(batch, heads, cfg.retrieved_pages, cfg.page_size)
        self.heads = np.arange(heads)
        middles = []
        for b, pad in enumerate(pads):
            sink, start, n = int(self.book.sink_len[b]), int(self.book.win_start[b]), int(self.book.length[b])
            kept = np.concatenate([np.arange(sink), self.kv.ring_start + self.book.place(b, np.arange(start, n))])
            src = np.concatenate([np.arange(pad, pad + sink), np.arange(pad + start, pad + n)])
            index = torch.from_numpy(src).to(k.device)
            self.kv.write(self.kv.rows(b, self.heads[:, None], kept[None, :]), torch.stack([k[b][:, index], v[b][:, index]]))
            middles.append((_host(k[b, :, pad + sink : pad + start]), _host(v[b, :, pad + sink : pad + start])))
        self.stores.build(middles)

    # ------------------------------------------------------------------ decode
    def _settle(self) -> None:
        """Wait for the background job (normally long finished) and retire what it inserted."""
        dirty = self.stores.wait()
        self.book.retire()
        if dirty is not None and self.slots is not None:
            for b, row in enumerate(dirty):
                for h, pages in enumerate(row):
                    self.slots.invalidate(b, h, pages)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query: [B, Hq, n, d] post-RoPE for each sequence's last n positions.
        Returns the attention output [B, n, Hq, d]."""
        stats = StepStats()
        batch, hq, n, d = query.shape
        heads = self.kv.keys.shape[1]
        host_q = np.ascontiguousarray(query.float().cpu().numpy()).reshape(batch, heads, -1, d)  # one copy per layer
        if self.anchor is not None:
            self._gather_anchor_tokens(stats)
        elif self.slots is not None:
            self._load_pages(self._select_pages(host_q, stats), stats)
        else:
            self._select_tokens(host_q, stats)
        t0 = time.perf_counter()
        mask = self._mask(n)
        out = self.kv.attend(query, mask, scaling)
        stats.attend_ms += 1e3 * (time.perf_counter() - t0)
        self.rt.record(stats)
        self._offload_leaving_tokens()
        return out

    def _select_pages(self, host_q: np.ndarray, stats: StepStats) -> tuple[np.ndarray, ...]:
        """icecache: choose pages per (sequence, KV head) and plan the slot copies.
        Returns (pool pages to copy [m], their sequences [m], KV heads [m], slots [m])."""
        t0 = time.perf_counter()
        picks, self.selected = self.stores.select_pages(host_q, self.rt.config.retrieved_pages, self.rt.config.layer_reuse > 1)
        plan = self.slots.plan_batch(picks)
        self.ret_valid[:] = self.slots.valid_rows()
        stats.pages_selected += len(picks.pages)
        stats.pages_hit += len(picks.pages) - len(plan[0])
        stats.select_ms += 1e3 * (time.perf_counter() - t0)
        return plan

    def _load_pages(self, plan: tuple[np.ndarray, ...], stats: StepStats) -> None:
        """One gather from the host pool, one copy, one scatter per tensor for the whole layer."""
        t0 = time.perf_counter()
        pages, bs, hs, slots = plan
        if len(pages):
            rows = self.kv.page_rows(bs, hs, slots, self.rt.config.page_size)
            stats.bytes_loaded += self.kv.load(self.stores.pool, pages, rows)
            stats.pages_loaded += len(pages)
        stats.load_ms += 1e3 * (time.perf_counter() - t0)

    def _select_tokens(self, host_q: np.ndarray, stats: StepStats) -> None:
        """Policies without an index (quest, oracle, streaming): copy the chosen middle tokens."""
        t0 = time.perf_counter()
        publish = self.rt.config.layer_reuse > 1
        self.selected = self.stores.select_tokens(host_q, self.rt.config.retrieved_pages)
        stats.select_ms += 1e3 * (time.perf_counter() - t0)
        self._write_tokens(self.selected, stats)
        if not publish:
            self.selected = None

    def _gather_anchor_tokens(self, stats: StepStats) -> None:
        """IceCache(r): this layer's own K/V of the tokens its anchor layer chose this step."""
        self._write_tokens(self.anchor.selected, stats)

    def _write_tokens(self, tokens: list[list[np.ndarray]], stats: StepStats) -> None:
        t0 = time.perf_counter()
        batch, heads = self.ret_valid.shape[:2]
        for b in range(batch):
            for h in range(heads):
                ids = tokens[b][h][: self.ret_valid.shape[2]]
                self.ret_valid[b, h] = np.arange(self.ret_valid.shape[2]) < len(ids)
                if len(ids):
                    k, v = self.stores.rows(b, h, ids)
                    self.kv.write(self.kv.rows(b, h, self.kv.slot_start + np.arange(len(ids))), torch.from_numpy(np.stack([k, v])))
                    stats.bytes_loaded += k.nbytes + v.nbytes
                stats.pages_selected += -(-len(ids) // self.rt.config.page_size)
                stats.pages_loaded += -(-len(ids) // self.rt.config.page_size)
        stats.load_ms += 1e3 * (time.perf_counter() - t0)

    def _mask(self, n_queries: int) -> np.ndarray:
        """[B, H, n, L] bool: sink rows | valid slot rows | ring rows inside each query's window."""
        batch, heads = self.ret_valid.shape[:2]
        mask = np.empty((batch, heads, n_queries, self.kv.length), bool)
        mask[..., : self.kv.slot_start] = self.book.sink_valid()[:, None, None, :]
        mask[..., self.kv.slot_start : self.kv.ring_start] = self.ret_valid[:, :, None, :]
        mask[..., self.kv.ring_start :] = self.book.ring_valid(n_queries)[:, None]
        return mask

    def _offload_leaving_tokens(self) -> None:
        """Hand the tokens that left every sequence's window to the stores, in the background."""
        spans = self.book.leaving()
        if all(hi <= lo for lo, hi in spans):
            return
        leaving = []
        for b, (lo, hi) in enumerate(spans):
            ring = self.kv.ring_start + self.book.ring_index(np.arange(lo, hi))
            kv = _host(self.kv.read(self.kv.rows(b, self.heads[:, None], ring[None, :])))  # [2, H, m, d]
            leaving.append((kv[0], kv[1]))
        self.stores.insert(leaving)

    # ------------------------------------------------------------------ accounting
    def device_bytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def stored_token_heads(self) -> int:
        return self.stores.stored_token_heads()

    def index_bytes(self) -> int:
        return self.stores.index_bytes()

    def close(self) -> None:
        """Wait for background work and give the stores' host pages back."""
        self.stores.close()


def _host(x: torch.Tensor) -> np.ndarray:
    """A float32 host copy (the stores' format) of a device tensor."""
    return x.float().cpu().numpy().copy()
