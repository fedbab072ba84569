"""The device-resident K/V of one sparse layer: one static buffer per layer, three regions.

``keys`` / ``values``: [B, H, L, d] with L = sink | retrieved slots (R pages of P rows) | window
ring. Nothing is concatenated or reallocated during decode: pages are copied into slot rows with
one ``index_copy_`` per tensor, new tokens are written into ring rows, and a boolean mask says
which rows each query attends (keys are post-RoPE, so row order is irrelevant to attention).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from icecache_ray.kernels.bulk_copy import make_copier


class ResidentKV:
    """Static device K/V of one layer for a batch (see module docstring)."""

    def __init__(self, batch: int, heads: int, sink: int, slot_rows: int, ring: int, head_dim: int, dtype, device) -> None:
        self.sink, self.slot_rows, self.ring = sink, slot_rows, ring
        self.length = sink + slot_rows + ring
        shape = (batch, heads, self.length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._copier = None  # made on first load (needs the pool's page shape)

    @property
    def slot_start(self) -> int:
        return self.sink

    @property
    def ring_start(self) -> int:
        return self.sink + self.slot_rows

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def write(self, b: int, rows: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows ``rows`` [n] (buffer positions) of sequence b get k, v [H, n, d]."""
        index = torch.as_tensor(rows, device=self.keys.device)
        self.keys[b].index_copy_(1, index, k.to(self.keys.dtype))
        self.values[b].index_copy_(1, index, v.to(self.values.dtype))

    def write_head(self, b: int, h: int, rows: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows ``rows`` [n] of (sequence b, KV head h) get k, v [n, d]."""
        index = torch.as_tensor(rows, device=self.keys.device)
        self.keys[b, h].index_copy_(0, index, k.to(self.keys.device, self.keys.dtype))
        self.values[b, h].index_copy_(0, index, v.to(self.values.device, self.values.dtype))

    def read(self, b: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [H, n, d] of buffer rows ``rows`` of sequence b."""
        index = torch.as_tensor(rows, device=self.keys.device)
        return self.keys[b].index_select(1, index), self.values[b].index_select(1, index)

    def page_rows(self, b: np.ndarray, h: np.ndarray, slots: np.ndarray, page_size: int) -> torch.Tensor:
        """Flat row ids (into ``keys.view(-1, d)``) of whole slots: [m * page_size] int64."""
        heads = self.keys.shape[1]
        base = ((b * heads + h) * self.length + self.slot_start + slots * page_size)[:, None]
        return torch.from_numpy((base + np.arange(page_size)[None, :]).reshape(-1)).to(self.keys.device)

    def load(self, pool, pages: np.ndarray, rows: torch.Tensor) -> int:
        """Copy pool pages [m] into flat slot ``rows`` [m * P]: one gather, one copy to the device
        (asynchronous from pinned memory with CuPy on CUDA), one scatter per tensor.
        Returns bytes moved."""
        if self._copier is None:
            self._copier = make_copier(self.keys.device, pool.layout.page_shape)
        return self._copier.copy(pool, pages, rows, self.keys, self.values)

    def attend(self, query: torch.Tensor, mask: np.ndarray, scaling: float) -> torch.Tensor:
        """query: [B, Hq, n, d]; mask: [B, H, n, L] bool (True = attend). Returns [B, n, Hq, d].

        The query heads of a KV head are folded into the query axis ([B, H, g * n, d]), so the
        K/V are never repeated per query head."""
        b, hq, n, d = query.shape
        h = self.keys.shape[1]
        g = hq // h
        q = query.reshape(b, h, g * n, d)
        m = torch.from_numpy(mask).to(query.device)
        m = m[:, :, None].expand(b, h, g, n, self.length).reshape(b, h, g * n, self.length)
        out = F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=m, scale=scaling)
        return out.reshape(b, hq, n, d).transpose(1, 2)
