"""The device-resident K/V of one sparse layer: one static buffer for every row, three regions.

``kv``: [2, R, H, L, d] (K at 0, V at 1; R rows, one per running sequence) with L = sink | retrieved slots (R pages of P rows) |
window ring. Nothing is concatenated or reallocated during decode: every write (new tokens, pages
copied into slots) is one ``index_copy_`` of K and V together into the flat row view, and a
boolean mask says which rows each query attends (keys are post-RoPE, so row order is irrelevant
to attention). Decode steps are dominated by per-op overhead at this size, so each operation
touches K and V at once and row arithmetic is done in NumPy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from icecache_ray.kernels.bulk_copy import make_copier


class ResidentKV:
    """Static device K/V of one layer for all rows (see module docstring)."""

    def __init__(self, n_rows: int, heads: int, sink: int, slot_rows: int, ring: int, head_dim: int, dtype, device) -> None:
        self.sink, self.slot_rows, self.ring = sink, slot_rows, ring
        self.batch, self.heads, self.length = n_rows, heads, sink + slot_rows + ring
        self.kv = torch.zeros((2, n_rows, heads, self.length, head_dim), dtype=dtype, device=device)
        self.flat = self.kv.view(-1, head_dim)  # row ((t * R + r) * H + h) * L + l
        self._copier = None  # made on first load (needs the pool's page shape)

    @property
    def keys(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def values(self) -> torch.Tensor:
        return self.kv[1]

    @property
    def slot_start(self) -> int:
        return self.sink

    @property
    def ring_start(self) -> int:
        return self.sink + self.slot_rows

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of ``page_size`` tokens of one KV head, K and V, in this buffer's dtype."""
        return 2 * page_size * self.kv.shape[-1] * self.kv.element_size()

    def flat_rows(self, b: np.ndarray, h: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Flat rows [2, ...] (K rows then V rows) of buffer positions ``pos`` of (b, h); the
        three arrays broadcast together."""
        base = (b * self.heads + h) * self.length + pos
        return np.stack([base, base + self.batch * self.heads * self.length])

    def write(self, rows: np.ndarray, kv: torch.Tensor) -> None:
        """``kv``: [2, ...rows.shape[1:], d] (K, V) into flat ``rows`` [2, ...]."""
        index = torch.from_numpy(np.ascontiguousarray(rows).reshape(-1)).to(self.kv.device)
        # ``kv`` may be a host tensor (rows gathered from the pool) while the buffer is on the GPU.
        self.flat.index_copy_(0, index, kv.reshape(-1, kv.shape[-1]).to(self.flat.device, self.flat.dtype))

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """[2, ...rows.shape[1:], d] (K, V) of flat ``rows`` [2, ...]."""
        index = torch.from_numpy(np.ascontiguousarray(rows).reshape(-1)).to(self.kv.device)
        return self.flat.index_select(0, index).view(*rows.shape, self.flat.shape[1])

    def page_rows(self, b: np.ndarray, h: np.ndarray, slots: np.ndarray, page_size: int) -> np.ndarray:
        """Flat rows of whole slots in the order of a pool gather [m, 2, P]: int64 [m * 2 * P]."""
        pos = self.slot_start + slots[:, None] * page_size + np.arange(page_size)[None, :]  # [m, P]
        rows = self.flat_rows(b[:, None], h[:, None], pos)  # [2, m, P]
        return rows.transpose(1, 0, 2).reshape(-1)

    def load(self, pool, pages: np.ndarray, rows: np.ndarray, token_pages: np.ndarray, token_rows: np.ndarray) -> int:
        """Copy pool pages [m] and single tokens (row ``token_rows[i]`` of page ``token_pages[i]``,
        [t]) into ``rows`` [m * 2 * P + 2 * t] (:meth:`page_rows`, then each token's K and V row):
        one gather, one copy to the device (asynchronous from pinned memory with CuPy on CUDA),
        one scatter. Returns bytes moved."""
        if self._copier is None:
            self._copier = make_copier(self.kv.device, pool.layout.page_shape, pool.layout.dtype, self.kv.dtype)
        index = torch.from_numpy(np.ascontiguousarray(rows, np.int64)).to(self.kv.device)
        return self._copier.copy(pool, pages, index, self.flat, token_pages, token_rows)

    def flat_base(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, H] flat K row of position 0 of each (row, KV head) (V rows follow :attr:`v_offset` later)."""
        heads = torch.arange(self.heads, device=rows.device)
        return (rows[:, None] * self.heads + heads[None, :]) * self.length

    @property
    def v_offset(self) -> int:
        return self.batch * self.heads * self.length

    def write_t(self, rows: torch.Tensor, kv: torch.Tensor) -> None:
        """``kv`` [2, ...rows.shape, d] (K, V) into flat K rows ``rows`` (device tensor, any shape)."""
        index = torch.cat([rows.reshape(-1), rows.reshape(-1) + self.v_offset])
        self.flat.index_copy_(0, index, kv.reshape(-1, kv.shape[-1]).to(self.flat.dtype))

    def rows_view(self, rows: torch.Tensor, span) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, H, L, d] of buffer ``rows`` [n]: a view when the step's decode rows are
        consecutive (``span``: the step's :class:`~icecache_ray.engine.row_cache.DenseSpan`)."""
        if span.n_rows == rows.shape[0]:
            return self.kv[0, span.lo : span.lo + span.n_rows], self.kv[1, span.lo : span.lo + span.n_rows]
        return self.kv[0].index_select(0, rows), self.kv[1].index_select(0, rows)

    def attend_t(self, query: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, span, scaling: float) -> torch.Tensor:
        """:meth:`attend` with a device mask [n, H, L] and device rows [n]. Returns [n, Hq, d]."""
        n, hq, d = query.shape
        k, v = self.rows_view(rows, span)
        q = query.reshape(n, self.heads, hq // self.heads, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, None, :], scale=scaling).reshape(n, hq, d)

    def attend(self, query: torch.Tensor, mask: np.ndarray, rows: np.ndarray, scaling: float) -> torch.Tensor:
        """Decode attention of one query per row. query: [n, Hq, d]; mask: [n, H, L] bool (True =
        attend); rows: [n] buffer rows. Returns [n, Hq, d].

        The query heads of a KV head are folded into the query axis ([n, H, g, d]), so the K/V are
        never repeated per query head; consecutive rows are read in place (no gather)."""
        n, hq, d = query.shape
        q = query.reshape(n, self.heads, hq // self.heads, d)
        first = int(rows[0]) if n else 0
        if n and np.array_equal(rows, np.arange(first, first + n)):
            k, v = self.kv[0, first : first + n], self.kv[1, first : first + n]
        else:
            index = torch.from_numpy(np.ascontiguousarray(rows)).to(self.kv.device)
            k, v = self.kv[0].index_select(0, index), self.kv[1].index_select(0, index)
        m = torch.from_numpy(mask[:, :, None, :]).to(query.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)
        return out.reshape(n, hq, d)
