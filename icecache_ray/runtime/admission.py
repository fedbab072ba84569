"""Deployment settings and admission control (plain Python: neither torch nor ray).

:class:`DeploymentConfig` is validated before any actor starts. :class:`PoolBudget` is the
driver's ledger of host-pool pages per index service: a request group is admitted to a replica
only when its estimated pages fit every service of every stage; otherwise it waits for running
groups to finish, or is rejected with a clear message when it could never fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from icecache_ray.config import _fail, _non_negative_int, _positive_int

# M-DCI pages are cut per cluster, so they are not all full: measured 551 B stored per token-head
# against 512 B of a full page (SmolLM2 at 8k, docs/results/speed-8k.json). 1.25 leaves headroom.
PAGE_FILL_SLACK = 1.25


@dataclass(frozen=True)
class DeploymentConfig:
    """How a model is deployed on a Ray cluster.

    address: Ray cluster to join (``None``: ``$RAY_ADDRESS`` or a local Ray on loopback).
    replicas / stages: model replicas, each a pipeline of ``stages`` worker actors.
    index_actors_per_stage: index actors next to each worker (0 = stores inside the worker).
    pool_pages_per_node: host pages for one stage's index actors together (split evenly) and
        for its worker's inbox.
    worker_num_cpus / worker_num_gpus / worker_resources: what each worker actor requests
        (``num_gpus`` on GPU clusters; 0 or a custom resource on CPU).
    index_num_cpus: what each index actor requests.
    index_select_threads: threads each index actor spreads one selection request over (the
        requests of a layer's sequences and heads are independent; 2 suits a node with a spare core
        per index actor while its worker waits for the answer).
    threads: torch / numba threads inside each worker.
    max_batch: most prompts in one request group.
    keep_replay_log: keep offloaded K/V in the worker's inbox so a restarted index actor can be
        rebuilt exactly (one more host copy); without it, an index-actor death fails its requests.
    call_timeout_s: a stage call slower than this fails its request (never a hang).
    same_node_channel: selection requests go over named pipes to the index actors on the
        worker's node instead of Ray calls (``icecache_ray.actors.channel``).
    """

    address: str | None = None
    replicas: int = 1
    stages: int = 1
    index_actors_per_stage: int = 1
    pool_pages_per_node: int = 1 << 16
    worker_num_cpus: float = 1.0
    worker_num_gpus: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)
    index_num_cpus: float = 0.0
    index_select_threads: int = 2
    threads: int = 1
    max_batch: int = 8
    keep_replay_log: bool = True
    call_timeout_s: float = 600.0
    same_node_channel: bool = True

    def __post_init__(self) -> None:
        for name in ("replicas", "stages", "pool_pages_per_node", "threads", "max_batch", "index_select_threads"):
            _positive_int("DeploymentConfig", name, getattr(self, name))
        _non_negative_int("DeploymentConfig", "index_actors_per_stage", self.index_actors_per_stage)
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
        if self.index_actors_per_stage and self.pool_pages_per_node < self.index_actors_per_stage:
            _fail("DeploymentConfig", "pool_pages_per_node", self.pool_pages_per_node, "must give every index actor at least one page")

    @property
    def pages_per_index_actor(self) -> int:
        return self.pool_pages_per_node // max(1, self.index_actors_per_stage)

    def stage_bundle(self) -> dict[str, float]:
        """Resources of one stage's placement-group bundle: its worker and its index actors."""
        bundle = {"CPU": self.worker_num_cpus + self.index_actors_per_stage * self.index_num_cpus, **self.worker_resources}
        if self.worker_num_gpus:
            bundle["GPU"] = self.worker_num_gpus
        return {k: float(v) for k, v in bundle.items() if v > 0} or {"CPU": 0.001}

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def group_pages(lengths: list[int], max_new_tokens: int, sparse_layers: int, kv_heads: int, page_size: int) -> int:
    """Host pages one request group can fill in ``sparse_layers`` layers (prompt + generated
    tokens of every sequence, every KV head, with :data:`PAGE_FILL_SLACK`)."""
    per_head = sum(math.ceil((n + max_new_tokens) / page_size) for n in lengths)
    return math.ceil(per_head * kv_heads * sparse_layers * PAGE_FILL_SLACK)


class PoolBudget:
    """Pages reserved per (replica, service) against each service's capacity."""

    def __init__(self, capacity: dict[tuple[int, int], int]) -> None:
        self.capacity = dict(capacity)
        self.used = {key: 0 for key in capacity}
        self.held: dict[str, dict[tuple[int, int], int]] = {}

    def fits(self, need: dict[tuple[int, int], int], empty: bool = False) -> bool:
        """Would ``need`` fit now (or, with ``empty``, on an idle replica)?"""
        return all(n <= self.capacity[key] - (0 if empty else self.used[key]) for key, n in need.items())

    def reserve(self, group: str, need: dict[tuple[int, int], int]) -> None:
        for key, n in need.items():
            self.used[key] += n
        self.held[group] = need

    def release(self, group: str) -> None:
        for key, n in self.held.pop(group, {}).items():
            self.used[key] -= n
