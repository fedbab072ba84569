"""The worker side of the host stores: one client per index service, one view per sparse layer.

There is one implementation for both modes; only the *transport* (the handle a
:class:`ServiceClient` is given) differs:

* :class:`InProcessTransport`: the :class:`~icecache_ray.engine.index_service.IndexService` lives
  in this process; builds and inserts run on its one background thread (FIFO, so they overlap the
  model's compute), selections run on the caller's thread; K/V rows are handed over as arrays.
* a Ray handle (``icecache_ray.actors``): the service is an index actor on the same node; K/V rows
  go through this worker's shared-memory *inbox* (page ids in the request), selections over the
  same-node channel; pages are read in place from the actor's pool either way.

Recovery (Ray): with ``keep_log`` the client keeps the inbox pages of every build and insert of a
sequence until it is released. If the service dies and is restarted, the next failing call waits
for the new incarnation, replays every live sequence's log in order (the index is deterministic,
so the rebuilt stores equal the lost ones) and retries; the layers then reload all their slots once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from icecache_ray.engine.done import Done
from icecache_ray.engine.index_service import InboxItem, RowsItem, write_inbox
from icecache_ray.pool import PagePool

log = logging.getLogger(__name__)

ASYNC_METHODS = frozenset({"build", "insert"})



class InProcessTransport:
    """Calls an in-process service: writes on its background thread, reads on the caller's."""

    failures: tuple = ()
    remote = False

    def __init__(self, service) -> None:
        self.service = service
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icecache-index")

    def submit(self, method: str, *args) -> Future | Done:
        fn = getattr(self.service, method)
        if method in ASYNC_METHODS:
            return self._executor.submit(fn, *args)
        return Done(fn(*args))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class ServiceClient:
    """One index service as a worker sees it: its transport, its pool (attached), this worker's
    inbox (remote transports), the replay log, and the layer views that use it."""

    def __init__(self, handle, inbox: PagePool | None = None, keep_log: bool = False, recover_timeout_s: float = 60.0) -> None:
        if getattr(handle, "remote", True) and inbox is None:
            raise ValueError("a remote index service needs this worker's inbox pool")
        self.handle, self.inbox = handle, inbox
        self.keep_log, self.recover_timeout_s = keep_log, recover_timeout_s
        self.generation = 0  # incarnations of the service seen so far - 1
        self.layers: weakref.WeakSet = weakref.WeakSet()
        self.log: dict[str, list[tuple[str, int, list]]] = {}  # seq -> [(method, layer, items)]
        self.kept: dict[str, list[np.ndarray]] = {}  # seq -> inbox pages its log refers to
        self.pool: PagePool | None = None
        self._attach()

    @property
    def inbox_name(self) -> str | None:
        return self.inbox.name if self.inbox is not None else None

    def _attach(self) -> None:
        name = self.handle.submit("pool_name").result()
        self.pool = PagePool.attach(name) if name else None

    def pack(self, seq: str, k: np.ndarray, v: np.ndarray) -> tuple[list, np.ndarray]:
        """Items (one per KV head) carrying rows k, v [H, m, d] to the service, and the inbox
        pages they occupy."""
        if self.inbox is None:
            return [RowsItem(seq, h, k[h], v[h]) for h in range(k.shape[0])], np.zeros(0, np.int64)
        items, pages = [], []
        for h in range(k.shape[0]):
            ids = write_inbox(self.inbox, k[h], v[h]) if k.shape[1] else np.zeros(0, np.int64)
            items.append(InboxItem(seq, h, ids, int(k.shape[1])))
            pages.append(ids)
        return items, np.concatenate(pages).astype(np.int64)

    def call(self, method: str, *args):
        """A synchronous request; if the service died, recover and retry once."""
        seen = self.generation
        try:
            return self.handle.submit(method, *args).result()
        except self.handle.failures as exc:
            self.recover(seen, exc)
            return self.handle.submit(method, *args).result()

    def recover(self, seen_generation: int, cause: BaseException) -> None:
        """The service failed: wait for its new incarnation and replay every live sequence's log.
        A no-op if a recovery past ``seen_generation`` already happened."""
        if self.generation > seen_generation:
            return
        if not self.keep_log:
            raise RuntimeError(f"an index service died and this worker keeps no replay log ({cause})") from cause
        log.warning("index service failed (%s); waiting for its restart, replaying %d sequence(s)", type(cause).__name__, len(self.log))
        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            try:
                self.handle.submit("ping").result()
                break
            except self.handle.failures as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"an index service died and did not come back within {self.recover_timeout_s:.0f} s") from exc
                time.sleep(0.2)
        if hasattr(self.handle, "reconnect"):
            self.handle.reconnect()  # e.g. a same-node channel to the new incarnation
        if self.pool is not None:
            self.pool.close()
        self._attach()
        self.generation += 1
        views = {view.layer: view for view in list(self.layers)}
        for view in views.values():
            view.pending = []  # the replay below covers them
            view.reload_all = True
            view.changes = []  # the replay's answers describe every live page again
        for entries in self.log.values():
            for method, layer, items in entries:
                changes = self.handle.submit(method, layer, self.inbox_name, items).result()
                if layer in views:
                    views[layer].changes.extend(changes or [])

    def remember(self, seq: str, method: str, layer: int, items: list, pages: np.ndarray) -> None:
        self.log.setdefault(seq, []).append((method, layer, items))
        self.kept.setdefault(seq, []).append(pages)

    def release(self, seqs: list[str]) -> None:
        """Free the stores of these sequences in the service, and their log (after every layer
        view's pending work is done: see :meth:`LayerStores.wait`)."""
        if not seqs:
            return
        try:
            self.call("release", list(seqs))
        except self.handle.failures + (RuntimeError,) as exc:
            log.warning("releasing %d sequence(s): the index service is gone (%s)", len(seqs), exc)
        for seq in seqs:
            self.log.pop(seq, None)
            for pages in self.kept.pop(seq, []):
                if len(pages):
                    self.inbox.free(pages)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if hasattr(self.handle, "close"):
            self.handle.close()


class LayerStores:
    """The stores of one sparse layer, for every sequence, in one service (see module docstring)."""

    def __init__(self, client: ServiceClient, layer: int) -> None:
        self.client, self.layer = client, layer
        self.pending: list[tuple] = []  # (future, inbox pages to free when done, generation)
        self.reload_all = False  # set by a replay: the next selection invalidates every slot
        self.changes: list = []  # PageChange answers of finished builds / inserts, not yet taken
        client.layers.add(self)

    @property
    def pool(self) -> PagePool | None:
        """Host pool the selected pages are read from."""
        return self.client.pool

    # ------------------------------------------------------------------ background work
    def build(self, items: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Start new stores from (sequence, k [H, m, d], v) of each sequence (in the background)."""
        self._send("build", items)

    def insert(self, items: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Start appending rows (sequence, k [H, m, d], v) to each sequence's stores."""
        self._send("insert", items)

    def _send(self, method: str, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        client, items, free = self.client, [], []
        for seq, k, v in rows:
            packed, pages = client.pack(seq, k, v)
            items.extend(packed)
            if client.keep_log:
                client.remember(seq, method, self.layer, packed, pages)
            else:
                free.append(pages)
        seen = client.generation
        try:
            future = client.handle.submit(method, self.layer, client.inbox_name, items)
        except client.handle.failures as exc:  # a transport that fails at once (not at result())
            client.recover(seen, exc)  # the replay includes this request (logged above)
            future = Done([])
        self.pending.append((future, np.concatenate(free) if free else np.zeros(0, np.int64), seen))

    def wait(self) -> None:
        """Finish the outstanding builds / inserts and free their inbox pages."""
        pending, self.pending = self.pending, []
        for future, pages, seen in pending:
            try:
                changes = future.result() or []
                if seen == self.client.generation:  # else a replay since has described every page anew
                    self.changes.extend(changes)
            except self.client.handle.failures as exc:
                self.client.recover(seen, exc)  # the replay includes this request
            finally:
                if len(pages):
                    self.client.inbox.free(pages)

    def take_changes(self) -> tuple[list, bool]:
        """Wait for the outstanding work; returns its page changes (oldest first) and whether
        every earlier change is void (the service was replayed: rebuild the summary from these)."""
        self.wait()
        changes, self.changes = self.changes, []
        reset, self.reload_all = self.reload_all, False
        return changes, reset

    # ------------------------------------------------------------------ queries
    def select_pages(self, seqs: list[str], host_q: np.ndarray, k: int, with_tokens: bool):
        """One request for every (sequence, head): queries [n, H, g, d] float32.

        Returns (the :class:`~icecache_ray.ragged.PagePicks` of the n * H items, item i =
        (seqs[i // H], head i % H), with the pool pages changed since each item's last selection;
        tokens [n][H] or None)."""
        n, heads = host_q.shape[:2]
        self.wait()
        answer = self.client.call("select", self.layer, [s for s in seqs for _ in range(heads)], list(range(heads)) * n,
                                  host_q.reshape(n * heads, *host_q.shape[2:]), k, with_tokens)
        picks = answer
        if self.reload_all:  # pool page ids of the old incarnation mean nothing now
            picks, self.reload_all = dataclasses.replace(answer, reload_all=True), False
        tokens = [[answer.tokens[i * heads + h] for h in range(heads)] for i in range(n)] if with_tokens else None
        return picks, tokens

    def select_tokens(self, seqs: list[str], host_q: np.ndarray, k: int) -> list[list[np.ndarray]]:
        """Policies without an index: middle-token ids [n][H] to attend."""
        n, heads = host_q.shape[:2]
        self.wait()
        answer = self.client.call("select", self.layer, [s for s in seqs for _ in range(heads)], list(range(heads)) * n,
                                  host_q.reshape(n * heads, *host_q.shape[2:]), k, False)
        return [[answer.tokens[i * heads + h] for h in range(heads)] for i in range(n)]

    def rows(self, seq: str, head: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V [n, d] of middle tokens, read in place from the service's pool (or handed over by
        an in-process service without one)."""
        answer = self.client.call("token_rows", self.layer, seq, head, tokens)
        if self.pool is None:
            return answer
        pool_pages, slots = answer
        rows = self.pool.read_rows(pool_pages, slots)  # [n, 2, d] float32 (a 16-bit pool decoded)
        return np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1])
