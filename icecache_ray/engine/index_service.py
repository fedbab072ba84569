"""An index service: the host stores of some (sequence, layer, KV head) partitions and the
shared-memory page pool their pages live in. A plain class; the same object serves in-process
(the local engine) and inside an index actor (the Ray runtime), only the transport differs.

Page bytes never travel through calls: K/V a store must ingest arrive as :class:`RowsItem` (arrays,
in the same process) or :class:`InboxItem` (page ids of the caller's shared-memory inbox, across
processes); selections are answered with pool page ids the caller reads in place. Every call
covers all the (sequence, head) items of one layer, so a step makes one request per service and
layer. Each layer has its own lock, so a selection of layer l+1 never waits for the insert of
layer l that a background thread (or an actor thread) is running.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from icecache_ray.config import IceCacheConfig
from icecache_ray.policies import make_policy
from icecache_ray.pool import PagePool, PoolLayout, remove_segment
from icecache_ray.ragged import EMPTY, PagePicks, pack_ragged
from icecache_ray.split_work import WorkSplitter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectAnswer(PagePicks):
    """A select answer: :class:`~icecache_ray.ragged.PagePicks` plus ``tokens``, per-item
    middle-token ids (or None), and the single tokens of the token slots: item i's are rows
    ``token_rows[token_bounds[i]:token_bounds[i+1]]`` of pool pages ``token_pool[...]`` (read in
    place like whole pages); flat arrays, so an answer pickles as a handful of buffers."""

    tokens: list | None = None
    token_pool: np.ndarray = field(default_factory=lambda: EMPTY)
    token_rows: np.ndarray = field(default_factory=lambda: EMPTY)
    token_bounds: np.ndarray | None = None


@dataclass(frozen=True)
class PageChange:
    """Pages of one (sequence, KV head) store that are new or were rewritten: index page ids
    ``pages`` [m], their pool pages and valid rows (ids and counts only, never page bytes)."""

    seq: str
    head: int
    pages: np.ndarray
    pool_pages: np.ndarray
    counts: np.ndarray


def _change(store, item, pages: np.ndarray) -> PageChange:
    pages = np.asarray(pages, np.int64)
    return PageChange(item.seq, item.head, pages, np.asarray(store.pool_pages(pages), np.int64),
                      np.asarray(store.page_counts(pages), np.int64))


class LostStores(KeyError):
    """A request names a store this service does not hold: it was restarted since the store was
    built (the caller replays its log) or the sequence was released."""


@dataclass(frozen=True)
class InboxItem:
    """One (sequence, KV head)'s rows in the caller's inbox pool: ``pages`` hold ``n`` rows."""

    seq: str
    head: int
    pages: np.ndarray
    n: int


@dataclass(frozen=True)
class RowsItem:
    """One (sequence, KV head)'s rows handed over in the same process: k, v [n, d] float32."""

    seq: str
    head: int
    k: np.ndarray
    v: np.ndarray

    @property
    def n(self) -> int:
        return int(self.k.shape[0])


def write_inbox(inbox: PagePool, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Copy rows k, v [n, d] into newly allocated inbox pages; returns the page ids."""
    p = inbox.layout.page_size
    pages = inbox.alloc(max(1, -(-len(k) // p)))
    for i, page in enumerate(pages.tolist()):
        inbox.write(page, k[i * p : (i + 1) * p], v[i * p : (i + 1) * p])
    return pages


def read_inbox(inbox: PagePool, item: InboxItem) -> tuple[np.ndarray, np.ndarray]:
    """Rows (k, v) [n, d] of an inbox item (copies)."""
    rows = inbox.read(item.pages)  # [m, 2, P, d]
    d = rows.shape[-1]
    return rows[:, 0].reshape(-1, d)[: item.n], rows[:, 1].reshape(-1, d)[: item.n]


def _layer_locked(method):
    """Run a method under the lock of its ``layer`` argument (the first after self)."""

    @functools.wraps(method)
    def wrapper(self, layer, *args, **kwargs):
        with self._lock_of(layer):
            return method(self, layer, *args, **kwargs)

    return wrapper


class IndexService:
    """Stores of the partitions given to it (see module docstring)."""

    def __init__(self, config: IceCacheConfig, head_dim: int, capacity_pages: int, pool_name: str | None = None,
                 select_threads: int = 1, numba_threads: int | None = None) -> None:
        """``pool_name``: a fixed name, so a restarted actor (same arguments) replaces the segment its
        dead predecessor left instead of leaking it. ``select_threads``: threads one selection's
        items are spread over (the answer does not depend on it)."""
        if numba_threads:
            os.environ["NUMBA_NUM_THREADS"] = str(numba_threads)
        self.config = config
        self.pool = None
        if config.policy == "icecache":
            if pool_name is not None and remove_segment(pool_name):
                log.warning("index service: replaced the stale pool %s of a previous incarnation", pool_name)
            layout = PoolLayout(capacity_pages, config.page_size, head_dim, config.pool.dtype)
            self.pool = PagePool.create(layout, name=pool_name)
        self.policy = make_policy(config.policy, head_dim, config.page_size, pool=self.pool, index=config.index,
                                  token_pages=config.token_pages)
        self.stores: dict[int, dict[tuple[str, int], object]] = {}  # layer -> (seq, head) -> store
        self.dirty: dict[int, dict[tuple[str, int], list[np.ndarray]]] = {}
        self._inboxes: dict[str, PagePool] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()  # creates layer locks and inbox attachments
        self._splitter = WorkSplitter(select_threads)
        self.select_calls, self.select_s = 0, 0.0  # time spent inside select (not transport)

    # ------------------------------------------------------------------ plumbing
    def ping(self) -> int:
        """Liveness check: this process's pid."""
        return os.getpid()

    def pool_name(self) -> str | None:
        return self.pool.name if self.pool is not None else None

    def _lock_of(self, layer: int) -> threading.Lock:
        with self._guard:
            if layer not in self._locks:
                self._locks[layer] = threading.Lock()
                self.stores[layer], self.dirty[layer] = {}, {}
            return self._locks[layer]

    def _rows(self, inbox: str | None, item) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(item, RowsItem):
            return item.k, item.v
        if not item.n:
            empty = np.zeros((0, self.policy.head_dim), np.float32)
            return empty, empty
        with self._guard:
            if inbox not in self._inboxes:
                self._inboxes[inbox] = PagePool.attach(inbox)
            box = self._inboxes[inbox]
        return read_inbox(box, item)

    def _store(self, layer: int, key: tuple[str, int]):
        try:
            return self.stores[layer][key]
        except KeyError:
            raise LostStores(f"no store for sequence {key[0]!r}, layer {layer}, KV head {key[1]} in service pid {os.getpid()}") from None

    # ------------------------------------------------------------------ writes
    @_layer_locked
    def build(self, layer: int, inbox: str | None, items: list) -> list[PageChange]:
        """New stores from K/V rows (an item with n = 0 makes an empty store). Returns every page
        of the new stores (:class:`PageChange`; none for policies without a pool)."""
        out = []
        for it in items:
            store = self.stores[layer][(it.seq, it.head)] = self.policy.build(*self._rows(inbox, it))
            if self.pool is not None:
                out.append(_change(store, it, np.arange(store.n_pages, dtype=np.int64)))
        return out

    @_layer_locked
    def insert(self, layer: int, inbox: str | None, items: list) -> list[PageChange]:
        """Append rows to existing stores; the changed pool pages are reported by the next
        :meth:`select` of each (sequence, head), and returned (:class:`PageChange`) for a device
        page summary."""
        out = []
        for it in items:
            if not it.n:
                continue
            key = (it.seq, it.head)
            store = self._store(layer, key)
            pages = store.insert(*self._rows(inbox, it))
            if self.pool is not None:
                self.dirty[layer].setdefault(key, []).append(store.pool_pages(pages))
                out.append(_change(store, it, pages))
        return out

    # ------------------------------------------------------------------ reads
    @_layer_locked
    def select(self, layer: int, seqs: list[str], heads: list[int], queries: np.ndarray, k: int, with_tokens: bool = False) -> SelectAnswer:
        """Top-k pages of each (seqs[i], heads[i]) for queries [n, g, d] (float32).

        Returns a :class:`SelectAnswer`: per item its pool pages, their valid rows, the pool pages
        changed since its last select, and (``with_tokens``, or a policy without pages) its
        middle-token ids."""
        t0 = time.perf_counter()
        keys = list(zip(seqs, heads))
        stores = [self._store(layer, key) for key in keys]  # LostStores before any state changes
        dirty = [self._pop_dirty(layer, key) for key in keys]
        work = list(zip(stores, queries))
        answers = self._splitter.map_shares(lambda share: [self._select_one(s, q, k, with_tokens) for s, q in share], work)
        pages, counts, tokens, t_pool, t_rows = (list(c) for c in zip(*answers)) if answers else ([], [], [], [], [])
        tokens = [t for t in tokens if t is not None]
        token_pool, token_bounds = pack_ragged(t_pool)
        out = SelectAnswer.from_items(pages, counts, dirty, tokens=tokens or None, token_pool=token_pool,
                                   token_rows=pack_ragged(t_rows)[0], token_bounds=token_bounds)
        self.select_calls += 1
        self.select_s += time.perf_counter() - t0
        return out

    def _pop_dirty(self, layer: int, key: tuple[str, int]) -> np.ndarray:
        dirty = self.dirty[layer].pop(key, [])
        return np.concatenate(dirty) if dirty else EMPTY

    def _select_one(self, store, q: np.ndarray, k: int, with_tokens: bool) -> tuple:
        """(pool pages, valid rows, middle tokens or None, single tokens' pool pages, their rows)
        of one store for its queries q [g, d]; ``k`` retrieved slots (pages and token slots)."""
        if self.pool is None:
            return EMPTY, EMPTY, self.policy.select(store, q, k).tokens, EMPTY, EMPTY
        pages, pool_pages, counts, t_pages, t_rows = store.select_pages(np.ascontiguousarray(q), *self.policy.split(k))
        tokens = store.tokens_of(pages, t_pages, t_rows) if with_tokens else None
        return pool_pages, counts, tokens, store.pool_pages(t_pages), t_rows

    @_layer_locked
    def token_rows(self, layer: int, seq: str, head: int, tokens: np.ndarray):
        """Where the rows of middle tokens are: (pool pages [n], rows in page [n]) with a pool, so a
        reader on the node copies them in place; without one (token policies, same process
        only), the rows themselves (k, v [n, d])."""
        store = self._store(layer, (seq, head))
        if self.pool is None:
            return store.rows(tokens)
        return store.locations(tokens)

    # ------------------------------------------------------------------ lifecycle
    def release(self, seqs: list[str]) -> int:
        """Free every store of these sequences in every layer. Returns how many were freed."""
        gone, wanted = 0, set(seqs)
        for layer in list(self._locks):
            with self._lock_of(layer):
                for key in [key for key in self.stores[layer] if key[0] in wanted]:
                    self.stores[layer].pop(key).release()
                    self.dirty[layer].pop(key, None)
                    gone += 1
        return gone

    def stats(self) -> dict:
        stores = [s for layer in list(self.stores) for s in list(self.stores[layer].values())]
        return {"stores": len(stores), "token_heads": sum(s.n_tokens for s in stores),
                "pool_pages": self.pool.layout.capacity_pages if self.pool is not None else 0,
                "pool_pages_used": self.pool.num_used if self.pool is not None else 0,
                "index_bytes": sum(s.metadata_bytes() for s in stores),
                "select_calls": self.select_calls, "select_ms_inside": 1e3 * self.select_s}

    def close(self) -> None:
        """Free everything and unlink the pool (idempotent)."""
        for layer in list(self._locks):
            with self._lock_of(layer):
                for store in self.stores[layer].values():
                    store.release()
                self.stores[layer].clear()
        with self._guard:
            for box in self._inboxes.values():
                box.close()
            self._inboxes.clear()
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()
            self.pool = None
        self._splitter.close()
