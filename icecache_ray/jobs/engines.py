"""Where a batch job's generation runs: in this process, or on Ray replicas (one actor each).

Both engines take batches of prepared prompts and yield per-document result rows as batches
finish. The Ray engine sizes its replicas from the cluster's resources, keeps one batch in flight
per replica, and turns a dead replica into per-document errors (the job goes on with the others).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Iterator

from icecache_ray.jobs.replica import Summarizer

log = logging.getLogger(__name__)


class LocalEngine:
    """Generation in the driver process (no Ray)."""

    name = "local"

    def __init__(self, model_path, config, max_new_tokens: int, threads: int | None) -> None:
        self.replicas = 1
        self._summarizer = Summarizer(model_path, config, max_new_tokens, threads)

    def run(self, batches: list[list[dict]]) -> Iterator[list[dict]]:
        for batch in batches:
            yield self._summarizer.summarize(batch)

    def shutdown(self) -> None:
        pass


def replica_count(resources: dict, threads: int, gpus_per_replica: float) -> int:
    """Replicas that fit the cluster: one per ``gpus_per_replica`` GPUs when there are GPUs and
    replicas use them, else one per ``threads`` CPUs (at least one)."""
    if gpus_per_replica > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_replica))
    return max(1, int(resources.get("CPU", 1) // threads))


class RayEngine:
    """Generation on ``replicas`` Ray actors (see module docstring)."""

    name = "ray"

    def __init__(self, ray, model_path, config, max_new_tokens: int, threads: int, replicas: int | None, gpus_per_replica: float) -> None:
        self.ray = ray
        wanted = replicas or replica_count(ray.cluster_resources(), threads, gpus_per_replica)
        actor = ray.remote(num_cpus=threads, num_gpus=gpus_per_replica, max_restarts=0)(Summarizer)
        self.actors = [actor.remote(model_path, config, max_new_tokens, threads) for _ in range(wanted)]
        ray.get([a.ready.remote() for a in self.actors])  # load errors surface here, before any document
        self.replicas = len(self.actors)
        log.info("%d replica(s) ready (%d CPU threads, %s GPU each)", self.replicas, threads, gpus_per_replica)

    def run(self, batches: list[list[dict]]) -> Iterator[list[dict]]:
        queue, in_flight, idle = deque(batches), {}, list(self.actors)
        while queue or in_flight:
            while queue and idle:
                actor, batch = idle.pop(), queue.popleft()
                in_flight[actor.summarize.remote(batch)] = (actor, batch)
            ready, _ = self.ray.wait(list(in_flight), num_returns=1)
            actor, batch = in_flight.pop(ready[0])
            try:
                rows = self.ray.get(ready[0])
                idle.append(actor)
            except self.ray.exceptions.RayActorError as exc:
                log.error("a replica died (%s); %d replica(s) left", type(exc).__name__, len(idle) + len(in_flight))
                rows = [{"id": it["id"], "error": "the replica serving this document died; re-run the job to retry it"} for it in batch]
                if not idle and not in_flight:
                    yield rows
                    rows = [{"id": it["id"], "error": "no replica left"} for b in queue for it in b]
                    queue.clear()
            yield rows

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
