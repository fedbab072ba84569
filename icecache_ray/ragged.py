"""Ragged per-item arrays packed flat (NumPy only): how page selections of a whole batch travel
from the stores to the slot planner, in one process or over a channel, as a handful of buffers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icecache_ray.kernels import EMPTY  # noqa: F401 - re-exported for the bookkeeping modules


def pack_ragged(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(concatenation, bounds [n + 1]) of n 1-D int arrays; :func:`unpack_ragged` inverts it."""
    bounds = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=bounds[1:])
    return (np.concatenate(arrays).astype(np.int64) if arrays else EMPTY), bounds


def unpack_ragged(flat: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """The arrays packed by :func:`pack_ragged` (views of ``flat``)."""
    return [flat[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


@dataclass(frozen=True)
class PagePicks:
    """The pages chosen for n = B * H items (item i = sequence i // H, KV head i % H), packed:
    pages[page_bounds[i]:page_bounds[i+1]] are item i's pool pages, best first, and counts[...]
    their valid rows; dirty[dirty_bounds[i]:dirty_bounds[i+1]] are item i's pool pages whose rows
    changed since its previous selection. ``reload_all``: every slot is stale (the pool was rebuilt)."""

    pages: np.ndarray
    page_bounds: np.ndarray
    counts: np.ndarray
    dirty: np.ndarray
    dirty_bounds: np.ndarray
    reload_all: bool = False

    @classmethod
    def from_items(cls, pages: list[np.ndarray], counts: list[np.ndarray], dirty: list[np.ndarray] | None = None, **extra):
        """Pack per-item arrays (no dirty pages when ``dirty`` is None); ``extra``: a subclass's fields."""
        flat, bounds = pack_ragged(pages)
        dirty_flat, dirty_bounds = pack_ragged(dirty) if dirty is not None else (EMPTY, np.zeros(len(pages) + 1, np.int64))
        return cls(flat, bounds, np.concatenate(counts).astype(np.int64) if counts else EMPTY, dirty_flat, dirty_bounds, **extra)

    def items(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per item: (pool pages, valid rows, changed pool pages)."""
        return list(zip(unpack_ragged(self.pages, self.page_bounds), unpack_ragged(self.counts, self.page_bounds),
                        unpack_ragged(self.dirty, self.dirty_bounds)))
