"""Token positions of the resident sink and window of every row of one sparse layer (NumPy only).

Positions are a sequence's own token positions. The window of the query at position ``pos``
starts at :func:`window_start`; it is stored in a ring of ``window_pages + 1`` page slots (a
page's tokens always share a ring slot), so a page that has left the window stays readable until
its background insertion into the stores is done while the next page fills, and no tensor is ever
concatenated or shifted during decode. Every method takes the rows it concerns (``rows`` [n]), so
rows of other sequences are never touched.
"""

from __future__ import annotations

import numpy as np


def window_start(pos: int, sink_tokens: int, window_pages: int, page_size: int) -> int:
    """First window position for a query at ``pos``: page-aligned, ``window_pages - 1`` whole pages
    before the query's page, never inside the sink."""
    return max(min(sink_tokens, pos), (pos // page_size - (window_pages - 1)) * page_size)


class RowWindows:
    """Per-row lengths, sink sizes and window rings of one sparse layer (``n_rows`` rows)."""

    def __init__(self, n_rows: int, sink_tokens: int, window_pages: int, page_size: int) -> None:
        self.sink_tokens, self.window_pages, self.page_size = sink_tokens, window_pages, page_size
        self.length = np.zeros(n_rows, np.int64)
        self.sink_len = np.zeros(n_rows, np.int64)
        self.win_start = np.zeros(n_rows, np.int64)
        self.offloaded_end = np.zeros(n_rows, np.int64)  # [sink_len, offloaded_end) is (going) to the stores
        self.pending_end = np.zeros(n_rows, np.int64)  # window tokens below this retire at the next settle
        self.ring_pos = np.full((n_rows, self.ring_tokens), -1, np.int64)

    @property
    def ring_tokens(self) -> int:
        return (self.window_pages + 1) * self.page_size

    def start(self, pos: int) -> int:
        return window_start(pos, self.sink_tokens, self.window_pages, self.page_size)

    def ring_index(self, positions: np.ndarray) -> np.ndarray:
        """Ring row of each position (same shape)."""
        p = self.page_size
        return (positions // p) % (self.window_pages + 1) * p + positions % p

    def begin_row(self, row: int, length: int) -> tuple[int, int, np.ndarray]:
        """A finished prompt of ``length`` tokens takes ``row``: returns (sink length, window
        start, ring rows of the window positions ``win_start .. length - 1``)."""
        start = self.start(length)
        self.length[row], self.sink_len[row] = length, min(self.sink_tokens, length)
        self.win_start[row] = self.offloaded_end[row] = self.pending_end[row] = start
        self.ring_pos[row] = -1
        positions = np.arange(start, length)
        ring = self.ring_index(positions)
        self.ring_pos[row, ring] = positions
        return int(self.sink_len[row]), start, ring

    def clear_row(self, row: int) -> None:
        self.length[row] = self.sink_len[row] = self.win_start[row] = self.offloaded_end[row] = self.pending_end[row] = 0
        self.ring_pos[row] = -1

    def place_next(self, rows: np.ndarray) -> np.ndarray:
        """Place the next token of each row in its ring and count it. Returns ring rows [n].

        Raises RuntimeError if a ring row is still live (a caller bug: the ring holds every token
        from the window start on)."""
        positions = self.length[rows]
        ring = self.ring_index(positions)
        old = self.ring_pos[rows, ring]
        if ((old >= self.win_start[rows]) & (old >= 0)).any():
            raise RuntimeError("window ring overflow: a token was added before the previous page retired")
        self.ring_pos[rows, ring] = positions
        self.length[rows] += 1
        return ring

    def leaving(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """Per row, the positions [lo, hi) that left the window of its next query; they are marked
        pending (still attended until :meth:`retire`)."""
        out = []
        for r in rows.tolist():
            lo, hi = int(self.offloaded_end[r]), self.start(int(self.length[r]))
            out.append((lo, max(lo, hi)))
            if hi > lo:
                self.offloaded_end[r] = self.pending_end[r] = hi
        return out

    def retire(self, rows: np.ndarray) -> None:
        """The pending tokens of these rows are in the stores now: drop them from the windows."""
        self.win_start[rows] = self.pending_end[rows]

    def ring_valid(self, rows: np.ndarray) -> np.ndarray:
        """[n, ring_tokens] bool: ring rows the latest query of each row may attend."""
        pos = self.ring_pos[rows]
        return (pos >= self.win_start[rows, None]) & (pos <= self.length[rows, None] - 1)

    def sink_valid(self, rows: np.ndarray) -> np.ndarray:
        """[n, sink_tokens] bool."""
        return np.arange(self.sink_tokens)[None, :] < self.sink_len[rows, None]
