"""What a GPU worker actor does, as a plain class: one pipeline stage of one model replica.

The worker loads the model, keeps only its layers (:class:`StageModel`), and holds one
:class:`IceCache` per request group: the device-resident sink, window and page slots of its
layers. The stores behind its sparse layers live in the index services of its node (layers dealt
round-robin over them), reached through :class:`RemoteStores`: K/V goes in through the worker's
shared-memory inbox, selected pages are read in place from the services' pools. Without index
services the stores stay in this process. Calls carry token ids, hidden states and small metadata.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.cache import IceCache
from icecache_ray.pool import PagePool, PoolLayout, remove_segment
from icecache_ray.runtime.remote_stores import RayHandle, RemoteStores, ServiceClient
from icecache_ray.runtime.stage import StageModel

log = logging.getLogger(__name__)


def pick_device(num_gpus: float) -> torch.device:
    """``cuda`` when this worker was given a GPU and CUDA works, else ``cpu``."""
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class StageWorker:
    """Layers ``[start, stop)`` of one replica (see module docstring)."""

    def __init__(self, model_path: str | None, config: IceCacheConfig, start: int, stop: int, index_actors: list | None = None,
                 threads: int = 1, num_gpus: float = 0.0, inbox_name: str | None = None, keep_log: bool = True,
                 channel: bool = True) -> None:
        from icecache_ray.model import load_model

        torch.set_num_threads(threads)
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
        self.config, self.device = config, pick_device(num_gpus)
        model, _ = load_model(model_path, with_tokenizer=False)
        self.stage = StageModel(model.to(self.device), range(start, stop))
        self.caches: dict[str, IceCache] = {}
        self.clients: list[ServiceClient] = []
        self.inbox = None
        self.step_ms: list[float] = []
        if index_actors and config.policy == "icecache":
            self._connect(index_actors, inbox_name, keep_log, channel)

    def _connect(self, index_actors: list, inbox_name: str | None, keep_log: bool, channel: bool) -> None:
        import ray

        from icecache_ray.actors.channel import ChannelHandle

        mc = self.stage.model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        if inbox_name is not None:
            remove_segment(inbox_name)  # left by a previous incarnation of this worker
        layout = PoolLayout(self.config.pool.capacity_pages, self.config.page_size, head_dim, "float32")
        self.inbox = PagePool.create(layout, name=inbox_name)
        handles = [RayHandle(ray, a) for a in index_actors]
        if channel:  # same-node FIFOs for the per-layer selection requests (see actors.channel)
            handles = [ChannelHandle(h, f"{self.inbox.name}_{k}") for k, h in enumerate(handles)]
        self.clients = [ServiceClient(h, self.inbox, keep_log=keep_log) for h in handles]

    def _stores_factory(self, group: str):
        if not self.clients:
            return None
        sparse = [i for i in self.stage.layers if i >= self.config.n_full_layers]
        owner = {layer: self.clients[k % len(self.clients)] for k, layer in enumerate(sparse)}
        return lambda layer: (lambda: RemoteStores(owner[layer], layer, group))

    # ------------------------------------------------------------------ calls
    def ready(self) -> dict:
        """Where this worker runs: host name, pid, device, its layers."""
        import ray

        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                "layers": [self.stage.layers.start, self.stage.layers.stop]}

    def prefill(self, group: str, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Start request group ``group``: x = token ids [B, T] (first stage) or hidden states
        [B, T, D]. Returns hidden states, or next-token ids [B] on the last stage."""
        if group in self.caches:
            raise ValueError(f"request group {group!r} is already active on this worker")
        self.caches[group] = IceCache(self.stage.model, self.config, self._stores_factory(group), self.stage.layers)
        return self._forward(group, x, mask, positions)

    def decode(self, group: str, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step of ``group``: x = ids [B, 1] or hidden [B, 1, D] (see :meth:`prefill`)."""
        if group not in self.caches:
            raise ValueError(f"request group {group!r} is not active on this worker (released or never started)")
        t0 = time.perf_counter()
        out = self._forward(group, x, mask, positions)
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        return out

    def _forward(self, group: str, x, mask, positions) -> torch.Tensor:
        out = self.stage.forward(self.caches[group], x, mask, positions)
        return out.argmax(-1).cpu() if self.stage.last else out.cpu()

    def release(self, group: str) -> dict:
        """Finish ``group``: free its slots and host pages. Returns its step stats summary."""
        cache = self.caches.pop(group, None)
        if cache is None:
            return {}
        try:
            return cache.stats.summary() if cache.stats is not None else {}
        finally:
            cache.close()

    def stats(self) -> dict:
        return {"active_groups": len(self.caches), "decode_steps": len(self.step_ms),
                "step_ms_mean": sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0,
                "inbox_pages_used": self.inbox.num_used if self.inbox is not None else 0,
                "index_recoveries": sum(c.generation for c in self.clients)}

    def close(self) -> None:
        """Release every group and unlink the inbox (idempotent)."""
        for group in list(self.caches):
            self.release(group)
        for client in self.clients:
            client.close()
        self.clients = []
        if self.inbox is not None:
            self.inbox.close()
            self.inbox.unlink()
            self.inbox = None
