"""Index services behind other transports (the inbox path, a Ray actor, a restart with replay):
the same store code gives the same tokens and logits as the in-process engine."""

import os

import numpy as np
import pytest
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.engine import Engine, LocalStage
from icecache_ray.engine.index_service import InboxItem, IndexService, LostStores, read_inbox, write_inbox
from icecache_ray.engine.local import LocalEngine
from icecache_ray.engine.runner import ModelRunner
from icecache_ray.engine.scheduler import Scheduler
from icecache_ray.engine.sequence import Sequence
from icecache_ray.engine.done import Done
from icecache_ray.engine.stores import ServiceClient
from icecache_ray.pool import PagePool, PoolLayout
from icecache_ray.serving_config import EngineConfig
from tests.test_engine import Logits, _model, _prompt

CFG = IceCacheConfig(budget=64)


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


class _InboxHandle:
    """An in-process service reached like a remote one: K/V through the inbox, every call synchronous."""

    remote = True
    failures: tuple = ()

    def __init__(self, service) -> None:
        self.service = service

    def submit(self, method, *args):
        return Done(getattr(self.service, method)(*args))


def _run(model, clients, prompts, new_tokens=30, on_step=None):
    """Tokens and logits of every prompt through one engine whose runner uses ``clients``."""
    runner = ModelRunner(model, CFG, range(model.config.num_hidden_layers), len(prompts), 2048, clients)
    try:
        engine = Engine([LocalStage(runner)], Scheduler(len(prompts), 2048, 2048))
        logs = Logits(engine)
        seqs = [engine.add(Sequence(p, new_tokens)) for p in prompts]
        while engine.has_work:
            logs.step()
            if on_step is not None:
                on_step(engine.steps)
        return [s.output for s in seqs], [logs.of(s) for s in seqs]
    finally:
        runner.close()


def _local(model, prompts, new_tokens=30):
    with LocalEngine(model, CFG, EngineConfig(max_running=len(prompts))) as eng:
        logs = Logits(eng)
        seqs = [eng.add(Sequence(p, new_tokens)) for p in prompts]
        logs.run()
        return [s.output for s in seqs], [logs.of(s) for s in seqs]


def _inbox():
    return PagePool.create(PoolLayout(8192, 16, 16, "float32"))


def _close(inbox, *things):
    for thing in things:
        thing.close()
    assert inbox.num_used == 0  # every inbox page given back
    inbox.close()
    inbox.unlink()


@pytest.mark.parametrize("select_threads", [1, 3])
def test_inbox_transport_decodes_exactly_like_the_local_engine(select_threads):
    """Same logits with the stores in separate services reached through the inbox (pages read from
    their pools in place), whether a service runs a selection on one thread or several."""
    model = _model()
    prompts = [_prompt(500, 13), _prompt(230, 14)]
    want_tokens, want_logits = _local(model, prompts)
    services = [IndexService(CFG, 16, 4096, select_threads=select_threads) for _ in range(2)]  # layers dealt over two
    inbox = _inbox()
    clients = [ServiceClient(_InboxHandle(s), inbox) for s in services]
    try:
        tokens, logits = _run(model, clients, prompts)
        assert tokens == want_tokens
        for got, want in zip(logits, want_logits):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert all(s.stats()["stores"] == 0 for s in services)  # released as each sequence ended
    finally:
        _close(inbox, *clients, *services)


def test_index_actor_on_ray_gives_the_same_tokens():
    """The service as a Ray actor (loopback, one node): identical greedy tokens."""
    ray = pytest.importorskip("ray")
    from icecache_ray import ray_utils
    from icecache_ray.actors.handles import RayHandle

    model = _model()
    prompts = [_prompt(400, 15)]
    want, _ = _local(model, prompts, 20)
    ray_utils.connect(num_cpus=2, object_store_memory=80 * 1024**2)
    inbox = _inbox()
    try:
        actor = ray.remote(num_cpus=1)(IndexService).remote(CFG, 16, 4096)
        client = ServiceClient(RayHandle(ray, actor), inbox)
        try:
            got, _ = _run(model, [client], prompts, 20)
        finally:
            ray.get(actor.close.remote())
        assert got == want
        _close(inbox, client)
    finally:
        ray.shutdown()


class _RestartableHandle(_InboxHandle):
    """An in-process service that can be 'restarted': a new incarnation with empty stores and a
    fresh pool under the same name (as a restarted actor gets), the old one's pool gone."""

    failures = (LostStores,)

    def restart(self) -> None:
        old = self.service
        old.pool.close()
        self.service = IndexService(old.config, 16, 4096, pool_name=old.pool.name)  # replaces the stale segment


def test_a_restarted_service_is_rebuilt_from_the_replay_log_with_the_same_tokens():
    """Kill-and-restart between decode steps: the worker replays its kept inbox pages and the
    tokens stay exactly those of an undisturbed run; every page is given back at the end."""
    model = _model()
    prompts = [_prompt(500, 16), _prompt(300, 17)]
    want, _ = _local(model, prompts, 40)
    handle = _RestartableHandle(IndexService(CFG, 16, 4096, pool_name=f"icr_{os.getpid()}_restart_test"))
    inbox = _inbox()
    client = ServiceClient(handle, inbox, keep_log=True, recover_timeout_s=5)
    try:
        got, _ = _run(model, [client], prompts, 40, on_step=lambda n: handle.restart() if n == 20 else None)
        assert client.generation == 1  # pages inserted since the prefill came back too
        assert got == want
    finally:
        _close(inbox, client, handle.service)
