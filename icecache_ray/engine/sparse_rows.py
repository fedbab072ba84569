"""A sparse (budgeted) layer over rows: sink + page slots + window ring on the device, the rest in
host stores (one per sequence and KV head, in an index service).

Prefill: a sequence's prompt chunks accumulate in a staging buffer (dense causal attention needs
every earlier prompt token); after its last chunk the row keeps only the sink and the window and
the middle tokens go to the stores, built in the background while the model computes.

Decode, for all decoding rows at once: the new tokens go into each row's window ring; **one**
batched selection covers every row and KV head; only pages that are not resident are copied (one
gather, one copy, one scatter for the layer); attention runs over sink | slots | ring with a
boolean mask, one SDPA call for the rows. Tokens leaving a window are inserted into the stores in
the background (off a CPU, copied to pinned memory without a sync: :mod:`~icecache_ray.engine.leaving`)
and stay attended until that insertion is done (the next step), so no token is ever lost or
counted twice.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.attention import prefill_attention
from icecache_ray.engine.device_pages import DevicePages
from icecache_ray.engine.device_quest import DeviceQuest
from icecache_ray.engine.leaving import LeavingTokens
from icecache_ray.engine.resident import ResidentKV
from icecache_ray.engine.slots import SlotTable
from icecache_ray.engine.stats import StepStats
from icecache_ray.engine.transfers import to_host
from icecache_ray.engine.window import RowWindows
from icecache_ray.ragged import EMPTY


class SparseRows:
    """Sparse layer ``layer_idx`` for ``n_rows`` rows (see module docstring). With ``anchor`` set,
    the layer attends over its own K/V of the tokens that layer selected (IceCache(r))."""

    def __init__(self, layer_idx: int, config: IceCacheConfig, windows: RowWindows, heads: int, head_dim: int, dtype, device,
                 stores, anchor: "SparseRows | None", max_seq_len: int, leaving: LeavingTokens) -> None:
        self.layer_idx, self.cfg, self.stores, self.anchor = layer_idx, config, stores, anchor
        self.leaving = leaving  # the runner's, shared by every sparse layer (it flushes after the step)
        p, n_rows = config.page_size, len(windows.length)
        self.windows = windows  # the runner's, shared by every sparse layer (it advances them once per step)
        slot_rows = config.retrieved_pages * p
        self.kv = ResidentKV(n_rows, heads, config.sink_tokens, slot_rows, self.windows.ring_tokens, head_dim, dtype, device)
        self.ret_valid = np.zeros((n_rows, heads, slot_rows), bool)  # valid rows of the slot region (host selector)
        paged = config.policy == "icecache" and anchor is None
        # icecache: whole pages in the first page_slots slots, single tokens (re-read every step) after them
        on_device = config.selector == "device" and anchor is None and config.policy in ("icecache", "quest")
        self.device_pages = DevicePages(config, self.kv, max_seq_len, device) if on_device and paged else None
        self.device_quest = DeviceQuest(config, self.kv, max_seq_len, device) if on_device and not paged else None
        self.slots = SlotTable(n_rows, heads, config.page_slots, p) if paged and not on_device else None
        self.token_start = config.page_slots * p if paged else slot_rows  # first token-slot row of the slot region
        self.seq_of_row: list[str | None] = [None] * n_rows
        self.staging: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> prompt K, V [H, T, d]
        self.publish = config.layer_reuse > 1 and anchor is None  # followers read self.selected
        self.selected: list[list[np.ndarray]] | None = None  # [decode row][H] middle tokens chosen this step
        self.heads = np.arange(heads)

    # ------------------------------------------------------------------ rows
    def release(self, row: int) -> None:
        """The sequence on ``row`` is gone (its stores are released by the runner)."""
        self.windows.clear_row(row)
        if self.slots is not None:
            self.slots.reset_row(row)
        for device_side in (self.device_pages, self.device_quest):
            if device_side is not None:
                device_side.reset_row(row)
        self.ret_valid[row] = False
        self.staging.pop(row, None)
        self.seq_of_row[row] = None

    # ------------------------------------------------------------------ writes
    def update(self, step, key: torch.Tensor, value: torch.Tensor) -> None:
        """key / value: [1, H, N, d] post-RoPE: decode tokens into the rings, prompt chunks into staging."""
        nd = step.n_decode
        if nd:
            self._settle()
            ring = step.t["ring_flat"]  # [n, H] flat K rows of each row's new token (the runner placed them)
            self.kv.write_t(ring, torch.stack([key[0, :, :nd].transpose(0, 1), value[0, :, :nd].transpose(0, 1)]))
        for seg in step.prefill:
            if seg.start == 0:
                self.release(seg.row)
                shape = (key.shape[1], seg.prompt_len, key.shape[3])
                self.staging[seg.row] = (key.new_empty(shape), value.new_empty(shape))
                self.seq_of_row[seg.row] = seg.seq_id
            k, v = self.staging[seg.row]
            k[:, seg.start : seg.end] = key[0, :, seg.offset : seg.offset + seg.n]
            v[:, seg.start : seg.end] = value[0, :, seg.offset : seg.offset + seg.n]

    def _settle(self) -> None:
        """The previous step's builds / inserts are done (normally long since); with the device
        selector their page changes enter the summary now: a change issued at step t lands at t + 1."""
        if self.device_quest is not None:  # its middle lives on the device: nothing in flight
            return
        if self.device_pages is None:
            self.stores.wait()
            return
        changes, reset = self.stores.take_changes()
        row_of = {seq: row for row, seq in enumerate(self.seq_of_row) if seq is not None}
        self.device_pages.apply(changes, reset, row_of, self.stores.pool)

    # ------------------------------------------------------------------ attention
    def attend(self, step, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query: [1, Hq, N, d] post-RoPE. Returns [N, Hq, d]."""
        out = query.new_empty((query.shape[2], query.shape[1], query.shape[3]))
        if step.n_decode:
            out[: step.n_decode] = self._decode(step, query[0, :, : step.n_decode].transpose(0, 1), scaling)
        for seg in step.prefill:
            k, v = self.staging[seg.row]
            q = query[:, :, seg.offset : seg.offset + seg.n]
            o = prefill_attention(q, k[None, :, : seg.end], v[None, :, : seg.end], seg.start, scaling)
            out[seg.offset : seg.offset + seg.n] = o[0].transpose(0, 1)
            if seg.ends_prompt:
                self._finish_prefill(seg.row, seg.seq_id)
        return out

    def load_prefill(self, row: int, seq_id: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """A whole prompt's K/V [H, T, d] computed elsewhere, into ``row`` (as after its last chunk)."""
        self.release(row)
        self.staging[row], self.seq_of_row[row] = (key, value), seq_id
        self._finish_prefill(row, seq_id)

    def _finish_prefill(self, row: int, seq_id: str) -> None:
        """Keep sink + window of the prompt, send the middle to the stores, drop the staging."""
        k, v = self.staging.pop(row)
        total = k.shape[1]
        sink, start, ring = self.windows.begin_row(row, total)
        kept = np.concatenate([np.arange(sink), self.kv.ring_start + ring])
        src = torch.from_numpy(np.concatenate([np.arange(sink), np.arange(start, total)])).to(k.device)
        self.kv.write(self.kv.flat_rows(row, self.heads[:, None], kept[None, :]), torch.stack([k[:, src], v[:, src]]))
        if self.device_quest is not None:
            self.device_quest.load(row, k[:, sink:start], v[:, sink:start])
        elif self.cfg.policy != "streaming":  # streaming never reads the middle
            self.stores.build([(seq_id, _host(k[:, sink:start]), _host(v[:, sink:start]))])

    def _decode(self, step, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query: [n, Hq, d] of the decoding rows. Returns [n, Hq, d]."""
        rows, stats = step.decode_rows, StepStats()
        n, hq, d = query.shape
        seqs = [self.seq_of_row[r] for r in rows.tolist()]
        device_side = self.device_pages or self.device_quest
        if device_side is not None or self.cfg.policy == "streaming":
            kv = self.kv
            mask = step.sparse_mask(kv.heads, kv.sink, kv.slot_rows, kv.ring)
            if device_side is None:  # streaming: sink + window only, nothing to select
                mask[..., kv.slot_start : kv.ring_start] = False
            else:
                q = query.reshape(n, len(self.heads), hq // len(self.heads), d).float()
                device_side.select_and_load(step, q, scaling, mask)
            t0 = time.perf_counter()
            out = self.kv.attend_t(query, mask, step.t["decode_rows"], step.dense, scaling)
            step.stats.attend_ms += 1e3 * (time.perf_counter() - t0)
            self._offload_leaving(step, seqs)
            return out
        host_q = to_host(query).reshape(n, len(self.heads), hq // len(self.heads), d)
        if self.anchor is not None:
            self._write_tokens(rows, seqs, self.anchor.selected, stats, step)
        elif self.slots is not None:
            self._load_pages(self._select_pages(rows, seqs, host_q, stats, step), stats)
        else:
            t0 = time.perf_counter()
            tokens = self.stores.select_tokens(seqs, host_q, self.cfg.retrieved_pages)
            stats.select_ms += 1e3 * (time.perf_counter() - t0)
            self._write_tokens(rows, seqs, tokens, stats, step)
            self.selected = tokens if self.publish else None
        t0 = time.perf_counter()
        slot_mask = torch.from_numpy(self.ret_valid[rows]).to(query.device)
        out = self.kv.attend_t(query, self._mask_t(step, slot_mask), step.t["decode_rows"], step.dense, scaling)
        stats.attend_ms += 1e3 * (time.perf_counter() - t0)
        step.record(stats)
        self._offload_leaving(step, seqs)
        return out

    def _select_pages(self, rows: np.ndarray, seqs: list[str], host_q: np.ndarray, stats: StepStats, step) -> tuple:
        """icecache: one selection request for every (row, KV head), and the slot plan.
        Returns (pool pages to copy [m], their rows [m], KV heads [m], slots [m], then the token
        slots' (pool pages [t], rows in page [t], flat destination rows [2, t]))."""
        t0 = time.perf_counter()
        picks, self.selected = self.stores.select_pages(seqs, host_q, self.cfg.retrieved_pages, self.publish)
        plan = self.slots.plan_rows(rows, picks)
        tokens, token_pages = self._token_plan(rows, picks)
        self.ret_valid[rows, :, : self.token_start] = self.slots.valid_rows(rows)
        per_row = np.diff(picks.page_bounds).reshape(len(rows), -1).sum(axis=1) + token_pages
        loaded = np.bincount(np.searchsorted(rows, plan[1]), minlength=len(rows)) + token_pages
        step.count_pages(per_row, loaded, self.kv_page_bytes)
        stats.pages_selected += len(picks.pages) + int(token_pages.sum())
        stats.pages_loaded += int(token_pages.sum())  # token slots are re-read every step
        stats.pages_hit += len(picks.pages) - len(plan[0])
        stats.select_ms += 1e3 * (time.perf_counter() - t0)
        return plan + tokens

    def _token_plan(self, rows: np.ndarray, picks) -> tuple[tuple, np.ndarray]:
        """Where each item's single tokens go: ((pool pages [t], rows in page [t], flat rows
        [2, t]), token-slot pages used per row [n]); marks the token slots' valid rows."""
        heads = len(self.heads)
        self.ret_valid[rows, :, self.token_start :] = False
        if picks.token_bounds is None or self.token_start == self.ret_valid.shape[2]:
            return (EMPTY, EMPTY, np.zeros((2, 0), np.int64)), np.zeros(len(rows), np.int64)
        counts = np.diff(picks.token_bounds)
        item = np.repeat(np.arange(len(counts)), counts)  # item of each picked token
        slot = np.arange(len(item)) - picks.token_bounds[item]  # its rank inside the item
        row, head = rows[item // heads], item % heads
        self.ret_valid[row, head, self.token_start + slot] = True
        used = (-(-counts.reshape(len(rows), heads) // self.cfg.page_size)).sum(axis=1)
        flat = self.kv.flat_rows(row, head, self.kv.slot_start + self.token_start + slot)
        return (picks.token_pool, picks.token_rows, flat), used

    @property
    def kv_page_bytes(self) -> int:
        return self.kv.page_bytes(self.cfg.page_size)

    def _load_pages(self, plan: tuple, stats: StepStats) -> None:
        """One gather from the host pool, one copy, one scatter for the whole layer: the pages
        missing from their slots, then the single tokens of the token slots."""
        t0 = time.perf_counter()
        pages, prow, heads, slots, token_pool, token_rows, token_flat = plan
        if len(pages) or len(token_pool):
            rows = np.concatenate([self.kv.page_rows(prow, heads, slots, self.cfg.page_size), token_flat.T.reshape(-1)])
            stats.bytes_loaded += self.kv.load(self.stores.pool, pages, rows, token_pool, token_rows)
            stats.pages_loaded += len(pages)
        stats.load_ms += 1e3 * (time.perf_counter() - t0)

    def _write_tokens(self, rows: np.ndarray, seqs: list[str], tokens: list[list[np.ndarray]], stats: StepStats, step) -> None:
        """Token policies and layer reuse: copy the chosen middle tokens' K/V into the slot region."""
        t0 = time.perf_counter()
        width, p = self.ret_valid.shape[2], self.cfg.page_size
        per_row = np.zeros(len(rows), np.int64)
        for i, (row, seq) in enumerate(zip(rows.tolist(), seqs)):
            for h in self.heads.tolist():
                ids = tokens[i][h][:width]
                self.ret_valid[row, h] = np.arange(width) < len(ids)
                if len(ids):
                    k, v = self.stores.rows(seq, h, ids)
                    flat = self.kv.flat_rows(row, h, self.kv.slot_start + np.arange(len(ids)))
                    self.kv.write(flat, torch.from_numpy(np.stack([k, v])))
                    stats.bytes_loaded += k.nbytes + v.nbytes
                per_row[i] += -(-len(ids) // p)
        step.count_pages(per_row, per_row, self.kv_page_bytes)
        stats.pages_selected += int(per_row.sum())
        stats.pages_loaded += int(per_row.sum())
        stats.load_ms += 1e3 * (time.perf_counter() - t0)

    def _mask_t(self, step, slot_mask: torch.Tensor) -> torch.Tensor:
        """[n, H, L] bool (device): sink rows | valid slot rows (``slot_mask`` [n, H, slot_rows]) |
        ring rows inside each row's window (the step's, shared by every sparse layer)."""
        kv = self.kv
        mask = step.sparse_mask(kv.heads, kv.sink, kv.slot_rows, kv.ring)
        mask[..., kv.slot_start : kv.ring_start] = slot_mask
        return mask

    def _offload_leaving(self, step, seqs: list[str]) -> None:
        """Hand the tokens that left each row's window (the step's ``leaving``: decode index, ring
        rows) to the stores, in the background."""
        items = []
        for i, ring in step.leaving:
            flat = self.kv.flat_rows(int(step.decode_rows[i]), self.heads[:, None], self.kv.ring_start + ring[None, :])
            kv = self.kv.read(flat)  # [2, H, m, d]
            if self.device_quest is not None:
                self.device_quest.append(int(step.decode_rows[i]), kv)
            elif self.cfg.policy != "streaming":
                items.append((seqs[i], kv))
        if items:
            self.leaving.hand_over(self.stores, items)

    def device_bytes(self) -> int:
        sides = (self.device_pages, self.device_quest)
        return self.kv.nbytes() + sum(side.nbytes() for side in sides if side is not None)

    @property
    def token_bytes(self) -> int:
        """Device bytes of one token's K and V in this layer (what prefill staging holds per token)."""
        return 2 * self.kv.heads * self.kv.kv.shape[-1] * self.kv.kv.element_size()


def _host(x: torch.Tensor) -> np.ndarray:
    """A float32 host copy (the stores' format) of a device tensor (prefill: not a decode step)."""
    return to_host(x, count=False)
