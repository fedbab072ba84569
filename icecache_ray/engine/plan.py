"""What one forward pass computes: the packed, ragged layout of a step (NumPy only).

A step runs every scheduled segment at once: the decode token of each running sequence and prompt
chunks of newcomers, concatenated along one token axis (no padding). Segment ``i`` is
``lengths[i]`` tokens of the sequence ``seq_ids[i]`` on device row ``rows[i]``, at positions
``starts[i] .. starts[i] + lengths[i] - 1``. The first ``n_decode`` segments are decode tokens (one
each, rows ascending); the rest are prefill chunks. A segment *emits* (produces next-token logits)
when it is a decode token or the chunk that ends its prompt. The same plan goes to every pipeline
stage of a replica; it holds ids and small integers only, so it is cheap to ship to an actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StepPlan:
    """The layout of one step (see module docstring). ``released``: (sequence id, row) pairs that
    finished since the previous step; stages free their state before running this one."""

    seq_ids: tuple[str, ...]
    rows: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    prompt_lens: np.ndarray
    n_decode: int
    released: tuple[tuple[str, int], ...] = field(default=())

    @staticmethod
    def build(segments: list[tuple[str, int, int, int, int]], n_decode: int, released=()) -> "StepPlan":
        """From ``(seq_id, row, start, length, prompt_len)`` tuples, decode segments first."""
        col = list(zip(*segments)) if segments else [(), (), (), (), ()]
        ints = [np.asarray(c, np.int64) for c in col[1:]]
        return StepPlan(tuple(col[0]), *ints, n_decode=n_decode, released=tuple(released))

    @property
    def n_segments(self) -> int:
        return len(self.seq_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def offsets(self) -> np.ndarray:
        """[S + 1] start of each segment on the token axis (and the total)."""
        out = np.zeros(self.n_segments + 1, np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    @property
    def positions(self) -> np.ndarray:
        """[N] position of every token of the step."""
        if not self.n_segments:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts.tolist(), self.lengths.tolist())])

    @property
    def decode_rows(self) -> np.ndarray:
        return self.rows[: self.n_decode]

    @property
    def prefill_segments(self) -> range:
        return range(self.n_decode, self.n_segments)

    @property
    def ends_prompt(self) -> np.ndarray:
        """[S] bool: a prefill chunk whose last token is the prompt's last."""
        out = self.starts + self.lengths == self.prompt_lens
        out[: self.n_decode] = False
        return out

    @property
    def emits(self) -> np.ndarray:
        """[S] bool: the segment's last token yields next-token logits."""
        out = self.ends_prompt
        out[: self.n_decode] = True
        return out

    @property
    def emit_tokens(self) -> np.ndarray:
        """Token-axis index of the last token of every emitting segment (in segment order)."""
        return self.offsets[1:][self.emits] - 1
