"""A sparse layer's stores held by an index service (an index actor on the same node).

:class:`RemoteStores` has the interface of :class:`icecache_ray.engine.stores.LocalStores`, so a
``SparseLayer`` runs unchanged on top of it: builds and inserts go through the worker's inbox pool
(page ids in the request, bytes in shared memory), each decode step sends **one** ``select``
request per layer covering every sequence and head, and selected pages are read in place from the
service's pool. Handles make the transport pluggable: :class:`InProcessHandle` (same process,
tests) and :class:`RayHandle` (an actor).

Recovery: with ``keep_log`` the worker keeps the inbox pages of every build and insert until the
sequence is released (a replay log in the node's shared memory, costing one more host copy of the
offloaded K/V). If the service dies and is restarted, the next call that fails waits for the new
incarnation, replays every store's log in order (the index is deterministic, so the rebuilt stores
equal the lost ones) and retries; the layers then reload all their slots once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
import weakref

import numpy as np

from icecache_ray.pool import PagePool
from icecache_ray.runtime.index_service import InboxItem, LostStores, write_inbox

log = logging.getLogger(__name__)


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


class InProcessHandle:
    """Calls a service object directly."""

    failures: tuple = ()

    def __init__(self, service) -> None:
        self.service = service

    def submit(self, method: str, *args) -> _Done:
        return _Done(getattr(self.service, method)(*args))


class _RayResult:
    def __init__(self, ray, ref) -> None:
        self.ray, self.ref = ray, ref

    def result(self):
        return self.ray.get(self.ref)


class RayHandle:
    """Calls an actor (``IndexService`` under ``ray.remote``); calls from one caller run in order."""

    def __init__(self, ray, actor) -> None:
        self.ray, self.actor = ray, actor
        # LostStores: the call reached a restarted incarnation before anyone saw the old one fail
        self.failures = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, LostStores)

    def submit(self, method: str, *args) -> _RayResult:
        return _RayResult(self.ray, getattr(self.actor, method).remote(*args))


class ServiceClient:
    """The worker side of one index service: its handle, its pool (attached), the worker's inbox,
    and the stores that use it (for recovery, see module docstring)."""

    def __init__(self, handle, inbox: PagePool, keep_log: bool = False, recover_timeout_s: float = 60.0) -> None:
        self.handle, self.inbox = handle, inbox
        self.keep_log, self.recover_timeout_s = keep_log, recover_timeout_s
        self.generation = 0  # incarnations of the service seen so far - 1
        self.stores: weakref.WeakSet = weakref.WeakSet()
        self.pool = None
        self._attach()

    def _attach(self) -> None:
        name = self.handle.submit("pool_name").result()
        self.pool = PagePool.attach(name) if name else None

    def recover(self, seen_generation: int, cause: BaseException) -> None:
        """The service failed: wait for its new incarnation and replay every store's log.
        A no-op if another store already recovered past ``seen_generation``."""
        if self.generation > seen_generation:
            return
        if not self.keep_log:
            raise RuntimeError(f"an index service died and this worker keeps no replay log ({cause})") from cause
        log.warning("index service failed (%s); waiting for its restart and replaying %d store(s)", type(cause).__name__, len(self.stores))
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
        for store in list(self.stores):
            store.replay()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if hasattr(self.handle, "close"):
            self.handle.close()


class RemoteStores:
    """Stores of one layer for a batch, in an index service (see module docstring)."""

    def __init__(self, client: ServiceClient, layer: int, request_id: str | None = None) -> None:
        if client.pool is None:
            raise ValueError("remote stores need the icecache policy (pages read in place from the service's pool)")
        self.client, self.layer = client, layer
        self.request_id = request_id or uuid.uuid4().hex[:12]
        self.seqs: list[str] = []
        self.heads = 0
        self.pending = None  # (future, inbox pages to free when it is done)
        self.log: list[tuple[str, list[InboxItem]]] = []  # replay log (client.keep_log)
        self.kept_pages: list[np.ndarray] = []  # inbox pages the log refers to
        self.reload_all = False  # set by a replay: the next selection invalidates every slot
        client.stores.add(self)

    def _call(self, method: str, *args):
        """One request; if the service died, recover (see module docstring) and retry once."""
        seen = self.client.generation
        try:
            return self.client.handle.submit(method, *args).result()
        except self.client.handle.failures as exc:
            self.client.recover(seen, exc)
            return self.client.handle.submit(method, *args).result()

    def replay(self) -> None:
        """Rebuild this layer's stores in a restarted service from the kept inbox pages."""
        self.pending = None
        for method, items in self.log:
            self.client.handle.submit(method, self.client.inbox.name, self.layer, items).result()
        self.reload_all = True

    @property
    def pool(self) -> PagePool:
        return self.client.pool

    # ------------------------------------------------------------------ background work
    def _send(self, method: str, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.wait()
        items, pages = [], []
        for seq, (k, v) in zip(self.seqs, rows):
            for h in range(k.shape[0]):
                ids = write_inbox(self.client.inbox, k[h], v[h]) if k.shape[1] else np.zeros(0, np.int64)
                items.append(InboxItem(seq, h, ids, int(k.shape[1])))
                pages.append(ids)
        pages = np.concatenate(pages) if pages else np.zeros(0, np.int64)
        if self.client.keep_log:
            self.log.append((method, items))
            self.kept_pages.append(pages)
            pages = np.zeros(0, np.int64)  # freed at close instead
        future = self.client.handle.submit(method, self.client.inbox.name, self.layer, items)
        self.pending = (future, pages, self.client.generation)

    def build(self, middles: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.seqs = [f"{self.request_id}-{b}" for b in range(len(middles))]
        self.heads = middles[0][0].shape[0] if middles else 0
        self._send("build", middles)

    def insert(self, leaving: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self._send("insert", leaving)

    def wait(self) -> None:
        """Finish the outstanding build/insert and free its inbox pages. (Changed pages come back
        with the next selection, so there is nothing to return.)"""
        if self.pending is None:
            return None
        future, pages, seen = self.pending
        self.pending = None
        try:
            future.result()
        except self.client.handle.failures as exc:
            self.client.recover(seen, exc)  # the replay includes this request
        finally:
            if len(pages):
                self.client.inbox.free(pages)
        return None

    # ------------------------------------------------------------------ queries
    def select_pages(self, host_q: np.ndarray, k: int, with_tokens: bool):
        """One request for every (b, h): see ``LocalStores.select_pages``; the picks (the answer
        itself) also carry the pool pages changed since the last selection."""
        batch, heads = host_q.shape[:2]
        seqs = [s for s in self.seqs for _ in range(heads)]
        hs = [h for _ in range(batch) for h in range(heads)]
        self.wait()
        answer = self._call("select", self.layer, seqs, hs, host_q.reshape(batch * heads, *host_q.shape[2:]), k, with_tokens)
        picks = answer
        if self.reload_all:  # pool page ids of the old incarnation mean nothing now
            picks = dataclasses.replace(answer, reload_all=True)
            self.reload_all = False
        tokens = [[answer.tokens[b * heads + h] for h in range(heads)] for b in range(batch)] if with_tokens else None
        return picks, tokens

    def select_tokens(self, host_q: np.ndarray, k: int):
        raise ValueError("remote stores serve the icecache policy only")

    def rows(self, b: int, h: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V [n, d] of middle tokens, read in place from the service's pool."""
        pool_pages, slots = self._call("token_rows", self.layer, self.seqs[b], h, tokens)
        rows = self.pool.pages[pool_pages, :, slots]  # [n, 2, d]
        return np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1])

    # ------------------------------------------------------------------ accounting
    def stored_token_heads(self) -> int:
        return 0  # held by the service; see IndexService.stats

    def index_bytes(self) -> int:
        return 0

    def close(self) -> None:
        try:
            self.wait()
            for seq in self.seqs:
                self.client.handle.submit("release", seq).result()
        except self.client.handle.failures:
            log.warning("layer %d: the index service is gone; nothing to release there", self.layer)
        finally:
            self.seqs = []
            for pages in self.kept_pages:
                if len(pages):
                    self.client.inbox.free(pages)
            self.kept_pages, self.log = [], []
            self.client.stores.discard(self)
