"""A sparse layer's stores held by an index service (an index actor on the same node).

:class:`RemoteStores` has the interface of :class:`icecache_ray.engine.stores.LocalStores`, so a
``SparseLayer`` runs unchanged on top of it: builds and inserts go through the worker's inbox pool
(page ids in the request, bytes in shared memory), each decode step sends **one** ``select``
request per layer covering every sequence and head, and selected pages are read in place from the
service's pool. Handles make the transport pluggable: :class:`InProcessHandle` (same process,
tests) and :class:`RayHandle` (an actor).
"""

from __future__ import annotations

import uuid

import numpy as np

from icecache_ray.pool import PagePool
from icecache_ray.runtime.index_service import InboxItem, write_inbox


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


class InProcessHandle:
    """Calls a service object directly."""

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

    def submit(self, method: str, *args) -> _RayResult:
        return _RayResult(self.ray, getattr(self.actor, method).remote(*args))


class ServiceClient:
    """The worker side of one index service: its handle, its pool (attached), the worker's inbox."""

    def __init__(self, handle, inbox: PagePool) -> None:
        self.handle, self.inbox = handle, inbox
        name = handle.submit("pool_name").result()
        self.pool = PagePool.attach(name) if name else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


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
        future = self.client.handle.submit(method, self.client.inbox.name, self.layer, items)
        self.pending = (future, np.concatenate(pages) if pages else np.zeros(0, np.int64))

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
        future, pages = self.pending
        self.pending = None
        try:
            future.result()
        finally:
            if len(pages):
                self.client.inbox.free(pages)
        return None

    # ------------------------------------------------------------------ queries
    def select_pages(self, host_q: np.ndarray, k: int, with_tokens: bool):
        """One request for every (b, h): see ``LocalStores.select_pages``; picks also carry the
        pool pages changed since the last selection."""
        batch, heads = host_q.shape[:2]
        seqs = [s for s in self.seqs for _ in range(heads)]
        hs = [h for _ in range(batch) for h in range(heads)]
        answer = self.client.handle.submit("select", self.layer, seqs, hs, host_q.reshape(batch * heads, *host_q.shape[2:]), k, with_tokens).result()
        picks = [(i // heads, i % heads, pp, cnt, dirty) for i, (pp, cnt, dirty, _) in enumerate(answer)]
        tokens = [[answer[b * heads + h][3] for h in range(heads)] for b in range(batch)] if with_tokens else None
        return picks, tokens

    def select_tokens(self, host_q: np.ndarray, k: int):
        raise ValueError("remote stores serve the icecache policy only")

    def rows(self, b: int, h: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V [n, d] of middle tokens, read in place from the service's pool."""
        pool_pages, slots = self.client.handle.submit("token_rows", self.layer, self.seqs[b], h, tokens).result()
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
        finally:
            for seq in self.seqs:
                self.client.handle.submit("release", seq).result()
            self.seqs = []
