"""Where a batch job's generation runs: the local engine in this process, or a Ray deployment.

Both are the same continuous-batching engine (``icecache_ray.engine``); these adapters only turn
job items (``{"id", "ids", ...}``) into sequences and ended sequences back into result rows, and
say how much work they can take in (``capacity``) so the job feeds documents as rows free up
instead of queueing all of them.
"""

from __future__ import annotations

import logging

from icecache_ray.engine.sequence import Sequence

log = logging.getLogger(__name__)


def result_row(item: dict, seq: Sequence, tokenizer) -> dict:
    """The output row of a finished document, or ``{"id", "error"}``."""
    if seq.error:
        return {"id": item["id"], "error": seq.error}
    st = seq.stats.summary()
    return {
        "id": item["id"],
        "summary": tokenizer.decode(seq.output, skip_special_tokens=True).strip(),
        "prompt_tokens": seq.prompt_len,
        "generated_tokens": len(seq.output),
        "wall_s": st["wall_s"],
        "queue_s": st["queue_s"],
        "ttft_s": st["ttft_s"] if st["ttft_s"] is not None else float("nan"),
        "decode_steps": int(st["steps"]),
        "select_ms_per_step": float(st["select_ms_per_step"]),
        "load_ms_per_step": float(st["load_ms_per_step"]),
        "attend_ms_per_step": float(st["attend_ms_per_step"]),
        "pages_loaded": int(st["pages_loaded"]),
        "bytes_loaded": int(st["bytes_loaded"]),
        "hit_rate": float(st["hit_rate"]),
    }


class LocalJobEngine:
    """The local engine in the driver process (no Ray)."""

    name = "local"

    def __init__(self, model_path, ice, engine_cfg, max_new_tokens: int, threads: int | None) -> None:
        import torch

        from icecache_ray.engine.local import LocalEngine
        from icecache_ray.model import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(model_path)
        self.engine = LocalEngine(self.model, ice, engine_cfg)
        self.max_new_tokens = max_new_tokens
        self.items: dict[str, tuple[dict, Sequence]] = {}

    @property
    def capacity(self) -> int:
        """Documents worth having queued: the rows, twice (one waiting behind each running)."""
        return 2 * self.engine.rows

    def submit(self, item: dict) -> None:
        seq = Sequence(item["ids"], self.max_new_tokens, self.tokenizer.eos_token_id)
        self.engine.add(seq)
        self.items[seq.seq_id] = (item, seq)

    @property
    def in_flight(self) -> int:
        return len(self.items)

    def step(self) -> list[dict]:
        """One engine step; the rows of the documents that ended in it."""
        return [result_row(*self.items.pop(s.seq_id), self.tokenizer) for s in self.engine.step()]

    def runtime_shape(self) -> dict:
        return {"engine": "local", "replicas": 1, "stages": 1, "stage_workers": 0, "index_actors": 0,
                "max_running": self.engine.rows}

    def shutdown(self) -> None:
        self.engine.close()


def replica_count(resources: dict, threads: int, gpus_per_replica: float) -> int:
    """Replicas that fit the cluster: one per ``gpus_per_replica`` GPUs when replicas use GPUs,
    else one per ``threads`` CPUs (at least one)."""
    if gpus_per_replica > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_replica))
    return max(1, int(resources.get("CPU", 1) // threads))


class RayJobEngine:
    """A :class:`~icecache_ray.runtime.deployment.Deployment`: stage workers and index actors per
    replica; a dead replica's documents become errors (re-run the job to retry them)."""

    name = "ray"

    def __init__(self, ray, model_path, ice, engine_cfg, max_new_tokens: int, threads: int, replicas: int | None,
                 gpus_per_replica: float, address: str | None) -> None:
        from icecache_ray.runtime.deployment import Deployment
        from icecache_ray.serving_config import DeploymentConfig

        wanted = replicas or replica_count(ray.cluster_resources(), threads, gpus_per_replica)
        config = DeploymentConfig(address=address, replicas=wanted, engine=engine_cfg, worker_num_cpus=float(threads),
                                  worker_num_gpus=gpus_per_replica, threads=threads)
        self.dep = Deployment(config, ice, model_path)
        self.tokenizer = self.dep.tokenizer
        self.max_new_tokens = max_new_tokens
        self.items: dict[str, dict] = {}
        log.info("%d replica(s) ready (%d CPU threads, %s GPU each, %d rows each)", wanted, threads, gpus_per_replica, self.dep.layout.rows)

    @property
    def capacity(self) -> int:
        return 2 * self.dep.layout.rows * len(self.dep.replicas)

    @property
    def in_flight(self) -> int:
        return len(self.items)

    def submit(self, item: dict) -> None:
        rid = self.dep.submit([item["ids"]], self.max_new_tokens)[0]
        self.items[rid] = item

    def step(self) -> list[dict]:
        ended = self.dep.step()
        if not ended and not any(rep.engine.has_work for rep in self.dep._live()):
            ended = [seq for seq, _ in self.dep.requests.values() if seq.done]  # failed with no live replica
        rows = []
        for seq in ended:
            self.dep.requests.pop(seq.seq_id, None)
            rows.append(result_row(self.items.pop(seq.seq_id), seq, self.tokenizer))
        return rows

    def runtime_shape(self) -> dict:
        return self.dep.runtime_shape()

    def shutdown(self) -> None:
        self.dep.shutdown()
