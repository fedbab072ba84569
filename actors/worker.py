"""The stage worker (the design's GPU worker actor): layers ``[start, stop)`` of one replica and
the device rows of those layers, next to the index actors that hold their host stores.

A thin shell: it loads the model, keeps its layers' weights only, opens its shared-memory inbox
and one client per index actor (selection requests over the same-node channel), and runs
:func:`~icecache_ray.engine.runner.run_stage` for each step. Calls carry the step's plan, token ids
or hidden states, and small counters; page bytes stay in shared memory.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.runner import ModelRunner, keep_only_layers, run_stage
from icecache_ray.engine.stores import InProcessTransport, ServiceClient
from icecache_ray.pool import PagePool, PoolLayout, remove_segment

log = logging.getLogger(__name__)


def pick_device(num_gpus: float) -> torch.device:
    """``cuda`` when this worker was given a GPU and CUDA works, else ``cpu``."""
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class StageWorker:
    """One pipeline stage of one replica (see module docstring). ``index_actors`` empty: the
    stores live in this process (an in-process index service)."""

    def __init__(self, model_path: str | None, config: IceCacheConfig, start: int, stop: int, rows: int, max_seq_len: int,
                 index_actors: list, inbox_name: str | None, inbox_pages: int, pool_pages: int, threads: int = 1,
                 num_gpus: float = 0.0, keep_log: bool = True, channel: bool = True) -> None:
        from icecache_ray.model import load_model

        torch.set_num_threads(threads)
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
        self.device = pick_device(num_gpus)
        model, _ = load_model(model_path, with_tokenizer=False)
        keep_only_layers(model, range(start, stop))
        model.to(self.device)
        self.config, self.inbox, self.service, self.transport = config, None, None, None
        head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        self.clients = self._clients(config, head_dim, index_actors, inbox_name, inbox_pages, pool_pages, keep_log, channel)
        self.runner = ModelRunner(model, config, range(start, stop), rows, max_seq_len, self.clients)
        self.step_ms: list[float] = []

    def _clients(self, config, head_dim, index_actors, inbox_name, inbox_pages, pool_pages, keep_log, channel) -> list:
        if config.policy == "full":
            return []
        if not index_actors:
            from icecache_ray.engine.index_service import IndexService

            self.service = IndexService(config, head_dim, pool_pages)
            self.transport = InProcessTransport(self.service)
            return [ServiceClient(self.transport)]
        import ray

        from icecache_ray.actors.channel import ChannelHandle
        from icecache_ray.actors.handles import RayHandle

        if inbox_name is not None:
            remove_segment(inbox_name)  # left by a previous incarnation of this worker
        self.inbox = PagePool.create(PoolLayout(inbox_pages, config.page_size, head_dim, config.pool.dtype), name=inbox_name)
        handles = [RayHandle(ray, a) for a in index_actors]
        if channel:  # same-node FIFOs for the per-layer selection requests (see actors.channel)
            handles = [ChannelHandle(h, f"{self.inbox.name}_{k}") for k, h in enumerate(handles)]
        return [ServiceClient(h, self.inbox, keep_log=keep_log) for h in handles]

    def ready(self) -> dict:
        """Where this worker runs: host name, pid, node, device, its layers, its rows' bytes."""
        import ray

        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                "layers": [self.runner.layers.start, self.runner.layers.stop], "device_kv_bytes": self.runner.device_bytes()}

    def step(self, plan, incoming, want_logits: bool = False):
        """This stage's share of a step (``run_stage``); tensors come back on the CPU."""
        t0 = time.perf_counter()
        out, counters = run_stage(self.runner, plan, incoming, want_logits)
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        return out.cpu(), counters

    def stats(self) -> dict:
        return {"steps": len(self.step_ms), "step_ms_mean": sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0,
                "inbox_pages_used": self.inbox.num_used if self.inbox is not None else 0,
                "index_recoveries": sum(c.generation for c in self.clients), "device_kv_bytes": self.runner.device_bytes()}

    def close(self) -> None:
        """Finish background work, close the clients and unlink the inbox (idempotent)."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        for part in [*self.clients, self.transport, self.service]:
            if part is not None:
                part.close()
        self.clients, self.transport, self.service = [], None, None
        if self.inbox is not None:
            self.inbox.close()
            self.inbox.unlink()
            self.inbox = None
