"""Host page pool in POSIX shared memory: page-major K/V pages any process on the node can attach.

Layout of a segment: a 64-byte header (magic, capacity, page size, head dim, dtype code) and then
``[capacity_pages, 2, page_size, head_dim]`` (index 0 = K rows, 1 = V rows), so one page (K and
V of one (sequence, layer, KV head) page) is one contiguous slice of ``page_bytes``. The creating
process owns allocation (free list) and unlinking; other processes attach by name and read or
write pages in place, without copies. Segment names start with ``icr_`` so leaks can be found.
This module imports neither torch nor ray.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import sys
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger(__name__)

PREFIX = "icr_"
MAGIC = b"ICRPOOL1"
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sqqqq")  # magic, capacity, page_size, head_dim, dtype code
_DTYPES = {"float32": (0, np.float32), "float16": (1, np.float16), "bfloat16": (2, np.uint16)}
_CODES = {code: name for name, (code, _) in _DTYPES.items()}


class PoolExhausted(RuntimeError):
    """The pool has fewer free pages than an allocation asked for."""


@dataclass(frozen=True)
class PoolLayout:
    """Shape of a pool: ``capacity_pages`` pages of ``[2, page_size, head_dim]`` in ``dtype``
    (``bfloat16`` is stored as uint16 bit patterns: NumPy has no bfloat16)."""

    capacity_pages: int
    page_size: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("capacity_pages", "page_size", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"PoolLayout.{name}={value!r}: must be a positive integer")
        if self.dtype not in _DTYPES:
            raise ValueError(f"PoolLayout.dtype={self.dtype!r}: must be one of {sorted(_DTYPES)}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype][1])

    @property
    def page_shape(self) -> tuple[int, int, int]:
        return (2, self.page_size, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return 2 * self.page_size * self.head_dim * self.numpy_dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return HEADER_BYTES + self.capacity_pages * self.page_bytes


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_float32(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def list_leaked_segments(prefix: str = PREFIX) -> list[str]:
    """Names of shared-memory segments in /dev/shm starting with ``prefix`` ([] without /dev/shm)."""
    try:
        return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))
    except FileNotFoundError:
        return []


def _open_segment(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with this process's resource tracker (which would unlink the
    segment when this process exits, a CPython bug before 3.13)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)
    shm = shared_memory.SharedMemory(name=name, create=False)
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - tracker internals differ across versions
        log.debug("could not unregister %s from the resource tracker", name)
    return shm


class PagePool:
    """Fixed-capacity page pool in one shared-memory segment (use :meth:`create` / :meth:`attach`)."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: PoolLayout, owner: bool) -> None:
        self._shm: shared_memory.SharedMemory | None = shm
        self.layout = layout
        self.owner = owner
        self.name = shm.name
        self.pages = np.ndarray(
            (layout.capacity_pages,) + layout.page_shape, dtype=layout.numpy_dtype, buffer=shm.buf, offset=HEADER_BYTES
        )
        # free list as a boolean map + a cursor: lowest free ids first, so runs come out contiguous
        self._free = np.ones(layout.capacity_pages, dtype=bool) if owner else None
        self._n_free = layout.capacity_pages
        self._unlinked = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, layout: PoolLayout, name: str | None = None) -> "PagePool":
        """A new zeroed segment (owner). ``name`` defaults to ``icr_`` + random hex."""
        name = name or PREFIX + secrets.token_hex(6)
        shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_bytes)
        code = _DTYPES[layout.dtype][0]
        shm.buf[: _HEADER.size] = _HEADER.pack(MAGIC, layout.capacity_pages, layout.page_size, layout.head_dim, code)
        log.debug("created pool %s: %d pages, %.1f MiB", name, layout.capacity_pages, layout.total_bytes / 2**20)
        return cls(shm, layout, owner=True)  # /dev/shm pages read as zeros until written

    @classmethod
    def attach(cls, name: str) -> "PagePool":
        """Attach to an existing pool by name (any process on this node); not the owner."""
        try:
            shm = _open_segment(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"no page pool named {name!r} on this node (already unlinked?)") from None
        magic, capacity, page_size, head_dim, code = _HEADER.unpack(bytes(shm.buf[: _HEADER.size]))
        if magic != MAGIC or code not in _CODES:
            shm.close()
            raise ValueError(f"shared-memory segment {name!r} is not an icecache_ray page pool")
        return cls(shm, PoolLayout(capacity, page_size, head_dim, _CODES[code]), owner=False)

    def close(self) -> None:
        """Detach this process's mapping (idempotent). Views of ``pages`` must not outlive it."""
        if self._shm is None:
            return
        self.pages = None  # type: ignore[assignment]  # drop our view before unmapping
        try:
            self._shm.close()
        except BufferError:
            log.warning("pool %s: views of its pages are still alive; mapping kept until they go", self.name)
            return
        self._shm = None

    def unlink(self) -> None:
        """Remove the segment from the node (owner only, idempotent)."""
        if not self.owner:
            raise RuntimeError(f"pool {self.name}: only the creating process unlinks it")
        if self._unlinked:
            return
        try:
            shared_memory.SharedMemory(name=self.name, create=False).unlink()
        except FileNotFoundError:
            pass
        self._unlinked = True

    def __enter__(self) -> "PagePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ allocation
    @property
    def num_free(self) -> int:
        return self._n_free

    @property
    def num_used(self) -> int:
        return self.layout.capacity_pages - self._n_free

    def _require_owner(self, what: str) -> None:
        if not self.owner:
            raise RuntimeError(f"pool {self.name}: only the creating process may {what} pages")

    def alloc(self, n: int) -> np.ndarray:
        """Allocate n pages (lowest free ids first). Returns [n] int32 page ids."""
        self._require_owner("allocate")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"alloc(n={n!r}): n must be a positive integer")
        if n > self._n_free:
            raise PoolExhausted(
                f"pool {self.name}: {n} pages requested but only {self._n_free} of "
                f"{self.layout.capacity_pages} are free (raise the pool capacity or admit fewer requests)"
            )
        ids = np.flatnonzero(self._free)[:n].astype(np.int32)
        self._free[ids] = False
        self._n_free -= n
        return ids

    def free(self, page_ids) -> None:
        """Return pages to the free list (a double free or an unknown id raises ValueError)."""
        self._require_owner("free")
        ids = np.asarray(page_ids, dtype=np.int64).ravel()
        if ids.size == 0:
            return
        if ids.min() < 0 or ids.max() >= self.layout.capacity_pages:
            raise ValueError(f"free: page ids must be in [0, {self.layout.capacity_pages}), got {ids.min()}..{ids.max()}")
        if len(np.unique(ids)) != len(ids) or self._free[ids].any():
            raise ValueError(f"free: double free of page(s) {sorted(set(ids[self._free[ids]].tolist()))[:8]} in pool {self.name}")
        self._free[ids] = True
        self._n_free += len(ids)

    # ------------------------------------------------------------------ data
    def _to_storage(self, x: np.ndarray, what: str, page_id: int) -> np.ndarray:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"pool write to page {page_id}: {what} must be floating point, got {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"pool write to page {page_id}: {what} holds NaN or inf")
        if self.layout.dtype == "bfloat16":
            return float32_to_bf16_bits(x.astype(np.float32))
        return x.astype(self.layout.numpy_dtype, copy=False)

    def write(self, page_id: int, k: np.ndarray, v: np.ndarray, offset: int = 0) -> None:
        """Write rows k, v [n, head_dim] into page ``page_id`` at slots offset..offset+n-1."""
        p, d = self.layout.page_size, self.layout.head_dim
        if not 0 <= int(page_id) < self.layout.capacity_pages:
            raise ValueError(f"pool write: page_id={page_id} outside [0, {self.layout.capacity_pages})")
        k, v = np.asarray(k), np.asarray(v)
        if k.ndim != 2 or k.shape[1] != d or k.shape != v.shape:
            raise ValueError(f"pool write to page {page_id}: k, v must both be [n, {d}], got {k.shape} and {v.shape}")
        if offset < 0 or offset + k.shape[0] > p:
            raise ValueError(f"pool write to page {page_id}: offset={offset} + n={k.shape[0]} exceeds page_size={p}")
        page = self.pages[int(page_id)]
        page[0, offset : offset + k.shape[0]] = self._to_storage(k, "k", page_id)
        page[1, offset : offset + k.shape[0]] = self._to_storage(v, "v", page_id)

    def read(self, page_ids, as_float32: bool = True) -> np.ndarray:
        """Gather whole pages (each one contiguous read). Returns [n, 2, page_size, head_dim]."""
        ids = np.asarray(page_ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.layout.capacity_pages):
            raise ValueError(f"pool read: page ids must be in [0, {self.layout.capacity_pages})")
        out = self.pages[ids]
        if not as_float32:
            return out
        if self.layout.dtype == "bfloat16":
            return bf16_bits_to_float32(out)
        return out.astype(np.float32, copy=False)

    def keys(self, page_ids) -> np.ndarray:
        """K rows of pages: [n, page_size, head_dim] (float32)."""
        return self.read(page_ids)[:, 0]

    def values(self, page_ids) -> np.ndarray:
        """V rows of pages: [n, page_size, head_dim] (float32)."""
        return self.read(page_ids)[:, 1]
