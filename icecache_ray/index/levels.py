"""Deterministic promotion schedule of the M-DCI hierarchy (no randomness, no state).

Indexed token number ``i`` (0-based, in insertion order) is a level-1 node (a cluster centre)
when ``i % promote_every == 0``; with ``j = i // promote_every``, it reaches level ``1 + v(j)``
where ``v(j)`` is how many times ``promote_every_upper`` divides ``j`` (``j = 0`` stays at level 1).
So about 1 in 100 tokens is a cluster centre and about 1 in 5 of those climbs each further level,
spread evenly through the sequence. Because the rule depends on ``i`` alone, insertion simply
continues the schedule. A node of level L is present at every level 1..L (skip-list style), so it
is its own parent below its top level.
"""

from __future__ import annotations

import numpy as np


def level_of(i: int, promote_every: int, promote_every_upper: int) -> int:
    """Top level of indexed token ``i`` (0 = plain token)."""
    if i % promote_every:
        return 0
    j = i // promote_every
    level = 1
    while j and j % promote_every_upper == 0:
        j //= promote_every_upper
        level += 1
    return level


def levels_of(start: int, count: int, promote_every: int, promote_every_upper: int) -> np.ndarray:
    """Levels of tokens ``start .. start + count - 1``. Returns [count] int8."""
    out = np.zeros(count, np.int8)
    first = -(-start // promote_every) * promote_every
    for i in range(first, start + count, promote_every):
        out[i - start] = level_of(i, promote_every, promote_every_upper)
    return out
