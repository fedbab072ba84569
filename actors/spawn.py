"""Spawning the runtime's actors inside a stage's placement group (one bundle: worker + index actors).

Index actors restart after a crash (their stores are replayed by the worker, see
``icecache_ray.runtime.remote_stores``); workers do not: their requests fail with a clear error.
"""

from __future__ import annotations

from icecache_ray.config import IceCacheConfig, PoolConfig
from icecache_ray.runtime.admission import DeploymentConfig
from icecache_ray.actors.index import IndexActor
from icecache_ray.runtime.worker import StageWorker

INDEX_MAX_RESTARTS = 3


def _in_bundle(pg):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)


def spawn_index_actor(ray, pg, dep: DeploymentConfig, ice: IceCacheConfig, head_dim: int, pool_name: str):
    """One index actor (CPU) with its own pool of ``dep.pages_per_index_actor`` pages."""
    cfg = ice.with_(pool=PoolConfig(dtype=ice.pool.dtype, capacity_pages=dep.pages_per_index_actor))
    actor = ray.remote(IndexActor).options(num_cpus=dep.index_num_cpus, max_restarts=INDEX_MAX_RESTARTS,
                                             max_task_retries=0, scheduling_strategy=_in_bundle(pg))
    return actor.remote(cfg, head_dim, 1, pool_name, dep.index_select_threads)


def spawn_worker(ray, pg, dep: DeploymentConfig, ice: IceCacheConfig, model_path, layers: range, index_actors: list, inbox_name: str):
    """One stage worker for ``layers`` next to ``index_actors`` (its inbox holds
    ``dep.pool_pages_per_node`` pages)."""
    cfg = ice.with_(pool=PoolConfig(dtype=ice.pool.dtype, capacity_pages=dep.pool_pages_per_node))
    actor = ray.remote(StageWorker).options(num_cpus=dep.worker_num_cpus, num_gpus=dep.worker_num_gpus,
                                            resources=dict(dep.worker_resources) or None, max_restarts=0,
                                            scheduling_strategy=_in_bundle(pg))
    return actor.remote(None if model_path is None else str(model_path), cfg, layers.start, layers.stop, index_actors,
                        dep.threads, dep.worker_num_gpus, inbox_name, dep.keep_replay_log, dep.same_node_channel)
