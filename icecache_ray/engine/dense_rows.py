"""A dense (full-attention) layer over rows: K/V buffers ``[R, H, max_seq_len, d]`` allocated once.

A row's tokens sit at their positions, so a row's length is simply the position of its latest
token + 1 and nothing is ever concatenated: a step writes only its new tokens. All decode tokens
of a step attend in **one** call over a view of the rows they span (a length mask made once per
step hides other rows' tails and rows that are not decoding); a prompt chunk attends causally over
its row's earlier tokens and itself.
"""

from __future__ import annotations

import torch

from icecache_ray.engine.attention import prefill_attention


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
        if step.n_decode:
            for row, lo, hi in step.dense_zero:  # never-written memory may hold NaN, which a 0 weight keeps
                self.k[row, :, lo:hi] = 0
                self.v[row, :, lo:hi] = 0
            out[: step.n_decode] = self._decode(step.dense, query[0, :, : step.n_decode].transpose(0, 1), scaling)
        for seg in step.prefill:
            q = query[:, :, seg.offset : seg.offset + seg.n]
            k, v = self.k[seg.row : seg.row + 1, :, : seg.end], self.v[seg.row : seg.row + 1, :, : seg.end]
            out[seg.offset : seg.offset + seg.n] = prefill_attention(q, k, v, seg.start, scaling)[0].transpose(0, 1)
        return out

    def _decode(self, span, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One SDPA call for every decode row. query: [n, Hq, d]; ``span`` (:class:`DenseSpan`):
        the rows ``lo .. lo + R - 1`` the decode rows lie in, where each decode row sits in that
        span and its length mask. Returns [n, Hq, d]."""
        n, hq, d = query.shape
        heads = self.k.shape[1]
        q = query.new_zeros((span.n_rows, heads, hq // heads, d))
        q[span.index] = query.reshape(n, heads, hq // heads, d)
        k, v = self.k[span.lo : span.lo + span.n_rows, :, : span.length], self.v[span.lo : span.lo + span.n_rows, :, : span.length]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=span.mask, scale=scaling)
        return out[span.index].reshape(n, hq, d)

    def load_prefill(self, row: int, seq_id: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """A whole prompt's K/V [H, T, d] computed elsewhere, into ``row``."""
        self.k[row, :, : key.shape[1]] = key
        self.v[row, :, : value.shape[1]] = value

    def release(self, row: int) -> None:
        """Nothing to free: the next sequence on ``row`` overwrites it from position 0."""

    def device_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
