"""The runner's cache: one row-indexed layer per model layer, and the layout of the current step.

:class:`StepLayout` turns a :class:`~icecache_ray.engine.plan.StepPlan` into what the layers need
(python ints for the loops, index tensors for the vectorised writes) once per step, and collects
the step's counters. :class:`RowCache` is what the decoder layers see as their cache: ``update``
writes a layer's new K/V into its rows, and the registered attention function
(:func:`~icecache_ray.engine.attention.row_attention`) asks :meth:`RowCache.attend` for the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from icecache_ray.engine.plan import StepPlan
from icecache_ray.engine.stats import StepStats


@dataclass(frozen=True)
class Chunk:
    """A prefill segment: ``n`` prompt tokens of ``seq_id`` on ``row`` at positions ``start ..
    end - 1``, at ``offset`` on the step's token axis."""

    seq_id: str
    row: int
    start: int
    n: int
    offset: int
    prompt_len: int

    @property
    def end(self) -> int:
        return self.start + self.n

    @property
    def ends_prompt(self) -> bool:
        return self.end == self.prompt_len


@dataclass(frozen=True)
class DenseSpan:
    """The decode rows of a step as dense layers attend them: buffer rows ``lo .. lo + n_rows - 1``
    (every decode row lies in them), ``index`` [n] (device) each decode row's place in the span,
    ``mask`` [n_rows, 1, 1, length] (device) the positions each span row attends: its prefix for a
    decode row, position 0 alone for a row that is not decoding (its output is dropped)."""

    lo: int
    n_rows: int
    length: int
    index: torch.Tensor
    mask: torch.Tensor


def upload(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    """Integer arrays to the device in ONE copy (pinned + non-blocking on CUDA). Returns views."""
    flat = np.concatenate([np.asarray(a, np.int64).reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.int64)
    host = torch.from_numpy(flat)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    out, at = [], 0
    for a in arrays:
        out.append(dev[at : at + a.size].view(a.shape))
        at += a.size
    return out


class StepLayout:
    """A step as the layers use it (see module docstring). Every per-step index tensor the layers
    read is uploaded here, once, in one copy; layers build nothing from NumPy."""

    def __init__(self, plan: StepPlan, device, extra: dict[str, np.ndarray] | None = None) -> None:
        self.plan = plan
        nd = self.n_decode = plan.n_decode
        self.decode_rows = plan.rows[:nd].astype(np.int64)
        offsets = plan.offsets.tolist()
        self.prefill = [Chunk(plan.seq_ids[i], int(plan.rows[i]), int(plan.starts[i]), int(plan.lengths[i]), offsets[i],
                              int(plan.prompt_lens[i])) for i in plan.prefill_segments]
        lo = int(self.decode_rows.min()) if nd else 0
        span_rows = int(self.decode_rows.max()) - lo + 1 if nd else 0
        span_pos = np.zeros(span_rows, np.int64)  # a row that is not decoding attends position 0 only
        span_pos[self.decode_rows - lo] = plan.starts[:nd]
        names = {"positions": plan.positions, "emit": plan.emit_tokens, "decode_rows": self.decode_rows,
                 "decode_pos": plan.starts[:nd].astype(np.int64), "span_index": self.decode_rows - lo, "span_pos": span_pos,
                 **(extra or {})}
        self.t = dict(zip(names, upload(list(names.values()), device)))
        self.decode_rows_t, self.decode_pos_t = self.t["decode_rows"], self.t["decode_pos"]
        self.dense = None
        if nd:
            length = int(plan.starts[:nd].max()) + 1
            mask = torch.arange(length, device=device)[None, :] <= self.t["span_pos"][:, None]
            self.dense = DenseSpan(lo, span_rows, length, self.t["span_index"], mask[:, None, None, :])
        self.stats = StepStats()
        self.pages_selected = np.zeros(nd, np.int64)  # per decode row, this sequence's own
        self.pages_loaded = np.zeros(nd, np.int64)
        self.bytes_loaded = np.zeros(nd, np.int64)
        self.device_counts: torch.Tensor | None = None  # [2, n] selected / loaded, device selector
        self.page_bytes = 0
        self.leaving: list[tuple[int, np.ndarray]] = []  # (decode index, ring rows) leaving the window
        self.dense_zero: list[tuple[int, int, int]] = []  # (row, from, to) dense positions to zero first
        self._sparse_mask: torch.Tensor | None = None

    def sparse_mask(self, heads: int, sink: int, slot_rows: int, ring: int) -> torch.Tensor:
        """[n, H, sink + slot_rows + ring] bool (device), the sparse layers' attention mask: sink
        and window parts filled once per step; each layer writes its slot part before it attends
        (layers run one after the other, so one buffer serves them all)."""
        if self._sparse_mask is None:
            mask = torch.zeros((self.n_decode, heads, sink + slot_rows + ring), dtype=torch.bool, device=self.t["sink_valid"].device)
            mask[..., :sink] = self.t["sink_valid"].bool()[:, None, :]
            mask[..., sink + slot_rows :] = self.t["ring_valid"].bool()[:, None, :]
            self._sparse_mask = mask
        return self._sparse_mask

    def add_device_counts(self, selected: torch.Tensor, loaded: torch.Tensor, page_bytes: int = 0) -> None:
        """Pages one layer selected / loaded per decode row [n], as device tensors (summed on the
        device; they reach the host with the step's sampled ids)."""
        both = torch.stack([selected, loaded]).long()
        self.device_counts = both if self.device_counts is None else self.device_counts + both
        self.page_bytes = page_bytes or self.page_bytes

    def record(self, stats: StepStats) -> None:
        self.stats.add(stats)

    def count_pages(self, selected: np.ndarray, loaded: np.ndarray, page_bytes: int) -> None:
        """Pages one layer selected / loaded for each decode row [n]."""
        self.pages_selected += selected
        self.pages_loaded += loaded
        self.bytes_loaded += loaded * page_bytes

    def counters(self) -> dict:
        """The step's counters, small enough to travel with a stage's answer."""
        out = {"stats": self.stats, "pages_selected": self.pages_selected, "pages_loaded": self.pages_loaded,
               "bytes_loaded": self.bytes_loaded}
        if self.device_counts is not None:
            out |= {"device_counts": self.device_counts, "page_bytes": self.page_bytes}
        return out


class RowCache:
    """Row-indexed layers of the layers a runner serves (``None`` for the others)."""

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.step: StepLayout | None = None

    def begin(self, step: StepLayout) -> None:
        self.step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by a decoder layer's attention with the step's new K/V [1, H, N, d] (post-RoPE)."""
        self.layers[layer_idx].update(self.step, key_states, value_states)
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query: [1, Hq, N, d]. Returns [N, Hq, d]."""
        return self.layers[layer_idx].attend(self.step, query, scaling)

    def release(self, row: int) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.release(row)

    def device_bytes(self) -> int:
        return sum(layer.device_bytes() for layer in self.layers if layer is not None)
