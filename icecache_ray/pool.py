"""Host page pool in POSIX shared memory: page-major K/V pages any process on the node can attach.

Layout of a segment: a 64-byte header (magic ``ICRPOOL1``, capacity, page size, head dim, dtype
code) and then the page array ``[capacity_pages, 2, page_size, head_dim]`` (index 0 = K rows,
1 = V rows) starting at byte 64, so one page (K and V of one (sequence, layer, KV head) page) is one
contiguous slice of ``page_bytes``. The creating process owns allocation (free list) and
unlinking; other processes attach by name and read or write pages in place, without copies.
Segment names start with ``icr_`` so leaks can be found (:func:`list_leaked_segments`).

This module imports neither torch nor ray.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import sys
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PREFIX = "icr_"
MAGIC = b"ICRPOOL1"
HEADER_BYTES = 64  # the page array starts here: 64-byte aligned (the mapping itself is page aligned)
_HEADER = struct.Struct("<8sqqqq")  # magic, capacity_pages, page_size, head_dim, dtype code
_DTYPES: dict[str, tuple[int, type]] = {"float32": (0, np.float32), "float16": (1, np.float16), "bfloat16": (2, np.uint16)}
_CODES = {code: name for name, (code, _) in _DTYPES.items()}
_INPUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_TRACKER_LOCK = threading.Lock()


class PoolExhausted(RuntimeError):
    """The pool has fewer free pages than an allocation asked for (nothing was allocated)."""

    def __init__(self, message: str, requested: int | None = None, free: int | None = None, capacity: int | None = None) -> None:
        super().__init__(message)
        self.requested = requested
        self.free = free
        self.capacity = capacity

    def __reduce__(self):  # keep the extra fields across pickling (e.g. out of a Ray actor)
        return (type(self), (str(self), self.requested, self.free, self.capacity))


# ---------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class PoolLayout:
    """Shape of a pool: ``capacity_pages`` pages of ``[2, page_size, head_dim]`` in ``dtype``.

    ``dtype`` is "float32", "float16" or "bfloat16"; bfloat16 is stored as uint16 bit patterns
    (NumPy has no bfloat16), see :func:`float32_to_bf16_bits`.
    """

    capacity_pages: int
    page_size: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for field_name in ("capacity_pages", "page_size", "head_dim"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"PoolLayout.{field_name}={value!r}: must be a positive integer")
            object.__setattr__(self, field_name, int(value))  # numpy ints -> plain ints
        if not isinstance(self.dtype, str) or self.dtype not in _DTYPES:
            raise ValueError(f"PoolLayout.dtype={self.dtype!r}: must be one of {sorted(_DTYPES)}")

    @property
    def numpy_dtype(self) -> np.dtype:
        """Storage dtype of the page array (uint16 for bfloat16)."""
        return np.dtype(_DTYPES[self.dtype][1])

    @property
    def itemsize(self) -> int:
        """Bytes per stored element."""
        return self.numpy_dtype.itemsize

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """``(2, page_size, head_dim)``: index 0 = K rows, 1 = V rows."""
        return (2, self.page_size, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (K and V rows together)."""
        return 2 * self.page_size * self.head_dim * self.itemsize

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole segment: header plus ``capacity_pages * page_bytes``."""
        return HEADER_BYTES + self.capacity_pages * self.page_bytes

    def encode(self, x: Any) -> np.ndarray:
        """Finite float rows (any shape) -> the storage dtype (bfloat16: bit patterns, round to
        nearest even). Raises ValueError if a value is too large for the storage dtype (float16
        above 65504, float32 for float64 input); NaN and inf in the input count as too large."""
        if self.dtype == "bfloat16":
            out = float32_to_bf16_bits(x)
            finite = (out & np.uint16(0x7F80)) != np.uint16(0x7F80)
        else:
            with np.errstate(over="ignore"):
                out = np.asarray(x).astype(self.numpy_dtype, copy=False)
            finite = np.isfinite(out)
        if not np.all(finite):
            raise ValueError(f"values too large for {self.dtype} pool storage")
        return out


# ---------------------------------------------------------------------------------- bfloat16
def float32_to_bf16_bits(x: Any) -> np.ndarray:
    """Any-shape float array -> bfloat16 bit patterns (uint16, same shape), round to nearest even.

    Values are first cast to float32. NaN stays NaN (a quiet NaN, sign kept); values beyond the
    bfloat16 range round to +-inf as in IEEE arithmetic.
    """
    f32 = np.asarray(x, dtype=np.float32)
    bits = f32.view(np.uint32)  # same itemsize: fine for any strides, keeps 0-d arrays 0-d
    rounded = np.asarray((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        quiet_nan = (bits >> 16).astype(np.uint16) & np.uint16(0x8000) | np.uint16(0x7FC0)  # sign kept
        rounded = np.where(nan, quiet_nan, rounded).astype(np.uint16)
    return rounded


def bf16_bits_to_float32(x: Any) -> np.ndarray:
    """bfloat16 bit patterns (any-shape integer array, normally uint16) -> float32 (exact)."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"bf16_bits_to_float32: x must hold uint16 bit patterns, got dtype {arr.dtype}")
    wide = arr.astype(np.uint16, copy=False).astype(np.uint32)
    wide <<= np.uint32(16)
    return wide.view(np.float32)


# ---------------------------------------------------------------------------------- segments
def list_leaked_segments(prefix: str = PREFIX) -> list[str]:
    """Sorted names of shared-memory segments in /dev/shm starting with ``prefix``.

    Returns [] where /dev/shm does not exist (non-Linux).
    """
    try:
        return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_segment(name: str) -> bool:
    """Unlink a segment whose owner is gone (e.g. the pool of an index actor that was killed and
    is being restarted). Returns whether one existed. Processes still mapping it keep their view."""
    _check_name(name, "remove_segment")
    return _unlink_name(name)


def _unlink_name(name: str) -> bool:
    """Unlink the segment ``name`` without touching any resource-tracker registration (whether
    one exists is its owner's business: :meth:`PagePool.unlink`). Returns whether it existed."""
    try:
        import _posixshmem  # SharedMemory.unlink would also unregister a name this process never
    except ImportError:  # registered, and the resource tracker prints a KeyError for it
        _posixshmem = None
    if _posixshmem is not None:
        try:
            _posixshmem.shm_unlink("/" + name)
        except FileNotFoundError:
            return False
        return True
    try:
        shm = _open_untracked(name)
    except FileNotFoundError:
        return False
    try:
        shm.unlink()
    finally:
        shm.close()
    return True


def _tracker_identity() -> tuple | None:
    """Which resource tracker this process talks to now: (pid, fd), or None when it runs none."""
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    fd = getattr(tracker, "_fd", None)
    return None if fd is None else (getattr(tracker, "_pid", None), fd)


def _unregister_if_tracked(name: str, registered_with: tuple | None) -> None:
    """Drop the registration the owner's ``SharedMemory(create=True)`` made for ``name`` with the
    tracker ``registered_with`` (:func:`_tracker_identity` at creation) -- only while that very
    tracker still runs. Ray kills a worker's child processes, its resource tracker among them,
    before the worker's exit handlers run; unregistering then would start a new tracker that never
    saw the name, and it prints ``KeyError: '/icr_...'`` (a traceback on every Ray run's end)."""
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if registered_with is None or _tracker_identity() != registered_with or not tracker._check_alive():
        return
    try:
        resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # pragma: no cover - tracker internals differ across versions
        log.debug("pool %s: could not drop its resource-tracker registration", name, exc_info=True)


def remove_orphaned_segments(prefix: str = PREFIX) -> list[str]:
    """Unlink the pools (``icr_<pid>_<hex>``, among those starting with ``prefix``) whose creating process no longer runs on this
    node: what a SIGKILLed owner (an engine actor killed or OOM-killed) could not unlink. Returns
    their names. A pid reused by a new process keeps its segment (conservative)."""
    removed = []
    for name in list_leaked_segments(prefix):
        pid = name[len(PREFIX):].split("_", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and remove_segment(name):
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _open_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach to an existing segment without registering it with the resource tracker.

    Before Python 3.13 ``SharedMemory(create=False)`` registers the segment with the resource
    tracker, which unlinks it when the attaching process exits (CPython gh-82300). Registering
    and then unregistering is not enough: a process started with multiprocessing shares its
    parent's tracker, so the unregister would also drop the *owner's* registration (the owner
    then loses crash cleanup and its own unlink makes the tracker print a KeyError). So the
    register call is skipped for this one construction instead (under a lock; a shared-memory
    registration made by another thread in that instant would be skipped too, which in this
    package only ever happens through this function).
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)
    with _TRACKER_LOCK:
        register = resource_tracker.register

        def _register_others(res_name: str, rtype: str) -> None:
            if rtype != "shared_memory":
                register(res_name, rtype)

        resource_tracker.register = _register_others
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = register


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what}: name must be a non-empty str, got {name!r}")
    if "/" in name or len(name) > 250:
        raise ValueError(f"{what}: name={name!r} must not contain '/' and must be at most 250 characters")
    return name


# ---------------------------------------------------------------------------------- pool
class PagePool:
    """Fixed-capacity page pool in one shared-memory segment. Build it with :meth:`create` (owner:
    allocates, frees and unlinks) or :meth:`attach` (any process on the node: reads/writes pages).

    ``pages`` is the in-place page array ``[capacity_pages, 2, page_size, head_dim]`` in the
    storage dtype. Keep views of it short-lived: the mapping stays until the last one is gone.
    Pickling a pool (e.g. passing it to a Ray actor on the same node) attaches by name on load.
    """

    def __init__(self, shm: shared_memory.SharedMemory, layout: PoolLayout, owner: bool) -> None:
        """Internal: wrap an open segment whose header matches ``layout``."""
        self._shm = shm
        self._closed = False
        self._unlinked = False
        self._layout = layout
        self._owner = owner
        self._tracker: tuple | None = None  # the owner's resource tracker (see create, unlink)
        self._name = shm.name
        self._pages: np.ndarray | None = self._map_pages()
        self._lock = threading.Lock()
        capacity = layout.capacity_pages
        self._free = np.ones(capacity, dtype=bool) if owner else None  # True = free
        self._n_free = capacity if owner else 0
        self._first_free = 0  # every id below this one is in use

    def _map_pages(self) -> np.ndarray:
        layout = self._layout
        shape = (layout.capacity_pages,) + layout.page_shape
        count = layout.capacity_pages * 2 * layout.page_size * layout.head_dim
        # frombuffer holds a buffer export on the mapping (np.ndarray(buffer=...) does not), so a
        # live view can never outlast the mapping: close() defers the unmap instead (see there)
        flat = np.frombuffer(self._shm.buf, dtype=layout.numpy_dtype, count=count, offset=HEADER_BYTES)
        return flat.reshape(shape)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, layout: PoolLayout, name: str | None = None) -> "PagePool":
        """Create a new zero-filled segment for ``layout`` and return its owner.

        ``name`` defaults to ``icr_`` + random hex; a given name must start with ``icr_``.
        New POSIX shared memory reads as zeros, so no page is touched here (no up-front cost).
        """
        if not isinstance(layout, PoolLayout):
            raise TypeError(f"PagePool.create: layout must be a PoolLayout, got {type(layout).__name__}")
        if name is None:
            name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(6)}"  # creator pid: leak checks can tell whose it is
        elif not _check_name(name, "PagePool.create").startswith(PREFIX):
            raise ValueError(f"PagePool.create: name={name!r} must start with {PREFIX!r} (leak checks look for it)")
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_bytes)  # registers it
        except FileExistsError:
            raise FileExistsError(f"PagePool.create: a shared-memory segment named {name!r} already exists") from None
        tracker = _tracker_identity()  # the one that unlinks it should this process die first
        try:
            code = _DTYPES[layout.dtype][0]
            header = _HEADER.pack(MAGIC, layout.capacity_pages, layout.page_size, layout.head_dim, code)
            shm.buf[: len(header)] = header
            pool = cls(shm, layout, owner=True)
            pool._tracker = tracker
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        log.debug("created pool %s: %d pages of %d B (%.1f MiB)", name, layout.capacity_pages, layout.page_bytes, layout.total_bytes / 2**20)
        return pool

    @classmethod
    def attach(cls, name: str) -> "PagePool":
        """Attach to an existing pool by name (any process on this node); not the owner.

        Raises FileNotFoundError (naming it) if no such segment exists and ValueError if the
        segment is not an icecache_ray page pool.
        """
        _check_name(name, "PagePool.attach")
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"PagePool.attach: no page pool named {name!r} on this node (never created or already unlinked)") from None
        try:
            layout = cls._read_header(shm, name)
            pool = cls(shm, layout, owner=False)
        except BaseException:
            shm.close()
            raise
        log.debug("attached pool %s: %d pages, dtype %s", name, layout.capacity_pages, layout.dtype)
        return pool

    @staticmethod
    def _read_header(shm: shared_memory.SharedMemory, name: str) -> PoolLayout:
        if shm.size < HEADER_BYTES:
            raise ValueError(f"PagePool.attach: segment {name!r} ({shm.size} B) is too small to be a page pool")
        magic, capacity, page_size, head_dim, code = _HEADER.unpack(bytes(shm.buf[: _HEADER.size]))
        if magic != MAGIC or code not in _CODES:
            raise ValueError(f"PagePool.attach: segment {name!r} is not an icecache_ray page pool (magic {magic!r})")
        layout = PoolLayout(capacity, page_size, head_dim, _CODES[code])
        if shm.size < layout.total_bytes:
            raise ValueError(f"PagePool.attach: segment {name!r} holds {shm.size} B but its header needs {layout.total_bytes} B")
        return layout

    def __reduce__(self):
        return (PagePool.attach, (self._name,))

    def close(self) -> None:
        """Detach this process from the segment (idempotent); the segment itself stays.

        After close, ``pages``/``read``/``write`` raise RuntimeError. Views of ``pages`` taken
        earlier stay valid: while one is alive the mapping cannot be unmapped, so it is handed
        over to them and unmapped when the last one is garbage-collected.
        """
        if self._closed:
            return
        self._pages = None  # drop our own view before unmapping
        self._closed = True
        try:
            self._shm.close()
        except BufferError:
            self._hand_mapping_to_views()

    def _hand_mapping_to_views(self) -> None:
        """``SharedMemory.close`` failed because views still export the mmap: let the views own it
        (mmap unmaps itself when its last reference goes) and release the file descriptor."""
        shm = self._shm
        shm._mmap = None  # type: ignore[attr-defined]  # so SharedMemory.__del__ will not retry
        fd = getattr(shm, "_fd", -1)
        if fd >= 0:
            os.close(fd)
            shm._fd = -1  # type: ignore[attr-defined]
        log.debug("pool %s: views of its pages are still alive; unmapped when the last one goes", self._name)

    def unlink(self) -> None:
        """Remove the segment from the node (owner only, idempotent). Processes that still map it
        keep their mapping; new attaches fail with FileNotFoundError."""
        if not self._owner:
            raise RuntimeError(f"pool {self._name}: only the creating process unlinks it (this one attached)")
        if self._unlinked:
            return
        if not _unlink_name(self._name):  # removed behind our back: still drop our tracker registration
            log.warning("pool %s: segment was already gone when unlinking", self._name)
        _unregister_if_tracked(self._name, self._tracker)
        self._unlinked = True
        log.debug("unlinked pool %s", self._name)

    def __enter__(self) -> "PagePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._owner:
            self.unlink()

    def __del__(self) -> None:
        try:
            if getattr(self, "_shm", None) is not None:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("owner" if self._owner else "attached")
        lay = self._layout
        return f"PagePool({self._name!r}, {lay.capacity_pages}x{lay.page_shape} {lay.dtype}, {state})"

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """Segment name (attach with it from any process on this node)."""
        return self._name

    @property
    def layout(self) -> PoolLayout:
        return self._layout

    @property
    def owner(self) -> bool:
        """True in the process that created the pool (it allocates, frees and unlinks)."""
        return self._owner

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pages(self) -> np.ndarray:
        """In-place page array ``[capacity_pages, 2, page_size, head_dim]`` (storage dtype)."""
        if self._pages is None:
            raise RuntimeError(f"pool {self._name} is closed in this process")
        return self._pages

    # ------------------------------------------------------------------ allocation
    def _require_owner(self, what: str) -> None:
        if not self._owner:
            raise RuntimeError(f"pool {self._name}: only the creating (owner) process may {what}; this process attached it")

    @property
    def num_free(self) -> int:
        """Free pages (owner only: attached processes do not see the free list)."""
        self._require_owner("count free pages")
        return self._n_free

    @property
    def num_used(self) -> int:
        """Allocated pages (owner only)."""
        self._require_owner("count used pages")
        return self._layout.capacity_pages - self._n_free

    def alloc(self, n: int) -> np.ndarray:
        """Allocate ``n`` pages, lowest free ids first (so runs come out contiguous when possible).

        Returns [n] int32 page ids, ascending. Raises PoolExhausted (allocating nothing) if fewer
        than ``n`` pages are free.
        """
        self._require_owner("allocate pages")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"alloc: n must be an int, got {n!r} ({type(n).__name__})")
        n = int(n)
        if n <= 0:
            raise ValueError(f"alloc: n must be a positive integer, got n={n}")
        with self._lock:
            if n > self._n_free:
                cap = self._layout.capacity_pages
                raise PoolExhausted(
                    f"pool {self._name}: {n} pages requested but only {self._n_free} of {cap} are free "
                    "(raise the pool capacity or admit fewer requests)",
                    requested=n, free=self._n_free, capacity=cap,
                )
            ids = self._lowest_free(n)
            self._free[ids] = False
            self._n_free -= n
            self._first_free = int(ids[-1]) + 1
        return ids

    def _lowest_free(self, n: int) -> np.ndarray:
        """The ``n`` lowest free ids [n] int32, scanning in growing chunks from ``_first_free``."""
        found: list[np.ndarray] = []
        start, need, chunk = self._first_free, n, max(2 * n, 1024)
        capacity = self._layout.capacity_pages
        while need > 0:
            if start >= capacity:  # pragma: no cover - num_free says the pages exist
                raise AssertionError(f"pool {self._name}: free list out of sync with num_free")
            stop = min(start + chunk, capacity)
            hits = np.flatnonzero(self._free[start:stop])[:need] + start
            found.append(hits)
            need -= len(hits)
            start, chunk = stop, 2 * chunk
        return np.concatenate(found).astype(np.int32)

    def free(self, page_ids: Any) -> None:
        """Return pages to the free list. Out-of-range ids, ids not allocated (double free) or
        repeated ids raise ValueError and free nothing."""
        self._require_owner("free pages")
        ids = self._page_ids(page_ids, "free")
        if ids.size == 0:
            return
        with self._lock:
            uniq, counts = np.unique(ids, return_counts=True)
            bad = np.union1d(uniq[counts > 1], uniq[self._free[uniq]])
            if bad.size:
                raise ValueError(f"free: double free of page(s) {bad[:8].tolist()} in pool {self._name} (nothing was freed)")
            self._free[uniq] = True
            self._n_free += len(uniq)
            self._first_free = min(self._first_free, int(uniq[0]))

    def _page_ids(self, page_ids: Any, what: str) -> np.ndarray:
        """Validate page ids (any shape of integers) -> flat [n] int64."""
        ids = np.asarray(page_ids)
        if ids.size and (ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"{what}: page_ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False).ravel()
        cap = self._layout.capacity_pages
        if ids.size and (ids.min() < 0 or ids.max() >= cap):
            bad = ids[(ids < 0) | (ids >= cap)]
            raise ValueError(f"{what}: page ids must be in [0, {cap}), got {bad[:8].tolist()}")
        return ids

    # ------------------------------------------------------------------ data
    def write(self, page_id: int, k: np.ndarray, v: np.ndarray, offset: int = 0) -> None:
        """Write rows ``k``, ``v`` [n, head_dim] into slots offset..offset+n-1 of page ``page_id``.

        Accepts float16/float32/float64 input, cast to the storage dtype (bfloat16: round to
        nearest even). Non-finite values, or values the storage dtype cannot hold, raise
        ValueError naming the page; nothing is written on any error.
        """
        cap, p, d = self._layout.capacity_pages, self._layout.page_size, self._layout.head_dim
        if isinstance(page_id, (bool, np.bool_)) or not isinstance(page_id, (int, np.integer)):
            raise TypeError(f"write: page_id must be an int, got {page_id!r}")
        if not 0 <= page_id < cap:
            raise ValueError(f"write: page_id={page_id} outside [0, {cap})")
        if isinstance(offset, (bool, np.bool_)) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ValueError(f"write to page {page_id}: offset={offset!r} must be a non-negative int")
        k, v = np.asarray(k), np.asarray(v)
        if k.ndim != 2 or k.shape[1] != d or k.shape != v.shape:
            raise ValueError(f"write to page {page_id}: k, v must both be [n, {d}], got {k.shape} and {v.shape}")
        n = k.shape[0]
        if offset + n > p:
            raise ValueError(f"write to page {page_id}: offset={offset} + n={n} exceeds page_size={p}")
        k_st = self._to_storage(k, "k", int(page_id))
        v_st = self._to_storage(v, "v", int(page_id))
        page = self.pages[int(page_id)]
        page[0, offset : offset + n] = k_st
        page[1, offset : offset + n] = v_st

    def _to_storage(self, x: np.ndarray, what: str, page_id: int) -> np.ndarray:
        """Validate one [n, head_dim] input and cast it to the storage dtype."""
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"write to page {page_id}: {what} must be float16, float32 or float64, got {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"write to page {page_id}: {what} holds NaN or inf")
        try:
            return self._layout.encode(x)
        except ValueError:
            raise ValueError(f"write to page {page_id}: {what} holds values too large for {self._layout.dtype} storage") from None

    def read(self, page_ids: Any, out: np.ndarray | None = None, as_float32: bool = True) -> np.ndarray:
        """Gather whole pages (each one contiguous read) into a new array (or ``out``).

        Returns [n, 2, page_size, head_dim]: float32, or the storage dtype (uint16 bits for
        bfloat16) with ``as_float32=False``. The result is a copy, never a view of the pool.
        """
        ids = self._page_ids(page_ids, "read")
        return self._gather(self.pages, ids, out, as_float32, "read")

    def read_rows(self, page_ids: Any, rows: Any, out: np.ndarray | None = None, as_float32: bool = True) -> np.ndarray:
        """Gather single tokens: K and V of row ``rows[i]`` of page ``page_ids[i]`` (both [t]).

        Returns [t, 2, head_dim] (float32 unless ``as_float32=False``) into a new array or ``out``."""
        ids = self._page_ids(page_ids, "read_rows")
        r = np.asarray(rows).astype(np.int64, copy=False).ravel()
        if r.shape != ids.shape or (r.size and (r.min() < 0 or r.max() >= self._layout.page_size)):
            raise ValueError(f"read_rows: rows must be {len(ids)} integers in [0, {self._layout.page_size}), got {r[:8].tolist()}")
        return self._gather(self.pages, ids, out, as_float32, "read_rows", rows=r)

    def keys(self, page_ids: Any, as_float32: bool = True) -> np.ndarray:
        """K rows of pages: [n, page_size, head_dim] (a copy; float32 unless ``as_float32=False``)."""
        ids = self._page_ids(page_ids, "keys")
        return self._gather(self.pages[:, 0], ids, None, as_float32, "keys")

    def values(self, page_ids: Any, as_float32: bool = True) -> np.ndarray:
        """V rows of pages: [n, page_size, head_dim] (a copy; float32 unless ``as_float32=False``)."""
        ids = self._page_ids(page_ids, "values")
        return self._gather(self.pages[:, 1], ids, None, as_float32, "values")

    def _gather(self, src: np.ndarray, ids: np.ndarray, out: np.ndarray | None, as_float32: bool, what: str,
                rows: np.ndarray | None = None) -> np.ndarray:
        """Copy ``src[ids]`` (src [capacity, ...]) into ``out`` [n, ...], converting if asked; with
        ``rows``, one row of each page: ``src[ids, :, rows]`` [n, 2, d]."""
        storage = self._layout.numpy_dtype
        dtype = np.dtype(np.float32) if as_float32 else storage
        shape = (len(ids),) + (src.shape[1:] if rows is None else (src.shape[1], src.shape[3]))
        if out is None:
            out = np.empty(shape, dtype)
        elif not isinstance(out, np.ndarray):
            raise TypeError(f"{what}: out must be a numpy array, got {type(out).__name__}")
        elif out.shape != shape or out.dtype != dtype or not out.flags.writeable:
            raise ValueError(f"{what}: out must be a writeable {dtype} array of shape {shape}, got {out.dtype} {out.shape}")

        def taken():
            # fancy indexing, not np.take: take() makes a strided source (pages[:, 0] / [:, 1], the
            # K or V half of every page) contiguous first, copying the whole pool (seconds a call)
            return src[ids] if rows is None else src[ids, :, rows]

        if dtype == storage:
            out[...] = taken()
        elif self._layout.dtype == "bfloat16":
            bits = out.view(np.uint32)
            bits[...] = taken()
            bits <<= np.uint32(16)
        else:
            out[...] = taken()
        return out
