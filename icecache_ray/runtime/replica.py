"""One replica on Ray: its layout (stages, rows, host pools) and its actors, driven by an Engine.

:class:`Layout` is decided on the driver before any actor starts (ValueError for impossible
settings): the stages' layer ranges, the rows (``EngineConfig.max_running``, else sized from the
smallest node's memory), the pages of each index actor's pool and what one sequence needs of each.
:class:`Replica` spawns one placement group per stage (worker + its index actors), then wraps the
stage workers as :class:`RayStage` handles of an
:class:`~icecache_ray.engine.engine.Engine` whose scheduler admits against those pools.
:func:`spawn_replica` starts one replica outside a :class:`~icecache_ray.runtime.deployment.Deployment`
(the Ray Data engine actors with ``index_mode="actors"``): the same layout, actors and engine.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.engine import Engine
from icecache_ray.engine.runner import check_model, is_sparse
from icecache_ray.engine.scheduler import Scheduler
from icecache_ray.engine.sizing import auto_max_running, budget_rows, pages_per_sequence, policy_row_cost
from icecache_ray.runtime.placement import on_node, spawn_index_actor, spawn_worker, stage_group, stage_ranges
from icecache_ray.serving_config import MAX_AUTO_RUNNING, DeploymentConfig

log = logging.getLogger(__name__)


@dataclass
class Layout:
    """How every replica of a deployment is cut (see module docstring)."""

    model_config: object
    ice: IceCacheConfig
    dep: DeploymentConfig
    ranges: list[range]
    head_dim: int
    max_seq_len: int
    index_actors_per_stage: int
    rows: int = 0

    def owned(self, stage: int, actor: int) -> int:
        """Sparse layers of ``stage`` dealt to its index actor ``actor`` (round-robin, as the runner)."""
        sparse = [i for i in self.ranges[stage] if is_sparse(i, self.ice)]
        return len(sparse[actor :: self.index_actors_per_stage])

    def need(self, max_tokens: int) -> dict:
        """Host pages one sequence of ``max_tokens`` needs on each index actor (stage, actor)."""
        heads = self.model_config.num_key_value_heads
        return {(s, k): pages_per_sequence(max_tokens, self.ice.page_size, heads, self.owned(s, k))
                for s in range(len(self.ranges)) for k in range(self.index_actors_per_stage)}

    def pool_pages(self, stage: int, actor: int) -> int:
        configured = self.dep.engine.pool_pages
        return configured or max(1, self.rows * self.need(self.max_seq_len)[(stage, actor)])

    def rows_for(self, ray) -> int:
        """Rows per replica: as configured, else what the smallest node's memory allows."""
        engine = self.dep.engine
        if engine.max_running is not None and engine.device_kv_bytes is None:
            self.rows = engine.max_running
            return self.rows
        heads, ice = self.model_config.num_key_value_heads, self.ice
        widest = max(self.ranges, key=len)
        sparse = sum(1 for i in widest if is_sparse(i, ice))
        cost = policy_row_cost(ice, len(widest), sparse, heads, self.head_dim, 4, self.max_seq_len)
        if engine.device_kv_bytes is not None:  # the widest stage's rows must fit each worker's budget
            fit = budget_rows(cost, engine.device_kv_bytes, self.max_seq_len, engine.max_step_tokens - 1)
            if engine.max_running is not None and engine.max_running > fit:
                raise ValueError(f"EngineConfig.max_running={engine.max_running}: more rows than device_kv_bytes="
                                 f"{engine.device_kv_bytes} holds for policy {ice.policy!r} ({fit})")
            self.rows = engine.max_running or fit
            return self.rows
        memory = min(n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")) or 1
        self.rows = auto_max_running(cost, memory, memory, self.dep.engine.memory_fraction,
                                     min(MAX_AUTO_RUNNING, self.dep.engine.max_step_tokens - 1), True)
        return self.rows


def index_actors_per_stage(ice: IceCacheConfig, dep: DeploymentConfig) -> int:
    """Index actors each stage of ``dep`` gets under ``ice``: they serve icecache pages only (the
    other policies keep their token-order stores inside the stage worker)."""
    return dep.index_actors_per_stage if ice.policy == "icecache" else 0


def build_layout(model_config, ice: IceCacheConfig, dep: DeploymentConfig) -> Layout:
    """The deployment's layout, validated (see module docstring)."""
    n_layers, head_dim = check_model(model_config, ice)
    ranges = stage_ranges(n_layers, dep.stages, ice.n_full_layers, ice.layer_reuse)
    n_index = index_actors_per_stage(ice, dep)
    if n_index != dep.index_actors_per_stage:
        log.info("policy %r keeps its stores inside the stage workers (index actors serve icecache pages)", ice.policy)
    max_seq_len = dep.engine.max_seq_len or model_config.max_position_embeddings
    return Layout(model_config, ice, dep, ranges, head_dim, max_seq_len, n_index)


class _Answer:
    def __init__(self, ray, ref) -> None:
        self.ray, self.ref = ray, ref

    def result(self, timeout=None):
        return self.ray.get(self.ref, timeout=timeout)


class RayStage:
    """A stage worker actor as an engine stage handle: ``submit`` chains the call on the previous
    stage's answer (an object ref, resolved by Ray on the worker)."""

    def __init__(self, ray, actor) -> None:
        self.ray, self.actor = ray, actor
        self.failures = (ray.exceptions.RayError,)

    def submit(self, plan, incoming, want_logits: bool = False) -> _Answer:
        incoming = incoming.ref if isinstance(incoming, _Answer) else incoming
        return _Answer(self.ray, self.actor.step.remote(plan, incoming, want_logits))


class Replica:
    """The actors of replica ``index`` and the engine driving them (see module docstring)."""

    def __init__(self, ray, deployment, index: int, rows: int, node_id: str | None = None) -> None:
        self.ray, self.index, self.node_id = ray, index, node_id
        layout, dep = deployment.layout, deployment.config
        self.stages: list[dict] = []
        self.pgs: list = []
        try:
            self._spawn(deployment, rows)
        except BaseException:
            self.shutdown()
            raise
        capacity = {key: layout.pool_pages(*key) for key in layout.need(1)} if layout.index_actors_per_stage else {}
        need = layout.need if capacity else None
        scheduler = Scheduler(rows, dep.engine.max_step_tokens, layout.max_seq_len, need, capacity)
        self.engine = Engine([RayStage(ray, st["worker"]) for st in self.stages], scheduler, f"replica {index}", dep.call_timeout_s)

    def _spawn(self, deployment, rows: int) -> None:
        ray, index = self.ray, self.index
        layout, dep, ice = deployment.layout, deployment.config, deployment.ice
        for s, layers in enumerate(layout.ranges):
            if self.node_id is None:
                pg = stage_group(ray, dep, f"replica {index} stage {s}")
                self.pgs.append(pg)
            else:  # an actor's own replica: on its node, its actors fate-sharing with it (placement.on_node)
                pg = on_node(self.node_id)
            self.stages.append({"worker": None, "index": [], "layers": [layers.start, layers.stop]})
            prefix = f"icr_{deployment.id}_r{index}s{s}"
            pools = [layout.pool_pages(s, k) for k in range(layout.index_actors_per_stage)]
            actors = self.stages[-1]["index"] = [spawn_index_actor(ray, pg, dep, ice, layout.head_dim, n, f"{prefix}i{k}")
                                                 for k, n in enumerate(pools)]
            in_worker_pool = rows * pages_per_sequence(layout.max_seq_len, ice.page_size, layout.model_config.num_key_value_heads,
                                                       sum(1 for i in layers if is_sparse(i, ice)))
            worker = spawn_worker(ray, pg, dep, ice, deployment.model_path, layers, rows, layout.max_seq_len, actors,
                                  f"{prefix}inbox", max(1, sum(pools)), max(1, in_worker_pool))
            self.stages[-1]["worker"] = worker

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every worker loaded its model (load errors surface here, before any request)."""
        infos = self.ray.get([st["worker"].ready.remote() for st in self.stages], timeout=timeout_s)
        for st, info in zip(self.stages, infos):
            st["info"] = info

    def shape(self) -> dict:
        """This replica's actors: ``stage_workers`` and ``index_actors``."""
        return {"stage_workers": sum(st["worker"] is not None for st in self.stages),
                "index_actors": sum(len(st["index"]) for st in self.stages)}

    @property
    def load(self) -> int:
        sch = self.engine.scheduler
        return len(sch.waiting) + len(sch.running)

    def stats(self) -> dict:
        sch = self.engine.scheduler
        out = {"alive": self.engine.alive, "steps": self.engine.steps, "waiting": len(sch.waiting), "running": len(sch.running),
               "stages": []}
        for st in self.stages:
            row = {"layers": st["layers"], "node_id": st.get("info", {}).get("node_id")}
            if self.engine.alive:
                try:
                    row["worker"] = self.ray.get(st["worker"].stats.remote(), timeout=30)
                    row["index"] = self.ray.get([a.stats.remote() for a in st["index"]], timeout=30)
                except self.ray.exceptions.RayError as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            out["stages"].append(row)
        return out

    def shutdown(self) -> None:
        """Close and kill every actor of this replica, remove its placement groups."""
        ray = self.ray
        for st in self.stages:
            actors = [a for a in [st["worker"], *st["index"]] if a is not None]
            for ref in [a.close.remote() for a in actors]:
                try:
                    ray.get(ref, timeout=30)
                except Exception as exc:  # noqa: BLE001 - teardown goes on whatever one actor says
                    log.debug("teardown call failed: %s", exc)
            for actor in actors:
                ray.kill(actor, no_restart=True)
        for pg in self.pgs:
            ray.util.remove_placement_group(pg)


@dataclass
class ReplicaOwner:
    """What a :class:`Replica` reads of whoever spawns it (a ``Deployment`` is one; a Ray Data
    engine actor makes this one): the layout, the deployment settings, the policy, a unique id
    (the prefix of its shared-memory segments and channels) and the model folder."""

    layout: Layout
    config: DeploymentConfig
    ice: IceCacheConfig
    id: str
    model_path: object = None


def spawn_replica(ray, model_config, ice: IceCacheConfig, dep: DeploymentConfig, model_path=None,
                  node_id: str | None = None) -> Replica:
    """One ready replica outside a ``Deployment`` (a Ray Data engine actor drives its ``engine``):
    the same layout, stage workers and index actors, all on node ``node_id`` (hard affinity, no
    placement groups: the caller's actors die with it). Free it with :func:`close_replica`."""
    owner = ReplicaOwner(build_layout(model_config, ice, dep), dep, ice, f"{os.getpid()}_{uuid.uuid4().hex[:6]}", model_path)
    replica = Replica(ray, owner, 0, owner.layout.rows_for(ray), node_id)
    replica.owner = owner
    try:
        replica.wait_ready(dep.call_timeout_s)
    except BaseException:
        close_replica(replica)
        raise
    return replica


def close_replica(replica: Replica) -> None:
    """Shut a :func:`spawn_replica` replica down and sweep what its killed actors left on this node."""
    replica.shutdown()
    sweep_node(f"icr_{replica.owner.id}_")


def sweep_node(prefix: str) -> None:
    """Remove this node's shared-memory segments and channel FIFOs named ``prefix*`` (what killed
    actors could not unlink themselves)."""
    from icecache_ray.actors.channel import remove_channels
    from icecache_ray.pool import list_leaked_segments, remove_segment

    for name in list_leaked_segments(prefix):
        remove_segment(name)
    remove_channels(prefix)
