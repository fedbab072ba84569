"""Token positions of the resident sink and window of each sequence in one layer (NumPy only).

Positions are a sequence's own token positions (left padding excluded). The window of the query at
position ``pos`` starts at :func:`window_start`; it is stored in a ring of ``window_pages + 1`` page
slots (a page's tokens always share a ring slot), so a page that has left the window can stay
readable until its background insertion is done while the next page fills, and no tensor is ever
concatenated or shifted during decode.
"""

from __future__ import annotations

import numpy as np


def window_start(pos: int, sink_tokens: int, window_pages: int, page_size: int) -> int:
    """First window position for a query at ``pos``: page-aligned, ``window_pages - 1`` whole pages
    before the query's page, never inside the sink."""
    return max(min(sink_tokens, pos), (pos // page_size - (window_pages - 1)) * page_size)


class WindowBook:
    """Per-sequence lengths, sink sizes and window ring of one layer for a batch."""

    def __init__(self, lengths: list[int], sink_tokens: int, window_pages: int, page_size: int) -> None:
        self.sink_tokens, self.window_pages, self.page_size = sink_tokens, window_pages, page_size
        self.length = np.asarray(lengths, np.int64)
        self.sink_len = np.minimum(sink_tokens, self.length)
        self.win_start = np.array([self.start(int(n)) for n in self.length], np.int64)
        self.offloaded_end = self.win_start.copy()  # [sink_len, offloaded_end) is (going) to the stores
        self.pending_end = self.win_start.copy()  # window tokens below this retire at the next settle
        self.ring_pos = np.full((len(lengths), self.ring_tokens), -1, np.int64)

    @property
    def ring_tokens(self) -> int:
        return (self.window_pages + 1) * self.page_size

    def start(self, pos: int) -> int:
        return window_start(pos, self.sink_tokens, self.window_pages, self.page_size)

    def ring_index(self, positions: np.ndarray) -> np.ndarray:
        """Ring row of each position (same shape)."""
        p = self.page_size
        return (positions // p) % (self.window_pages + 1) * p + positions % p

    def place(self, b: int, positions: np.ndarray) -> np.ndarray:
        """Record ``positions`` [n] of sequence b in the ring; returns their ring rows [n].

        Raises RuntimeError if a row is still live (a caller bug: the ring holds every token from
        the window start on, and a decode step may add at most one page of tokens)."""
        rows = self.ring_index(positions)
        old = self.ring_pos[b, rows]
        if ((old >= self.win_start[b]) & (old >= 0)).any():
            raise RuntimeError(f"window ring overflow in sequence {b}: too many tokens added in one step")
        self.ring_pos[b, rows] = positions
        return rows

    def place_next(self, n: int) -> np.ndarray:
        """:meth:`place` of every sequence's next ``n`` positions at once. Returns ring rows [B, n]."""
        positions = self.length[:, None] + np.arange(n)[None, :]
        rows = self.ring_index(positions)
        batch = np.arange(len(self.length))[:, None]
        old = self.ring_pos[batch, rows]
        if ((old >= self.win_start[:, None]) & (old >= 0)).any():
            raise RuntimeError("window ring overflow: too many tokens added in one step")
        self.ring_pos[batch, rows] = positions
        return rows

    def leaving(self) -> list[tuple[int, int]]:
        """Per sequence, the positions [lo, hi) that left the window of the next query; they are
        marked pending (still attended until :meth:`retire`)."""
        out = []
        for b, n in enumerate(self.length.tolist()):
            lo, hi = int(self.offloaded_end[b]), self.start(n)
            out.append((lo, max(lo, hi)))
            if hi > lo:
                self.offloaded_end[b] = self.pending_end[b] = hi
        return out

    def retire(self) -> None:
        """The pending tokens are in the stores now: drop them from the window."""
        self.win_start = self.pending_end.copy()

    def ring_valid(self, n_queries: int) -> np.ndarray:
        """[B, n, ring_tokens] bool: ring rows each of the last ``n_queries`` queries may attend."""
        query_pos = self.length[:, None] - n_queries + np.arange(n_queries)[None, :]  # [B, n]
        pos = self.ring_pos[:, None, :]
        return (pos >= self.win_start[:, None, None]) & (pos <= query_pos[:, :, None])

    def sink_valid(self) -> np.ndarray:
        """[B, sink_tokens] bool."""
        return np.arange(self.sink_tokens)[None, :] < self.sink_len[:, None]
