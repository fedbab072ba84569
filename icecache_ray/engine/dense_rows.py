"""A dense (full-attention) layer over rows: K/V buffers ``[R, H, max_seq_len, d]`` allocated once.

A row's tokens sit at their positions, so a row's length is simply the position of its latest
token + 1 and nothing is ever concatenated: a step writes only its new tokens. Decode tokens
attend over their row's prefix (one call per row, on a view: no copy, no padding); a prompt chunk
attends causally over its row's earlier tokens and itself.
"""

from __future__ import annotations

import torch

from icecache_ray.engine.attention import decode_attention, prefill_attention


class DenseRows:
    """Full K/V of every row of one layer (see module docstring)."""

    def __init__(self, n_rows: int, heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        # empty, not zeros: rows are only read below their lengths, and untouched memory is never committed
        self.k = torch.empty((n_rows, heads, max_seq_len, head_dim), dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def update(self, step, key: torch.Tensor, value: torch.Tensor) -> None:
        """key / value: [1, H, N, d] of the step's tokens, written at their rows and positions."""
        nd = step.n_decode
        if nd:
            self.k[step.decode_rows_t, :, step.decode_pos_t] = key[0, :, :nd].transpose(0, 1)
            self.v[step.decode_rows_t, :, step.decode_pos_t] = value[0, :, :nd].transpose(0, 1)
        for seg in step.prefill:
            self.k[seg.row, :, seg.start : seg.end] = key[0, :, seg.offset : seg.offset + seg.n]
            self.v[seg.row, :, seg.start : seg.end] = value[0, :, seg.offset : seg.offset + seg.n]

    def attend(self, step, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query: [1, Hq, N, d]. Returns [N, Hq, d]."""
        out = query.new_empty((query.shape[2], query.shape[1], query.shape[3]))
        for i, (row, pos) in enumerate(step.decodes):
            out[i] = decode_attention(query[0, :, i], self.k[row, :, : pos + 1], self.v[row, :, : pos + 1], scaling)
        for seg in step.prefill:
            q = query[:, :, seg.offset : seg.offset + seg.n]
            k, v = self.k[seg.row : seg.row + 1, :, : seg.end], self.v[seg.row : seg.row + 1, :, : seg.end]
            out[seg.offset : seg.offset + seg.n] = prefill_attention(q, k, v, seg.start, scaling)[0].transpose(0, 1)
        return out

    def load_prefill(self, row: int, seq_id: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """A whole prompt's K/V [H, T, d] computed elsewhere, into ``row``."""
        self.k[row, :, : key.shape[1]] = key
        self.v[row, :, : value.shape[1]] = value

    def release(self, row: int) -> None:
        """Nothing to free: the next sequence on ``row`` overwrites it from position 0."""

    def device_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
