"""The Python API for deployments: replicas of pipelined stage workers with index actors on Ray.

::

    from icecache_ray import Deployment, DeploymentConfig, EngineConfig, IceCacheConfig
    dep = Deployment(DeploymentConfig(replicas=2, stages=2, engine=EngineConfig(max_running=8)), IceCacheConfig(budget=256))
    results = dep.generate([ids_a, ids_b], max_new_tokens=64)   # list of GenerationResult
    for token in dep.stream(ids_c, max_new_tokens=32): ...      # the other requests keep decoding
    rid = dep.submit([ids_d])[0]; dep.step(); dep.poll(rid)
    dep.stats(); dep.shutdown()

Each replica is the same :class:`~icecache_ray.engine.engine.Engine` as the local one (its
scheduler runs here, in the driver), whose stages are Ray stage workers: every step is one chain
of calls through the replica's stages carrying the plan and the packed tokens, hidden states go
worker to worker through the object store, and the next-token ids come back. Replicas step at the
same time. A request goes to the replica with the least work; a dead replica's running sequences
fail with the reason, its waiting ones move to a live replica.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Iterator

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.sequence import Sequence, SeqStatus
from icecache_ray.serving_config import DeploymentConfig

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """Some requests of a ``generate`` call failed; ``errors`` maps prompt index -> reason and
    ``results`` holds the others (``None`` where failed)."""

    def __init__(self, errors: dict[int, str], results: list) -> None:
        super().__init__("; ".join(f"prompt {i}: {e}" for i, e in sorted(errors.items())))
        self.errors, self.results = errors, results


class Deployment:
    """A model served by Ray actors (see module docstring)."""

    def __init__(self, config: DeploymentConfig | None = None, ice: IceCacheConfig | None = None, model_path=None) -> None:
        from icecache_ray.runtime.replica import build_layout

        self.config = config or DeploymentConfig()
        self.ice = ice or IceCacheConfig()
        if not isinstance(self.config, DeploymentConfig):
            raise ValueError(f"config={self.config!r}: must be a DeploymentConfig")
        if not isinstance(self.ice, IceCacheConfig):
            raise ValueError(f"ice={self.ice!r}: must be an IceCacheConfig")
        self.model_path = model_path
        self.model_config, self.tokenizer = load_model_config(model_path)
        self.layout = build_layout(self.model_config, self.ice, self.config)  # validates before any actor
        self.id = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.replicas: list = []
        self.requests: dict[str, tuple[Sequence, int]] = {}  # request id -> (sequence, replica)
        self._closed = False
        import ray

        from icecache_ray import ray_utils

        self._started_ray = not ray.is_initialized() and not (self.config.address or os.environ.get("RAY_ADDRESS"))
        self.ray = ray_utils.connect(self.config.address)
        try:
            self._spawn()
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self) -> None:
        from icecache_ray.runtime.replica import Replica

        rows = self.layout.rows_for(self.ray)
        for r in range(self.config.replicas):
            self.replicas.append(Replica(self.ray, self, r, rows))
        for replica in self.replicas:
            replica.wait_ready(self.config.call_timeout_s)
        log.info("deployment %s: %d replica(s) x %d stage(s), %d row(s) each, ready", self.id, self.config.replicas,
                 self.config.stages, rows)

    # ------------------------------------------------------------------ requests
    def submit(self, prompts: list, max_new_tokens: int = 64, truncate: bool = False, eos_token_id: int | None = None) -> list[str]:
        """Queue prompts (token-id lists); returns one request id each. Every prompt is validated
        first (a bad one raises ValueError before anything is queued, and so does one that can
        never fit a replica's rows or host pools)."""
        from icecache_ray.engine.generate import prepare_prompts

        if self._closed:
            raise RuntimeError("this deployment was shut down")
        prepared = prepare_prompts(self.model_config, prompts, max_new_tokens, truncate)
        eos = eos_token_id if eos_token_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        seqs = [Sequence(ids, max_new_tokens, eos, truncated) for ids, truncated in prepared]
        live = self._live()
        if not live:
            raise RuntimeError("no live replica left (workers died); redeploy")
        for i, seq in enumerate(seqs):
            try:
                live[0].engine.scheduler.check(seq)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        for seq in seqs:
            self._route(seq)
        return [s.seq_id for s in seqs]

    def _live(self) -> list:
        return [rep for rep in self.replicas if rep.engine.alive]

    def _route(self, seq: Sequence) -> None:
        replica = min(self._live(), key=lambda rep: rep.load)
        replica.engine.add(seq)
        self.requests[seq.seq_id] = (seq, replica.index)

    def poll(self, request_id: str) -> dict:
        """Status of a request without waiting: ``status``, ``tokens`` so far, ``error``."""
        seq, _ = self._request(request_id)
        return {"status": seq.status.value, "tokens": list(seq.output), "error": seq.error}

    def _request(self, request_id: str) -> tuple[Sequence, int]:
        if request_id not in self.requests:
            raise KeyError(f"unknown request id {request_id!r}")
        return self.requests[request_id]

    def step(self) -> list[Sequence]:
        """Advance every replica with work by one step (at the same time). Returns the sequences
        that ended."""
        launched = [(rep, rep.engine.launch()) for rep in self._live() if rep.engine.has_work]
        ended = []
        for rep, pending in launched:
            if pending is not None:
                ended += rep.engine.complete(pending)
            if not rep.engine.alive:
                ended = [s for s in ended if not self._moved(s)]
        return ended

    def _moved(self, seq: Sequence) -> bool:
        """A sequence of a dead replica that never started goes to a live replica instead."""
        if seq.stats.admitted_at is not None or not self._live():
            return False
        seq.status, seq.error, seq.finish_reason = SeqStatus.WAITING, None, None
        self._route(seq)
        return True

    def _drive(self, ids: list[str]) -> None:
        while not all(self.requests[i][0].done for i in ids):
            if not self._live():
                for i in ids:
                    seq = self.requests[i][0]
                    if not seq.done:
                        seq.status, seq.error = SeqStatus.FAILED, "no live replica left (workers died); re-submit after redeploying"
                return
            self.step()

    def generate(self, prompts: list, max_new_tokens: int = 64, truncate: bool = False, eos_token_id: int | None = None) -> list:
        """Greedy generation for every prompt; one ``GenerationResult`` per prompt, in order.
        Raises :class:`RequestFailed` (with the results that did finish) if any request failed."""
        ids = self.submit(prompts, max_new_tokens, truncate, eos_token_id)
        self._drive(ids)
        return self._collect(ids)

    def stream(self, prompt, max_new_tokens: int = 64, truncate: bool = False, eos_token_id: int | None = None) -> Iterator[int]:
        """Yield the generated token ids of one prompt as they are produced (the other requests keep
        being served meanwhile). Raises RuntimeError if the request fails."""
        rid = self.submit([prompt], max_new_tokens, truncate, eos_token_id)[0]
        seq, sent = self.requests[rid][0], 0
        while True:
            yield from seq.output[sent:]
            sent = len(seq.output)
            if seq.done:
                self.requests.pop(rid, None)
                if seq.error:
                    raise RuntimeError(f"request failed: {seq.error}")
                return
            self._drive_once(seq)

    def _drive_once(self, seq: Sequence) -> None:
        if not self._live():
            seq.status, seq.error = SeqStatus.FAILED, "no live replica left"
            return
        self.step()

    def result(self, request_id: str):
        """The ``GenerationResult`` of a finished request (and forget it)."""
        return self._collect([request_id])[0]

    def _collect(self, ids: list[str]) -> list:
        from icecache_ray.engine.generate import result_of

        results, errors = [], {}
        for i, rid in enumerate(ids):
            seq, _ = self.requests.pop(rid)
            if seq.error or not seq.done:
                errors[i] = seq.error or "not finished"
                results.append(None)
            else:
                results.append(result_of(seq, self.tokenizer))
        if errors:
            raise RequestFailed(errors, results)
        return results

    # ------------------------------------------------------------------ introspection and teardown
    def stats(self) -> dict:
        """Per replica: engine steps, queues, and per stage its worker's and index actors' stats."""
        return {"deployment": self.id, "rows": self.layout.rows, "max_seq_len": self.layout.max_seq_len,
                "replicas": [rep.stats() for rep in self.replicas]}

    def runtime_shape(self) -> dict:
        """What runs where: engine, replicas, stages, stage workers, index actors, rows."""
        n_index = self.layout.index_actors_per_stage
        return {"engine": "ray", "replicas": len(self.replicas), "stages": self.config.stages,
                "stage_workers": len(self.replicas) * self.config.stages,
                "index_actors": len(self.replicas) * self.config.stages * n_index, "max_running": self.layout.rows}

    def shutdown(self) -> None:
        """Stop every actor, unlink every shared-memory segment of this deployment and, if this
        deployment started the local Ray, stop it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        from icecache_ray.runtime.replica import sweep_node

        ray = getattr(self, "ray", None)
        if ray is not None and ray.is_initialized():
            for rep in self.replicas:
                rep.shutdown()
        sweep_node(f"icr_{self.id}_")  # what killed actors could not unlink themselves
        if ray is not None and self._started_ray and ray.is_initialized():
            ray.shutdown()
        log.info("deployment %s shut down", self.id)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def load_model_config(model_path):
    """(model config, tokenizer or None) on the driver, without loading weights; FileNotFoundError
    naming the path when it is not a saved model."""
    from transformers import AutoConfig

    from icecache_ray.model import load_tokenizer, model_folder

    folder = model_folder(model_path)
    try:
        tokenizer = load_tokenizer(folder)
    except ValueError:
        tokenizer = None  # token ids in, token ids out: a deployment can serve a model without one
    return AutoConfig.from_pretrained(folder), tokenizer
