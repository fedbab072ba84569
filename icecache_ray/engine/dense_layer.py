"""Dense (full-attention) cache layer that appends in place instead of re-concatenating.

transformers' ``DynamicLayer`` runs ``torch.cat([keys, new])`` every decode step, copying the whole
history: at 8k tokens that is ~12 MB per layer per token for SmolLM2, more than the attention
itself reads. :class:`GrowingLayer` keeps K/V in a buffer with spare room (grown geometrically)
and hands out views of its first ``seq_len`` rows, so a step writes only the new rows. Attention
over a view gives the same result as over a contiguous copy (same values, same order).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

GROWTH = 1.5  # capacity factor when the room runs out


def spare_rows(used: int) -> int:
    """Room left after ``used`` rows when a buffer is (re)made: ~3 % (at least 64 rows), so a
    generation after a long prompt rarely reallocates and a short one wastes little."""
    return max(64, used // 32)


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` with in-place appends (see module docstring). ``keys`` / ``values`` are
    [B, H, seq_len, d] views of ``[B, H, capacity, d]`` buffers; any inherited method that
    replaces them (crop, reorder, batch selection) is honoured: the next update re-seats the
    buffer from whatever ``keys`` / ``values`` then hold."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states: [B, H, n, d]. Returns the layer's K/V [B, H, seq_len, d] (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self._used_rows(key_states, value_states)
        n = key_states.shape[-2]
        if used + n > self._k.shape[-2]:
            self._reallocate(used, max(used + n + spare_rows(used + n), int(self._k.shape[-2] * GROWTH)))
        self._k[:, :, used : used + n] = key_states
        self._v[:, :, used : used + n] = value_states
        self.keys, self.values = self._k[:, :, : used + n], self._v[:, :, : used + n]
        return self.keys, self.values

    def _used_rows(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """Rows of the buffer in use; re-seats the buffer if ``keys`` / ``values`` are not (any
        more) prefix views of it (first call, or an inherited method replaced the tensors)."""
        if _is_prefix_view(self.keys, self._k) and _is_prefix_view(self.values, self._v):
            return self.keys.shape[-2]
        if self.keys.dim() != 4 or self.keys.shape[-2] == 0:  # nothing cached yet
            self._k = key_states[:, :, :0]
            self._v = value_states[:, :, :0]
        else:
            self._k, self._v = self.keys, self.values
        used = self._k.shape[-2]
        need = used + key_states.shape[-2]
        self._reallocate(used, need + spare_rows(need))
        return used

    def _reallocate(self, used: int, capacity: int) -> None:
        """New [B, H, capacity, d] buffers holding the first ``used`` rows of the current ones."""
        k = self._k.new_empty(self._k.shape[:2] + (capacity, self._k.shape[-1]))
        v = self._v.new_empty(self._v.shape[:2] + (capacity, self._v.shape[-1]))
        k[:, :, :used] = self._k[:, :, :used]
        v[:, :, :used] = self._v[:, :, :used]
        self._k, self._v = k, v

    def device_bytes(self) -> int:
        """Bytes the layer holds on its device: the whole buffers, spare room included."""
        if self._k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._k, self._v))

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None


def _is_prefix_view(t: torch.Tensor, buf: torch.Tensor | None) -> bool:
    """Whether ``t`` is ``buf[:, :, :n]`` for some n (same storage start, strides, B, H, d)."""
    return (
        buf is not None and t is not None and t.dim() == 4 and t.data_ptr() == buf.data_ptr()
        and t.stride() == buf.stride() and t.shape[:2] == buf.shape[:2] and t.shape[-1] == buf.shape[-1]
    )
