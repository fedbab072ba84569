"""What an index actor does, as a plain class: own the stores of some (sequence, layer, KV head)
partitions and the shared-memory pool their pages live in, on the node of the worker it serves.

Page bytes never travel through calls: the worker writes the K/V a store must ingest into its
*inbox* pool (shared memory it owns) and sends page ids; the service reads them in place, builds
or extends the stores in its own pool, and answers selections with pool page ids the worker reads
in place. Calls carry ids, queries and small metadata only, and every call covers a whole batch
and all the heads of one layer the service owns (one request per service per layer and step).
"""

from __future__ import annotations

import logging
import functools
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from icecache_ray.config import IceCacheConfig
from icecache_ray.policies import make_policy
from icecache_ray.pool import PagePool, PoolLayout, remove_segment
from icecache_ray.ragged import EMPTY, PagePicks
from icecache_ray.split_work import WorkSplitter

log = logging.getLogger(__name__)


def _locked(method):
    """Serialise a public method: a service may be called from its actor's thread and from a
    same-node channel thread (``icecache_ray.actors.channel``) at once."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class Selection(PagePicks):
    """A select answer: :class:`~icecache_ray.ragged.PagePicks` plus ``tokens``, per-item
    middle-token ids (or None); flat arrays, so an answer pickles as a handful of buffers."""

    tokens: list | None = None


class LostStores(KeyError):
    """A request names a store this service does not hold: it was restarted since the store was
    built (the caller replays its log, see ``remote_stores``) or the sequence was released."""


@dataclass(frozen=True)
class InboxItem:
    """One (sequence, KV head)'s rows in the inbox: ``pages`` hold ``n`` rows, page after page."""

    seq: str
    head: int
    pages: np.ndarray
    n: int


def write_inbox(inbox: PagePool, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Copy rows k, v [n, d] into newly allocated inbox pages; returns the page ids."""
    p = inbox.layout.page_size
    n_pages = max(1, -(-len(k) // p))
    pages = inbox.alloc(n_pages)
    for i, page in enumerate(pages.tolist()):
        inbox.write(page, k[i * p : (i + 1) * p], v[i * p : (i + 1) * p])
    return pages


def read_inbox(inbox: PagePool, item: InboxItem) -> tuple[np.ndarray, np.ndarray]:
    """Rows (k, v) [n, d] of an inbox item (copies)."""
    rows = inbox.read(item.pages)  # [m, 2, P, d]
    d = rows.shape[-1]
    return rows[:, 0].reshape(-1, d)[: item.n], rows[:, 1].reshape(-1, d)[: item.n]


class IndexService:
    """Stores of the (sequence, layer, KV head) partitions given to it (see module docstring)."""

    def __init__(self, config: IceCacheConfig, head_dim: int, numba_threads: int | None = None, pool_name: str | None = None,
                 select_threads: int = 1) -> None:
        """``pool_name``: a fixed name for the pool, so a restarted actor (same arguments) replaces
        the segment its dead predecessor left behind instead of leaking it. ``select_threads``:
        threads one ``select`` spreads its items over (the index kernel releases the GIL; the
        answer does not depend on it)."""
        if numba_threads:
            os.environ["NUMBA_NUM_THREADS"] = str(numba_threads)
        self.config = config
        layout = PoolLayout(config.pool.capacity_pages, config.page_size, head_dim, "float32")
        self.pool = None
        if config.policy == "icecache":
            if pool_name is not None and remove_segment(pool_name):
                log.warning("index service: replaced the stale pool %s of a previous incarnation", pool_name)
            self.pool = PagePool.create(layout, name=pool_name)
        self.policy = make_policy(config.policy, head_dim, config.page_size, pool=self.pool, index=config.index)
        self.stores: dict[tuple[str, int, int], object] = {}
        self.dirty: dict[tuple[str, int, int], list[np.ndarray]] = {}
        self._inboxes: dict[str, PagePool] = {}
        self._lock = threading.RLock()
        self._splitter = WorkSplitter(select_threads)
        self.select_calls, self.select_s = 0, 0.0  # time spent inside select (not transport)

    # ------------------------------------------------------------------ transport helpers
    def ping(self) -> int:
        """Liveness check: this process's pid."""
        return os.getpid()

    def pool_name(self) -> str | None:
        return self.pool.name if self.pool is not None else None

    def _inbox(self, name: str) -> PagePool:
        if name not in self._inboxes:
            self._inboxes[name] = PagePool.attach(name)
        return self._inboxes[name]

    def _store(self, key: tuple[str, int, int]):
        try:
            return self.stores[key]
        except KeyError:
            raise LostStores(f"no store for sequence {key[0]!r}, layer {key[1]}, KV head {key[2]} in service pid {os.getpid()}") from None

    # ------------------------------------------------------------------ writes
    @_locked
    def build(self, inbox: str, layer: int, items: list[InboxItem]) -> int:
        """New stores from inbox rows (an item with n = 0 makes an empty store). Returns tokens."""
        box = self._inbox(inbox)
        for it in items:
            k, v = read_inbox(box, it) if it.n else (np.zeros((0, box.layout.head_dim), np.float32),) * 2
            self.stores[(it.seq, layer, it.head)] = self.policy.build(k, v)
        return sum(it.n for it in items)

    @_locked
    def insert(self, inbox: str, layer: int, items: list[InboxItem]) -> int:
        """Append inbox rows to existing stores; the changed pool pages are reported by the next
        :meth:`select` of each (sequence, head). Returns tokens inserted."""
        box = self._inbox(inbox)
        for it in items:
            if not it.n:
                continue
            key = (it.seq, layer, it.head)
            pages = self._store(key).insert(*read_inbox(box, it))
            if self.pool is not None:
                self.dirty.setdefault(key, []).append(self.stores[key].index.table.page_pool[pages])
        return sum(it.n for it in items)

    # ------------------------------------------------------------------ reads
    @_locked
    def select(self, layer: int, seqs: list[str], heads: list[int], queries: np.ndarray, k: int, with_tokens: bool = False):
        """Top-k pages of each (seqs[i], heads[i]) for queries [n, g * q, d] (float32).

        Returns a :class:`Selection` (flat arrays, so an answer pickles as a handful of buffers):
        per item its pool pages, their valid rows, the pool pages changed since its last select,
        and (``with_tokens``, or a policy without pages) its middle-token ids."""
        t0 = time.perf_counter()
        keys = [(seq, layer, head) for seq, head in zip(seqs, heads)]
        stores = [self._store(key) for key in keys]  # LostStores before any state changes
        dirty_out = [self._pop_dirty(key) for key in keys]
        work = list(zip(stores, queries))
        answers = self._splitter.map_shares(lambda share: [self._select_one(store, q, k, with_tokens) for store, q in share], work)
        pages_out, counts_out, tokens_out = (list(column) for column in zip(*answers)) if answers else ([], [], [])
        tokens_out = [t for t in tokens_out if t is not None]
        out = Selection.from_items(pages_out, counts_out, dirty_out, tokens=tokens_out or None)
        self.select_calls += 1
        self.select_s += time.perf_counter() - t0
        return out

    def _pop_dirty(self, key: tuple[str, int, int]) -> np.ndarray:
        dirty = self.dirty.pop(key, [])
        return np.concatenate(dirty) if dirty else EMPTY

    def _select_one(self, store, q: np.ndarray, k: int, with_tokens: bool) -> tuple:
        """(pool pages, valid rows, middle tokens or None) of one store for its queries q."""
        if self.pool is None:
            return EMPTY, EMPTY, self.policy.select(store, q, k).tokens
        pages, pool_pages, counts = store.select_pages(np.ascontiguousarray(q), k)
        return pool_pages, counts, store.tokens_of(pages) if with_tokens else None

    @_locked
    def token_rows(self, layer: int, seq: str, head: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the rows of middle tokens are: (pool pages [n], rows in page [n]) (icecache), so a
        reader on the node copies them in place."""
        index = self._store((seq, layer, head)).index
        page, slot = index.token_locations(tokens)
        return index.table.page_pool[page], slot

    # ------------------------------------------------------------------ lifecycle
    @_locked
    def release(self, seq: str) -> int:
        """Free every store of a sequence. Returns how many were freed."""
        keys = [key for key in self.stores if key[0] == seq]
        for key in keys:
            self.stores.pop(key).release()
            self.dirty.pop(key, None)
        return len(keys)

    @_locked
    def stats(self) -> dict:
        tokens = sum(s.n_tokens for s in self.stores.values())
        return {"stores": len(self.stores), "token_heads": tokens,
                "pool_pages_used": self.pool.num_used if self.pool is not None else 0,
                "index_bytes": sum(s.metadata_bytes() for s in self.stores.values()),
                "select_calls": self.select_calls, "select_ms_inside": 1e3 * self.select_s}

    @_locked
    def close(self) -> None:
        """Free everything and unlink the pool (idempotent)."""
        for store in self.stores.values():
            store.release()
        self.stores.clear()
        for box in self._inboxes.values():
            box.close()
        self._inboxes.clear()
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()
            self.pool = None
        self._splitter.close()
