"""Frozen, validated settings of the serving engine and of Ray deployments (no torch, no ray).

:class:`EngineConfig` says how one replica batches (rows, step token budget, row length, host
pool); :class:`DeploymentConfig` says how replicas are laid out on a Ray cluster. Both are checked
on construction (``ValueError`` naming the field and the value) before any model or actor starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from icecache_ray.config import _fail, _non_negative_int, _positive_int


def _optional_positive_int(owner: str, name: str, value: Any) -> None:
    if value is not None:
        _positive_int(owner, name, value)


@dataclass(frozen=True)
class EngineConfig:
    """One replica's continuous batching.

    max_running: sequences decoding at once (device rows, allocated once); ``None`` sizes it from
        the memory of the device and host (at most :data:`MAX_AUTO_RUNNING`).
    max_step_tokens: tokens one forward pass may run: a decode token per running sequence, the rest
        prompt chunks of newcomers (so running sequences never wait for a whole long prefill).
    max_seq_len: tokens one row holds (prompt + new tokens); ``None``: the model's context.
    pool_pages: host pages of each index service; ``None``: enough for ``max_running`` sequences
        of ``max_seq_len`` tokens. A sequence is admitted only when its worst case fits.
    select_threads: threads one batched selection is spread over (the index kernel releases the GIL).
    memory_fraction: share of the free device / host memory the automatic sizing may plan for.
    device_kv_bytes: one device memory budget for every policy: ``max_running`` (when ``None``) is
        the rows whose device K/V fit it (full cache: every layer x ``max_seq_len``; a sparse
        policy: sink + slots + window per sparse layer, the dense layers' full K/V and a device
        page-summary table; two sequences' prefill staging set aside, see
        :func:`icecache_ray.engine.sizing.budget_rows`), at most ``max_step_tokens - 1``; a set
        ``max_running`` must fit it. A budget too small for one row is refused when the engine
        is built. ``None``: sized from free memory as above.
    """

    max_running: int | None = None
    max_step_tokens: int = 2048
    max_seq_len: int | None = None
    pool_pages: int | None = None
    select_threads: int = 1
    memory_fraction: float = 0.5
    device_kv_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_running", "max_seq_len", "pool_pages", "device_kv_bytes"):
            _optional_positive_int("EngineConfig", name, getattr(self, name))
        _positive_int("EngineConfig", "max_step_tokens", self.max_step_tokens)
        _positive_int("EngineConfig", "select_threads", self.select_threads)
        if not (isinstance(self.memory_fraction, (int, float)) and 0 < self.memory_fraction <= 1):
            _fail("EngineConfig", "memory_fraction", self.memory_fraction, "must be a number in (0, 1]")
        if self.max_running is not None and self.max_step_tokens <= self.max_running:
            _fail("EngineConfig", "max_step_tokens", self.max_step_tokens,
                  f"must exceed max_running={self.max_running} (every running sequence takes one token of a step)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


MAX_AUTO_RUNNING = 16


@dataclass(frozen=True)
class DeploymentConfig:
    """How a model is deployed on a Ray cluster.

    address: Ray cluster to join (``None``: ``$RAY_ADDRESS`` or a local Ray on loopback).
    replicas / stages: model replicas (each serves different sequences), each a pipeline of
        ``stages`` stage workers holding contiguous layer ranges.
    index_actors_per_stage: CPU index actors next to each stage worker, owning the host stores
        of the stage's sparse layers (dealt round-robin); 0 keeps the stores inside the worker.
    engine: each replica's batching (:class:`EngineConfig`); its ``pool_pages`` is per index actor.
    worker_num_cpus / worker_num_gpus / worker_resources: what each stage worker requests.
    index_num_cpus: what each index actor requests.
    threads: torch / numba threads inside each stage worker.
    keep_replay_log: keep offloaded K/V in the worker's shared-memory inbox so a restarted index
        actor is rebuilt exactly (one more host copy); without it an index-actor death fails the
        sequences it served.
    call_timeout_s: a stage step slower than this fails the replica's sequences (never a hang).
    same_node_channel: selection requests go over named pipes to the index actors on the worker's
        node instead of Ray calls.
    """

    address: str | None = None
    replicas: int = 1
    stages: int = 1
    index_actors_per_stage: int = 1
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_running=8))
    worker_num_cpus: float = 1.0
    worker_num_gpus: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)
    index_num_cpus: float = 0.0
    threads: int = 1
    keep_replay_log: bool = True
    call_timeout_s: float = 600.0
    same_node_channel: bool = True

    def __post_init__(self) -> None:
        for name in ("replicas", "stages", "threads"):
            _positive_int("DeploymentConfig", name, getattr(self, name))
        _non_negative_int("DeploymentConfig", "index_actors_per_stage", self.index_actors_per_stage)
        if not isinstance(self.engine, EngineConfig):
            _fail("DeploymentConfig", "engine", self.engine, "must be an EngineConfig")
        for name in ("worker_num_cpus", "worker_num_gpus", "index_num_cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                _fail("DeploymentConfig", name, value, "must be a non-negative number")
        if not isinstance(self.worker_resources, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in self.worker_resources.items()
        ):
            _fail("DeploymentConfig", "worker_resources", self.worker_resources, "must map resource names to positive numbers")
        if not (isinstance(self.call_timeout_s, (int, float)) and self.call_timeout_s > 0):
            _fail("DeploymentConfig", "call_timeout_s", self.call_timeout_s, "must be a positive number of seconds")
        if self.address is not None and not isinstance(self.address, str):
            _fail("DeploymentConfig", "address", self.address, "must be a string like 'ray://host:10001' or 'auto'")

    def stage_bundle(self) -> dict[str, float]:
        """Resources of one stage's placement-group bundle: its worker and its index actors."""
        bundle = {"CPU": self.worker_num_cpus + self.index_actors_per_stage * self.index_num_cpus, **self.worker_resources}
        if self.worker_num_gpus:
            bundle["GPU"] = self.worker_num_gpus
        return {k: float(v) for k, v in bundle.items() if v > 0} or {"CPU": 0.001}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["engine"] = self.engine.to_dict()
        return out
