"""Spawning a replica's actors: one placement group per stage (STRICT_PACK, one bundle holding the
stage worker and its index actors), so a worker and the index actors sharing its node's
shared-memory pools always land on one node; a replica driven by a Ray Data engine actor pins
them to that actor's node instead (:func:`on_node`). ``ray.remote`` is applied here, at spawn.

Index actors restart after a crash (the worker replays their stores, see
``icecache_ray.engine.stores``); stage workers do not: their replica's sequences fail with a
clear error.
"""

from __future__ import annotations

from icecache_ray.actors.index import IndexActor
from icecache_ray.actors.worker import StageWorker
from icecache_ray.config import IceCacheConfig
from icecache_ray.serving_config import DeploymentConfig

INDEX_MAX_RESTARTS = 3


def stage_ranges(n_layers: int, stages: int, n_full_layers: int = 0, layer_reuse: int = 1) -> list[range]:
    """Split ``n_layers`` into ``stages`` contiguous ranges of near-equal size; boundaries inside
    the sparse part are moved to the start of a ``layer_reuse`` run (an anchor and its followers
    stay in one stage). Raises ValueError when there are fewer layers than stages."""
    if stages < 1 or stages > n_layers:
        raise ValueError(f"stages={stages}: must be between 1 and the model's {n_layers} layers")
    cuts = [round(i * n_layers / stages) for i in range(stages + 1)]
    for i in range(1, stages):
        if cuts[i] > n_full_layers and layer_reuse > 1:
            cuts[i] = n_full_layers + (cuts[i] - n_full_layers) // layer_reuse * layer_reuse
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"stages={stages}: too many stages for {n_layers} layers with layer_reuse={layer_reuse}")
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def _in_bundle(where):
    """The scheduling strategy of ``where``: a stage's placement group (its one bundle), or a
    strategy already (:func:`on_node`)."""
    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not isinstance(where, PlacementGroup):
        return where
    return PlacementGroupSchedulingStrategy(placement_group=where, placement_group_bundle_index=0)


def on_node(node_id: str):
    """Placement on node ``node_id`` (hard affinity) instead of a placement group: what a replica
    owned by an actor uses (the actors it spawns die with it, and nothing outlives it, whereas a
    placement group would stay reserved until the job ends)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def stage_group(ray, dep: DeploymentConfig, where: str, timeout_s: float = 60.0):
    """A ready placement group for one stage; RuntimeError naming the resources if none fits."""
    from ray.util.placement_group import placement_group

    pg = placement_group([dep.stage_bundle()], strategy="STRICT_PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"{where}: no node offers {dep.stage_bundle()} within {timeout_s:.0f} s "
                           f"(cluster has {ray.cluster_resources()}); lower replicas/stages or the resource requests")
    return pg


def spawn_index_actor(ray, where, dep: DeploymentConfig, ice: IceCacheConfig, head_dim: int, pool_pages: int, pool_name: str):
    """One index actor (CPU) with its own pool of ``pool_pages`` pages, named ``pool_name``."""
    actor = ray.remote(IndexActor).options(num_cpus=dep.index_num_cpus, max_restarts=INDEX_MAX_RESTARTS, max_task_retries=0,
                                           scheduling_strategy=_in_bundle(where))
    return actor.remote(ice, head_dim, pool_pages, pool_name, dep.engine.select_threads, 1)


def spawn_worker(ray, where, dep: DeploymentConfig, ice: IceCacheConfig, model_path, layers: range, rows: int, max_seq_len: int,
                 index_actors: list, inbox_name: str, inbox_pages: int, pool_pages: int):
    """One stage worker for ``layers`` next to ``index_actors``."""
    actor = ray.remote(StageWorker).options(num_cpus=dep.worker_num_cpus, num_gpus=dep.worker_num_gpus,
                                            resources=dict(dep.worker_resources) or None, max_restarts=0,
                                            scheduling_strategy=_in_bundle(where))
    return actor.remote(None if model_path is None else str(model_path), ice, layers.start, layers.stop, rows, max_seq_len,
                        index_actors, inbox_name, inbox_pages, pool_pages, dep.threads, dep.worker_num_gpus,
                        dep.keep_replay_log, dep.same_node_channel)
