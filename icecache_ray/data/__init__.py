"""Ray Data processor: the engine inside users' own pipelines, shaped like ``ray.data.llm``.

::

    import ray
    from icecache_ray.data import IceCacheEngineProcessorConfig, build_processor

    config = IceCacheEngineProcessorConfig(budget=256, max_new_tokens=128, max_running=8, concurrency=2)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(messages=[{"role": "user", "content": "Summarize:\\n" + row["text"]}], id=row["id"]),
        postprocess=lambda row: dict(id=row["id"], summary=row["generated_text"], error=row["error"]),
    )
    processor(ray.data.read_json("docs.jsonl")).write_parquet("out/")

Stages: ``preprocess`` (``Dataset.map``) → tokenize (``map_batches`` tasks on CPU: a row's
``prompt_ids``, else its ``messages`` through the chat template, else its ``prompt`` text) →
generate (``map_batches`` with :class:`IceCacheEngineStage`, an actor class: ``concurrency``
actors, each driving one engine replica — the same continuous-batching engine as ``generate``;
``index_mode`` says where it runs: in the actor's process, or as a replica of the Ray runtime
with stage workers and index actors on the actor's node — with ``max_concurrent_batches``
batches in flight per actor so its running batch stays full) → ``postprocess`` (``Dataset.map``). Rows that fail
(tokenization, a prompt that cannot fit, an engine failure) carry the reason in ``error`` instead
of stopping the pipeline; ``postprocess`` sees them too. A dead engine actor is restarted by Ray
Data and its batches resubmitted; a batch whose replica died ``max_attempts`` times comes back as
error rows (:mod:`icecache_ray.data.attempts`) rather than being resubmitted forever. Besides the
text, each row gets its token counts and decode statistics (``STAT_COLUMNS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from icecache_ray.config import POLICIES, IceCacheConfig, _fail, _positive_int
from icecache_ray.data.attempts import Attempts
from icecache_ray.data.columns import tokenize_batch
from icecache_ray.data.stage import INDEX_MODES, OUTPUT_COLUMNS, IceCacheEngineStage, largest_node_cpus, resolve_index_mode
from icecache_ray.serving_config import DeploymentConfig, EngineConfig

__all__ = ["IceCacheEngineProcessorConfig", "Processor", "build_processor", "generate_stage", "tokenize_batch",
           "IceCacheEngineStage", "OUTPUT_COLUMNS", "INDEX_MODES", "resolve_index_mode"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IceCacheEngineProcessorConfig:
    """What :func:`build_processor` builds (validated on construction, ``ValueError`` naming the field).

    model_source: a saved model folder (default: the bundled SmolLM2).
    policy / budget: the KV policy (``IceCacheConfig``). max_new_tokens: per row (greedy, stops at EOS).
    max_running / max_step_tokens: each replica's continuous batching (``EngineConfig``; max_running
    None: sized from the replica's memory, or from ``device_kv_bytes``: each replica's device
    memory budget, ``EngineConfig.device_kv_bytes``).
    batch_size: rows per ``map_batches`` call. concurrency: engine actors (replicas).
    max_concurrent_batches: batches in flight per actor (Ray Core ``max_concurrency``).
    num_cpus / num_gpus: what each engine actor requests. threads: torch threads in it.
    truncate: middle-truncate prompts longer than the context (else such a row is an error).
    max_attempts: how often a batch may be started on a replica (Ray Data resubmits the batches of
    a dead actor to its restart); past it the batch's rows come back with an error.
    index_mode: where each replica's engine runs. ``"in_process"``: a ``LocalEngine`` in the
    engine actor (model, rows and host index in one process). ``"actors"``: a replica of the Ray
    runtime, as a ``Deployment`` runs it: ``stages`` stage workers (the model, split by layer
    ranges when a replica spans GPUs) with an index actor each on the same node owning the host
    stores, the engine actor keeping only the scheduler (``num_cpus`` / ``num_gpus`` then go to the
    stage workers, split evenly). ``"auto"`` (default): ``"actors"`` on a node of at least 8 CPUs,
    ``"in_process"`` below (resolved on the driver from the cluster's largest node).
    stages: stage workers per replica (``index_mode="actors"`` only).
    """

    model_source: str | None = None
    policy: str = "icecache"
    budget: int = 256
    max_new_tokens: int = 128
    max_running: int | None = 8
    max_step_tokens: int = 2048
    batch_size: int = 8
    concurrency: int = 1
    max_concurrent_batches: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1
    truncate: bool = True
    max_attempts: int = 2
    device_kv_bytes: int | None = None
    index_mode: str = "auto"
    stages: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("max_new_tokens", "max_step_tokens", "batch_size", "concurrency", "max_concurrent_batches", "threads",
                  "max_attempts"):
            _positive_int(name, f, getattr(self, f))
        if self.max_running is not None:
            _positive_int(name, "max_running", self.max_running)
        if self.policy not in POLICIES:
            _fail(name, "policy", self.policy, f"must be one of {list(POLICIES)}")
        if self.index_mode not in INDEX_MODES:
            _fail(name, "index_mode", self.index_mode, f"must be one of {list(INDEX_MODES)}")
        _positive_int(name, "stages", self.stages)
        if self.stages > 1 and self.index_mode == "in_process":
            _fail(name, "stages", self.stages, "more than one stage needs index_mode 'actors' (or 'auto')")
        for f in ("num_cpus", "num_gpus"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                _fail(name, f, value, "must be a number >= 0")
        self.ice_config()
        self.engine_config()

    def ice_config(self) -> IceCacheConfig:
        return IceCacheConfig(policy=self.policy, budget=self.budget)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_running=self.max_running, max_step_tokens=self.max_step_tokens,
                            device_kv_bytes=self.device_kv_bytes)

    def deployment_config(self) -> DeploymentConfig:
        """The replica's layout under ``index_mode="actors"``: ``stages`` stage workers sharing
        ``num_cpus`` / ``num_gpus``, one index actor each, ``threads`` torch threads per worker."""
        return DeploymentConfig(stages=self.stages, index_actors_per_stage=1, engine=self.engine_config(),
                                worker_num_cpus=self.num_cpus / self.stages, worker_num_gpus=self.num_gpus / self.stages,
                                threads=self.threads)

    def resolved(self, ray) -> "IceCacheEngineProcessorConfig":
        """This config with ``index_mode="auto"`` decided for the connected cluster."""
        return replace(self, index_mode=resolve_index_mode(self.index_mode, largest_node_cpus(ray), self.stages))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Processor:
    """``processor(ds)``: the dataset with the generation columns (see module docstring)."""

    def __init__(self, config: IceCacheEngineProcessorConfig, stages: list[Callable]) -> None:
        self.config, self.stages = config, stages

    def __call__(self, ds):
        for stage in self.stages:
            ds = stage(ds)
        return ds


def build_processor(config: IceCacheEngineProcessorConfig, preprocess: Callable | None = None,
                    postprocess: Callable | None = None, preprocess_map_kwargs: dict | None = None,
                    postprocess_map_kwargs: dict | None = None) -> Processor:
    """A :class:`Processor` running ``preprocess`` → tokenize → generate → ``postprocess`` (see
    module docstring; the same argument names as ``ray.data.llm.build_processor``)."""
    if not isinstance(config, IceCacheEngineProcessorConfig):
        raise ValueError(f"config={config!r}: must be an IceCacheEngineProcessorConfig")
    stages: list[Callable] = []
    if preprocess is not None:
        stages.append(lambda ds: ds.map(preprocess, **(preprocess_map_kwargs or {})))
    stages.append(lambda ds: ds.map_batches(tokenize_batch, fn_kwargs={"model_source": config.model_source},
                                            batch_size=config.batch_size, num_cpus=1))
    stages.append(lambda ds: generate_stage(ds, config))
    if postprocess is not None:
        stages.append(lambda ds: ds.map(postprocess, **(postprocess_map_kwargs or {})))
    return Processor(config, stages)


def generate_stage(ds, config: IceCacheEngineProcessorConfig, progress=None):
    """``ds`` (with ``prompt_ids`` and ``error`` columns) through ``config.concurrency`` engine
    actors (one :class:`~icecache_ray.data.attempts.Attempts` actor beside them): :data:`OUTPUT_COLUMNS` added.
    ``progress``: an :class:`~icecache_ray.data.inflight.InFlight` actor the replicas tell their work."""
    import ray
    import ray.data

    from icecache_ray import ray_utils

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray_utils.connect()  # the attempts actor needs Ray now; a local one on loopback if none runs
    config = config.resolved(ray)
    # on the driver's node: a worker node removed mid-job must not take the attempt counts with it
    # (the driver's node going away ends the job anyway); restarted, it starts counting afresh
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    attempts = ray.remote(Attempts).options(num_cpus=0, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1).remote()
    # as ray.data.llm: more tasks in flight per actor than it runs at once, so one is always queued
    compute = ray.data.ActorPoolStrategy(size=config.concurrency, max_concurrent_calls_per_actor=config.max_concurrent_batches,
                                         max_tasks_in_flight_per_actor=2 * config.max_concurrent_batches)
    # small blocks: Ray Data hands an actor a block per task and runs that block's batches one
    # after another, so a big block would keep the replica's batch at batch_size rows
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    # index_mode "actors": the stage workers hold the model and ask for the CPUs / GPUs; the
    # engine actor only schedules
    in_process = config.index_mode == "in_process"
    return ds.map_batches(IceCacheEngineStage,
                          fn_constructor_kwargs={"config": config, "attempts": attempts, "progress": progress},
                          batch_size=config.batch_size, compute=compute, num_cpus=config.num_cpus if in_process else 0,
                          num_gpus=config.num_gpus if in_process else 0)
