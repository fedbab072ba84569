"""Index services: stores owned elsewhere (another object or a Ray actor), pages read in place."""

import os

import numpy as np
import pytest
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.cache import IceCache
from icecache_ray.pool import PagePool, PoolLayout
from icecache_ray.runtime.index_service import IndexService, InboxItem, LostStores, read_inbox, write_inbox
from icecache_ray.runtime.remote_stores import InProcessHandle, RayHandle, RemoteStores, ServiceClient
from tests.test_engine import _decode_logits, _model


def test_inbox_round_trip():
    inbox = PagePool.create(PoolLayout(64, 16, 8, "float32"))
    try:
        k = np.random.default_rng(0).standard_normal((37, 8)).astype(np.float32)
        pages = write_inbox(inbox, k, -k)
        got_k, got_v = read_inbox(inbox, InboxItem("s", 0, pages, 37))
        np.testing.assert_array_equal(got_k, k)
        np.testing.assert_array_equal(got_v, -k)
        assert len(pages) == 3
    finally:
        inbox.close()
        inbox.unlink()


def _remote_cache(model, cfg, handle_of_layer, inbox):
    clients = {}

    def factory(layer):
        handle = handle_of_layer(layer)
        if id(handle) not in clients:
            clients[id(handle)] = ServiceClient(handle, inbox)
        client = clients[id(handle)]
        return lambda: RemoteStores(client, layer, request_id="req")

    return IceCache(model, cfg, stores_factory=factory), clients


@pytest.mark.parametrize("select_threads", [1, 3])
def test_remote_stores_decode_exactly_like_local_stores(select_threads):
    """Same logits with the stores in a separate service (pages read from its pool in place),
    whether a service runs a request's selections on one thread or spreads them over several."""
    model = _model()
    ids = torch.randint(0, 96, (1, 500), generator=torch.Generator().manual_seed(13))
    cfg = IceCacheConfig(budget=64)
    local = IceCache(model, cfg)
    try:
        want = _decode_logits(model, ids, local, 40)
    finally:
        local.close()
    services = [IndexService(cfg, 16, select_threads=select_threads) for _ in range(2)]  # layers split over two services
    handles = [InProcessHandle(s) for s in services]
    inbox = PagePool.create(PoolLayout(4096, 16, 16, "float32"))
    cache, clients = _remote_cache(model, cfg, lambda layer: handles[layer % 2], inbox)
    try:
        got = _decode_logits(model, ids, cache, 40)
        assert cache.stats.total().pages_loaded > 0
        assert [s.stats()["stores"] for s in services] == [2, 2]  # sparse layers 2 and 3, 2 KV heads each
    finally:
        cache.close()
        for c in clients.values():
            c.close()
        assert all(s.stats()["stores"] == 0 for s in services)  # released with the request
        for s in services:
            s.close()
        assert inbox.num_used == 0  # every inbox page given back
        inbox.close()
        inbox.unlink()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_index_actor_on_ray_gives_the_same_tokens():
    """The service as a Ray actor (loopback, one node): identical greedy tokens."""
    ray = pytest.importorskip("ray")
    from icecache_ray import ray_utils

    model = _model()
    ids = torch.randint(0, 96, (1, 400), generator=torch.Generator().manual_seed(14))
    cfg = IceCacheConfig(budget=64)
    local = IceCache(model, cfg)
    try:
        want = _decode_logits(model, ids, local, 20).argmax(-1)
    finally:
        local.close()
    ray_utils.connect(num_cpus=2, object_store_memory=80 * 1024**2)
    inbox = PagePool.create(PoolLayout(4096, 16, 16, "float32"))
    try:
        actor = ray.remote(num_cpus=1)(IndexService).remote(cfg, 16, 1)
        handle = RayHandle(ray, actor)
        cache, clients = _remote_cache(model, cfg, lambda layer: handle, inbox)
        try:
            got = _decode_logits(model, ids, cache, 20).argmax(-1)
        finally:
            cache.close()
            for c in clients.values():
                c.close()
            ray.get(actor.close.remote())
        assert torch.equal(got, want)
    finally:
        inbox.close()
        inbox.unlink()
        ray.shutdown()


class _RestartableHandle(InProcessHandle):
    """An in-process service that can be 'restarted': a new incarnation with empty stores and a
    fresh pool under the same name (as a restarted actor gets), the old one's pool gone."""

    failures = (LostStores,)

    def restart(self) -> None:
        old = self.service
        old.pool.close()
        self.service = IndexService(old.config, 16, pool_name=old.pool.name)  # replaces the stale segment


def test_a_restarted_service_is_rebuilt_from_the_replay_log_with_the_same_tokens():
    """Kill-and-restart between decode steps: the worker replays its kept inbox pages and the
    tokens stay exactly those of an undisturbed run; every page is given back at the end."""
    model = _model()
    ids = torch.randint(0, 96, (1, 500), generator=torch.Generator().manual_seed(15))
    cfg = IceCacheConfig(budget=64)
    local = IceCache(model, cfg)
    try:
        want = _decode_logits(model, ids, local, 40).argmax(-1)
    finally:
        local.close()
    name = f"icr_{os.getpid()}_restart_test"
    handle = _RestartableHandle(IndexService(cfg, 16, pool_name=name))
    inbox = PagePool.create(PoolLayout(4096, 16, 16, "float32"))
    client = ServiceClient(handle, inbox, keep_log=True, recover_timeout_s=5)
    cache = IceCache(model, cfg, stores_factory=lambda layer: (lambda: RemoteStores(client, layer, "req")))
    got = []
    try:
        with torch.inference_mode():
            logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
            for step in range(40):
                got.append(logits.argmax(-1))
                if step == 20:  # pages inserted since the prefill must come back too
                    handle.restart()
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
        assert client.generation == 1
    finally:
        cache.close()
        client.close()
        handle.service.close()
        assert inbox.num_used == 0
        inbox.close()
        inbox.unlink()
    assert torch.equal(torch.cat(got), want)
