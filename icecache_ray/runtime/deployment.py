"""The Python API for deployments: replicas of pipelined stage workers with index actors on Ray.

::

    from icecache_ray import Deployment, DeploymentConfig, IceCacheConfig
    dep = Deployment(DeploymentConfig(replicas=2, stages=2), IceCacheConfig(budget=256))
    results = dep.generate([ids_a, ids_b], max_new_tokens=64)   # list of GenerationResult
    for token in dep.stream(ids_c, max_new_tokens=32): ...
    dep.stats(); dep.shutdown()

The driver keeps, per request group, only the greedy-decoding state (:class:`GreedyBatch`);
each scheduling round it admits waiting groups (host-pool admission control), then launches one
call chain per active group through its replica's stages (hidden states pass worker to worker
through the object store) and collects the next tokens. Groups on different replicas run in
parallel and groups of one replica overlap across its stages; new groups join between rounds.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterator

from icecache_ray.config import IceCacheConfig
from icecache_ray.runtime.admission import DeploymentConfig, PoolBudget, group_pages

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """Some requests of a ``generate`` call failed; ``errors`` maps prompt index -> reason and
    ``results`` holds the others (``None`` where failed)."""

    def __init__(self, errors: dict[int, str], results: list) -> None:
        super().__init__("; ".join(f"prompt {i}: {e}" for i, e in sorted(errors.items())))
        self.errors, self.results = errors, results


@dataclass
class _Group:
    gid: str
    prompts: list[list[int]]
    truncated: list[bool]
    batch: object  # GreedyBatch
    need: dict = field(default_factory=dict)
    replica: int | None = None
    started: bool = False
    finished: bool = False
    error: str | None = None
    stats: dict = field(default_factory=dict)
    t0: float = 0.0


class Deployment:
    """A model served by Ray actors (see module docstring)."""

    def __init__(self, config: DeploymentConfig | None = None, ice: IceCacheConfig | None = None, model_path=None) -> None:
        from icecache_ray.engine.cache import check_model
        from icecache_ray.runtime.stage import stage_ranges

        self.config = config or DeploymentConfig()
        self.ice = ice or IceCacheConfig()
        if not isinstance(self.config, DeploymentConfig):
            raise ValueError(f"config={self.config!r}: must be a DeploymentConfig")
        if not isinstance(self.ice, IceCacheConfig):
            raise ValueError(f"ice={self.ice!r}: must be an IceCacheConfig")
        self.model_path = model_path
        self.model_config, self.tokenizer = _load_config(model_path)
        _, self.head_dim = check_model(SimpleNamespace(config=self.model_config), self.ice)
        self.ranges = stage_ranges(self.model_config.num_hidden_layers, self.config.stages, self.ice.n_full_layers, self.ice.layer_reuse)
        self.id = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.segments: list[str] = []
        self.replicas: list[dict] = []
        self.groups: dict[str, _Group] = {}
        self.waiting: list[_Group] = []
        self._ids = itertools.count()
        self._closed = False
        from icecache_ray import ray_utils

        import ray

        self._started_ray = not ray.is_initialized() and not (self.config.address or os.environ.get("RAY_ADDRESS"))
        self.ray = ray_utils.connect(self.config.address)
        try:
            self._spawn()
        except BaseException:
            self.shutdown()
            raise
        self.budget = PoolBudget(self._capacities())

    # ------------------------------------------------------------------ startup
    def _spawn(self) -> None:
        from icecache_ray.actors.spawn import spawn_index_actor, spawn_worker
        from ray.util.placement_group import placement_group

        dep, ray = self.config, self.ray
        for r in range(dep.replicas):
            replica = {"stages": [], "alive": True, "pgs": []}
            for s, layers in enumerate(self.ranges):
                pg = placement_group([dep.stage_bundle()], strategy="STRICT_PACK")
                replica["pgs"].append(pg)
                self._wait_placement(pg, r, s)
                names = [self._segment(f"r{r}s{s}i{k}") for k in range(dep.index_actors_per_stage)]
                index = [spawn_index_actor(ray, pg, dep, self.ice, self.head_dim, n) for n in names]
                worker = spawn_worker(ray, pg, dep, self.ice, self.model_path, layers, index, self._segment(f"r{r}s{s}inbox"))
                replica["stages"].append({"worker": worker, "index": index, "layers": [layers.start, layers.stop]})
            self.replicas.append(replica)
        for replica in self.replicas:
            infos = ray.get([st["worker"].ready.remote() for st in replica["stages"]], timeout=dep.call_timeout_s)
            for st, info in zip(replica["stages"], infos):
                st["info"] = info
        log.info("deployment %s: %d replica(s) x %d stage(s) ready", self.id, dep.replicas, dep.stages)

    def _segment(self, suffix: str) -> str:
        name = f"icr_{self.id}_{suffix}"
        self.segments.append(name)
        return name

    def _wait_placement(self, pg, r: int, s: int, timeout_s: float = 60.0) -> None:
        ready, _ = self.ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(
                f"replica {r} stage {s}: no node offers {self.config.stage_bundle()} within {timeout_s:.0f} s "
                f"(cluster has {self.ray.cluster_resources()}); lower replicas/stages or the resource requests")

    def _capacities(self) -> dict:
        cap = {}
        if self.ice.policy != "icecache" or not self.config.index_actors_per_stage:
            return cap
        for r, s, k in itertools.product(range(self.config.replicas), range(self.config.stages), range(self.config.index_actors_per_stage)):
            cap[(r, s, k)] = self.config.pages_per_index_actor
        return cap

    # ------------------------------------------------------------------ requests
    def submit(self, prompts: list, max_new_tokens: int = 64, truncate: bool = False, eos_token_id: int | None = None) -> list[str]:
        """Queue prompts (token-id lists) in groups of at most ``max_batch``; returns group ids.
        Every prompt is validated first (a bad one raises ValueError before anything is queued)."""
        from icecache_ray.engine.generate import prepare_prompts
        from icecache_ray.runtime.stage import GreedyBatch

        if self._closed:
            raise RuntimeError("this deployment was shut down")
        prepared = prepare_prompts(SimpleNamespace(config=self.model_config), prompts, max_new_tokens, truncate)
        eos = eos_token_id if eos_token_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        gids = []
        for start in range(0, len(prepared), self.config.max_batch):
            chunk = prepared[start : start + self.config.max_batch]
            ids = [p for p, _ in chunk]
            group = _Group(f"g{next(self._ids)}", ids, [t for _, t in chunk], GreedyBatch(ids, max_new_tokens, eos, eos if eos is not None else 0))
            group.need = self._pages_needed([len(p) for p in ids], max_new_tokens)
            self.groups[group.gid] = group
            self.waiting.append(group)
            gids.append(group.gid)
        return gids

    def _pages_needed(self, lengths: list[int], max_new_tokens: int) -> dict[tuple[int, int], int]:
        """Pages per (stage, index actor) of one group (layers dealt round-robin as the worker does)."""
        need = {}
        n_index = self.config.index_actors_per_stage
        if not self._capacities():
            return need
        for s, layers in enumerate(self.ranges):
            sparse = [i for i in layers if i >= self.ice.n_full_layers]
            for k in range(n_index):
                owned = len(sparse[k::n_index])
                need[(s, k)] = group_pages(lengths, max_new_tokens, owned, self.model_config.num_key_value_heads, self.ice.page_size)
        return need

    def generate(self, prompts: list, max_new_tokens: int = 64, truncate: bool = False, eos_token_id: int | None = None) -> list:
        """Greedy generation for every prompt; returns one ``GenerationResult`` per prompt, in order.
        Raises :class:`RequestFailed` (with the results that did finish) if any request failed."""
        gids = self.submit(prompts, max_new_tokens, truncate, eos_token_id)
        while not all(self.groups[g].finished for g in gids):
            self._round()
        return self._collect(gids)

    def stream(self, prompt, max_new_tokens: int = 64, truncate: bool = False, eos_token_id: int | None = None) -> Iterator[int]:
        """Yield the generated token ids of one prompt as they are produced (other requests keep
        being served meanwhile). Raises RuntimeError if the request fails."""
        gid = self.submit([prompt], max_new_tokens, truncate, eos_token_id)[0]
        group, sent = self.groups[gid], 0
        while True:
            tokens = group.batch.results()[0]
            yield from tokens[sent:]
            sent = len(tokens)
            if group.finished:
                self.groups.pop(gid, None)
                if group.error:
                    raise RuntimeError(f"request failed: {group.error}")
                return
            self._round()

    def _collect(self, gids: list[str]) -> list:
        from icecache_ray.engine.generate import GenerationResult

        results, errors = [], {}
        for gid in gids:
            group = self.groups.pop(gid)
            for ids, truncated, tokens in zip(group.prompts, group.truncated, group.batch.results()):
                if group.error:
                    errors[len(results)] = group.error
                    results.append(None)
                    continue
                text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
                results.append(GenerationResult(tokens, text, len(ids), truncated, dict(group.stats, batch_size=len(group.prompts))))
        if errors:
            raise RequestFailed(errors, results)
        return results

    # ------------------------------------------------------------------ scheduling
    def _round(self) -> None:
        """Admit what fits, advance every active group by one step, collect the tokens."""
        self._admit()
        active = [g for g in self.groups.values() if g.replica is not None and not g.finished]
        if not active:
            if self.waiting:
                raise RuntimeError("requests are waiting but none can run (no live replica)")
            return
        refs = {self._launch(g): g for g in active}
        ready, late = self.ray.wait(list(refs), num_returns=len(refs), timeout=self.config.call_timeout_s)
        for ref in ready:
            group = refs[ref]
            try:
                tokens = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                self._fail(group, f"replica {group.replica} failed: {_reason(exc)}", replica_dead=isinstance(exc, self.ray.exceptions.RayActorError))
                continue
            group.batch.advance(tokens)
            group.started = True
            if group.batch.done:
                self._finish(group)
        for ref in late:
            self._fail(refs[ref], f"replica {refs[ref].replica}: no answer within call_timeout_s={self.config.call_timeout_s}", replica_dead=True)

    def _admit(self) -> None:
        live = [r for r, rep in enumerate(self.replicas) if rep["alive"]]
        while self.waiting:
            group = self.waiting[0]
            if not live:
                self.waiting.pop(0)
                self._fail(group, "no live replica left (workers died); re-submit after redeploying")
                continue
            per_replica = {r: {(r,) + key: n for key, n in group.need.items()} for r in live}
            fits = [r for r in live if self.budget.fits(per_replica[r])]
            if not fits:
                if not any(self.budget.fits(per_replica[r], empty=True) for r in live):
                    self.waiting.pop(0)
                    most = max(group.need.values())
                    self._fail(group, f"needs ~{most} host pages on one index actor but each has {self.config.pages_per_index_actor} "
                                      f"(raise DeploymentConfig.pool_pages_per_node, or send shorter prompts / smaller batches)")
                    continue
                return  # wait for running groups to release pages
            r = min(fits, key=lambda r: sum(1 for g in self.groups.values() if g.replica == r and not g.finished))
            self.waiting.pop(0)
            self.budget.reserve(group.gid, per_replica[r])
            group.replica, group.t0 = r, time.perf_counter()

    def _launch(self, group: _Group):
        """Chain one call per stage; returns the ref of the last stage's next tokens [B]."""
        method = "decode" if group.started else "prefill"
        x, mask, pos = group.batch.step_inputs() if group.started else group.batch.prefill_inputs()
        ref = x
        for stage in self.replicas[group.replica]["stages"]:
            ref = getattr(stage["worker"], method).remote(group.gid, ref, mask, pos)
        return ref

    def _finish(self, group: _Group) -> None:
        group.finished = True
        self.budget.release(group.gid)
        stats = self._release_on_workers(group)
        merged = _merge_stage_stats(stats)
        group.stats = dict(merged, wall_s=time.perf_counter() - group.t0, generated_tokens=len(group.batch.tokens[0]))

    def _fail(self, group: _Group, reason: str, replica_dead: bool = False) -> None:
        log.error("request group %s failed: %s", group.gid, reason)
        group.finished, group.error = True, reason
        self.budget.release(group.gid)
        if group.replica is None:
            return
        if replica_dead:
            self.replicas[group.replica]["alive"] = False
            for other in self.groups.values():
                if other.replica == group.replica and not other.finished:
                    other.finished, other.error = True, reason
                    self.budget.release(other.gid)
        else:
            self._release_on_workers(group)

    def _release_on_workers(self, group: _Group) -> list[dict]:
        refs = [st["worker"].release.remote(group.gid) for st in self.replicas[group.replica]["stages"]]
        try:
            return self.ray.get(refs, timeout=self.config.call_timeout_s)
        except self.ray.exceptions.RayError as exc:
            log.warning("releasing group %s: %s", group.gid, _reason(exc))
            return []

    # ------------------------------------------------------------------ introspection and teardown
    def stats(self) -> dict:
        """Per replica and stage: worker and index-actor stats, placement; queue lengths."""
        out = {"deployment": self.id, "waiting_groups": len(self.waiting),
               "active_groups": sum(1 for g in self.groups.values() if g.replica is not None and not g.finished), "replicas": []}
        for r, rep in enumerate(self.replicas):
            stages = []
            for st in rep["stages"]:
                row = {"layers": st["layers"], "node_id": st.get("info", {}).get("node_id")}
                if rep["alive"]:
                    try:
                        row["worker"] = self.ray.get(st["worker"].stats.remote(), timeout=30)
                        row["index"] = self.ray.get([a.stats.remote() for a in st["index"]], timeout=30)
                    except self.ray.exceptions.RayError as exc:
                        row["error"] = _reason(exc)
                stages.append(row)
            out["replicas"].append({"alive": rep["alive"], "stages": stages})
        return out

    def shutdown(self) -> None:
        """Stop every actor, unlink every shared-memory segment of this deployment and, if this
        deployment started the local Ray, stop it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        from icecache_ray.actors.channel import remove_channels
        from icecache_ray.pool import remove_segment

        ray = self.ray if hasattr(self, "ray") else None
        if ray is not None and ray.is_initialized():
            for rep in self.replicas:
                for st in rep["stages"]:
                    _quietly(ray, st["worker"].close.remote())
                    for a in st["index"]:
                        _quietly(ray, a.close.remote())
                    for actor in [st["worker"], *st["index"]]:
                        ray.kill(actor, no_restart=True)
                for pg in rep["pgs"]:
                    ray.util.remove_placement_group(pg)
        for name in self.segments:  # what killed actors on this node could not unlink themselves
            remove_segment(name)
        remove_channels(f"icr_{self.id}_")
        if ray is not None and self._started_ray and ray.is_initialized():
            ray.shutdown()
        log.info("deployment %s shut down", self.id)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _load_config(model_path):
    """(model config, tokenizer) on the driver, without loading weights."""
    from transformers import AutoConfig, AutoTokenizer

    from icecache_ray.model import ensure_local_model

    folder = ensure_local_model() if model_path is None else model_path
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or holds no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    return AutoConfig.from_pretrained(folder), tokenizer


def _merge_stage_stats(stats: list[dict]) -> dict:
    """Sum the per-stage step-stat summaries (times add up along the pipeline)."""
    merged: dict = {}
    for row in stats:
        for key, value in row.items():
            if key == "hit_rate":
                merged.setdefault("hit_rates", []).append(value)
            elif key == "steps":
                merged["steps"] = max(merged.get("steps", 0), value)
            else:
                merged[key] = merged.get(key, 0) + value
    rates = merged.pop("hit_rates", [])
    if rates:
        merged["hit_rate"] = sum(rates) / len(rates)
    return merged


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _quietly(ray, ref, timeout_s: float = 30.0) -> None:
    try:
        ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - teardown goes on whatever one actor says
        log.debug("teardown call failed: %s", _reason(exc))
