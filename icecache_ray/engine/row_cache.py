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


class StepLayout:
    """A step as the layers use it (see module docstring)."""

    def __init__(self, plan: StepPlan, device) -> None:
        self.plan = plan
        nd = self.n_decode = plan.n_decode
        self.decode_rows = plan.rows[:nd].astype(np.int64)
        self.decodes = list(zip(self.decode_rows.tolist(), plan.starts[:nd].tolist()))  # (row, position)
        self.decode_rows_t = torch.from_numpy(self.decode_rows).to(device)
        self.decode_pos_t = torch.from_numpy(plan.starts[:nd].astype(np.int64)).to(device)
        offsets = plan.offsets.tolist()
        self.prefill = [Chunk(plan.seq_ids[i], int(plan.rows[i]), int(plan.starts[i]), int(plan.lengths[i]), offsets[i],
                              int(plan.prompt_lens[i])) for i in plan.prefill_segments]
        self.stats = StepStats()
        self.pages_selected = np.zeros(nd, np.int64)  # per decode row, this sequence's own
        self.pages_loaded = np.zeros(nd, np.int64)
        self.bytes_loaded = np.zeros(nd, np.int64)

    def record(self, stats: StepStats) -> None:
        self.stats.add(stats)

    def count_pages(self, selected: np.ndarray, loaded: np.ndarray, page_bytes: int) -> None:
        """Pages one layer selected / loaded for each decode row [n]."""
        self.pages_selected += selected
        self.pages_loaded += loaded
        self.bytes_loaded += loaded * page_bytes

    def counters(self) -> dict:
        """The step's counters, small enough to travel with a stage's answer."""
        return {"stats": self.stats, "pages_selected": self.pages_selected, "pages_loaded": self.pages_loaded,
                "bytes_loaded": self.bytes_loaded}


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
