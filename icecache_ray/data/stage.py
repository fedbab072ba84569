"""The generate stage of the Ray Data pipelines: one engine replica per Ray Data actor."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time

import numpy as np

from icecache_ray.data.attempts import batch_key
from icecache_ray.data.columns import batch_len, error_of, object_column
from icecache_ray.data.inflight import TokenMeter

log = logging.getLogger(__name__)

STAT_COLUMNS = ("wall_s", "queue_s", "ttft_s", "decode_steps", "select_ms_per_step", "load_ms_per_step",
                "attend_ms_per_step", "pages_loaded", "bytes_loaded", "hit_rate")
OUTPUT_COLUMNS = ("generated_text", "generated_ids", "generated_tokens", "prompt_tokens", "truncated", "error", *STAT_COLUMNS)
REPORT_S = 1.0  # how often a replica tells the progress actor its work (while it has work)
INDEX_MODES = ("auto", "in_process", "actors")
ACTORS_MIN_CPUS = 8  # index_mode="auto": index actors on nodes with at least this many CPUs, in-process below


def resolve_index_mode(mode: str, node_cpus: float, stages: int = 1) -> str:
    """``"in_process"`` or ``"actors"``: ``mode`` itself, or for ``"auto"`` index actors on a node
    of at least :data:`ACTORS_MIN_CPUS` CPUs (on fewer, the actors' processes and same-node calls
    cost more than the GIL they free; measured in docs/benchmarks.md) or when a replica spans
    several ``stages``, in-process otherwise."""
    if mode not in INDEX_MODES:
        raise ValueError(f"index_mode={mode!r}: must be one of {list(INDEX_MODES)}")
    if mode != "auto":
        return mode
    return "actors" if node_cpus >= ACTORS_MIN_CPUS or stages > 1 else "in_process"


def largest_node_cpus(ray) -> float:
    """The CPUs of the cluster's largest live node (what ``index_mode="auto"`` decides on)."""
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def replica_shape(config) -> dict:
    """Per engine replica of ``config`` (an ``IceCacheEngineProcessorConfig`` with a resolved
    ``index_mode``): its ``stage_workers`` and ``index_actors`` (the layout's rule)."""
    if config.index_mode == "in_process":
        return {"stage_workers": 0, "index_actors": 0}
    from icecache_ray.runtime.replica import index_actors_per_stage

    dep = config.deployment_config()
    return {"stage_workers": dep.stages, "index_actors": dep.stages * index_actors_per_stage(config.ice_config(), dep)}


class IceCacheEngineStage:
    """One engine replica in a Ray Data actor: a background thread steps the engine while
    ``__call__`` (async, several batches at once) queues a batch's rows and awaits them.

    ``config.index_mode``: ``"in_process"`` runs a :class:`~icecache_ray.engine.local.LocalEngine`
    in this actor (model, rows and host stores in one process); ``"actors"`` drives a replica of
    the Ray runtime (:func:`~icecache_ray.runtime.replica.spawn_replica`, the code a ``Deployment``
    runs): ``config.stages`` stage workers holding the model and the device rows, each with an
    index actor owning its sparse layers' host stores, all on this actor's node (hard node
    affinity; they are this actor's actors and die with it); this actor keeps the scheduler. ``"auto"`` is resolved
    here from this node's CPUs (:func:`resolve_index_mode`; ``generate_stage`` resolves it on the
    driver already).

    ``attempts``: an :class:`~icecache_ray.data.attempts.Attempts` actor; a batch on an attempt past
    ``config.max_attempts`` (its replica died that often) returns error rows without generating.
    ``progress``: an :class:`~icecache_ray.data.inflight.InFlight` actor told this replica's work
    (prompt tokens prefilled, tokens generated) every ``REPORT_S`` seconds while it has work.
    """

    def __init__(self, config, attempts=None, progress=None) -> None:
        import torch

        from icecache_ray.engine.local import LocalEngine
        from icecache_ray.model import load_model
        from icecache_ray.pool import remove_orphaned_segments

        torch.set_num_threads(config.threads)
        for name in remove_orphaned_segments():  # e.g. the pool of this actor's killed predecessor
            log.warning("removed shared-memory segment %s of a process that is gone", name)
        self.config, self.attempts, self.progress = config, attempts, progress
        self.meter, self._replica = TokenMeter(), _replica_key()
        self._reported_at, self._unreported = float("-inf"), False
        self.index_mode = resolve_index_mode(config.index_mode, os.cpu_count() or 1, config.stages)
        self.replica = None
        if self.index_mode == "actors":
            self._start_replica()
        else:
            self.model, self.tokenizer = load_model(config.model_source)
            self.model_config = self.model.config
            if config.num_gpus > 0 and torch.cuda.is_available():
                self.model.to("cuda")
            self.engine = LocalEngine(self.model, config.ice_config(), config.engine_config())
            self.rows = self.engine.rows
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._wake = threading.Event()
        self._closed = False
        self.peak_in_flight = 0
        self._thread = threading.Thread(target=self._step_until_closed, name="icecache-engine", daemon=True)
        self._thread.start()
        # Ray Data ends its actors without a call of ours: free the engine's shared-memory pool
        # when the process exits (a killed actor leaves its icr_ segment; Deployment-style sweeps
        # of /dev/shm are what catch those)
        atexit.register(self.close)

    def _start_replica(self) -> None:
        """``index_mode="actors"``: spawn and wait for this actor's replica (stage workers + index actors)."""
        import ray

        from icecache_ray.runtime.deployment import load_model_config
        from icecache_ray.runtime.replica import spawn_replica

        self.model_config, self.tokenizer = load_model_config(self.config.model_source)
        if self.tokenizer is None:
            raise ValueError(f"model_source={self.config.model_source!r}: the Ray Data stage needs the model's tokenizer")
        node = ray.get_runtime_context().get_node_id()
        self.replica = spawn_replica(ray, self.model_config, self.config.ice_config(), self.config.deployment_config(),
                                     self.config.model_source, node_id=node)
        self.engine, self.rows = self.replica.engine, self.replica.owner.layout.rows
        log.info("engine replica: %s, %d row(s)", self.replica.shape(), self.rows)

    def _step_until_closed(self) -> None:
        while not self._closed:
            if not self.engine.has_work:
                self._report(idle=True)  # the last count before going idle
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                ended = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - an engine failure becomes every waiting row's error
                log.exception("engine step failed")
                ended = self.engine.fail(f"engine step failed: {type(exc).__name__}: {exc}")
            for seq in ended:
                self.meter.ended(seq)
                loop, future = self._waiters.pop(seq.seq_id, (None, None))
                if future is not None:
                    loop.call_soon_threadsafe(_resolve, future, seq)
            self._report()

    def _report(self, idle: bool = False) -> None:
        """Tell the progress actor this replica's work: after a step at most every REPORT_S
        seconds, and once more on going ``idle`` if a step since was not told."""
        if self.progress is None:
            return
        now = time.monotonic()
        if idle and not self._unreported:
            return
        if not idle and now - self._reported_at < REPORT_S:
            self._unreported = True
            return
        self._reported_at, self._unreported = now, False
        try:
            self.progress.report.remote(self._replica, *self.meter.totals())
        except Exception as exc:  # noqa: BLE001 - progress must never stop generation
            log.debug("progress report failed: %s", exc)

    async def __call__(self, batch: dict) -> dict:
        key = batch_key(batch) if self.attempts is not None else None
        attempt = await self._attempt(key) if key is not None else 1
        try:
            if attempt > self.config.max_attempts:
                why = (f"not generated: the replica running it died {attempt - 1} time(s) "
                       f"(max_attempts={self.config.max_attempts})")
                log.error("batch of %d row(s): %s", batch_len(batch), why)
                results = [error_of(batch, i) or why for i in range(batch_len(batch))]
            else:
                results = await self._generate(batch)
        finally:
            if key is not None:
                self.attempts.end.remote(key)
        return {**{k: v for k, v in batch.items() if k != "error"}, **self._columns(results)}

    async def _attempt(self, key: str) -> int:
        """This batch's attempt number; 1 when the attempts actor cannot answer (the batch is then
        generated: losing the count must not lose the rows)."""
        try:
            return await self.attempts.begin.remote(key)
        except Exception as exc:  # noqa: BLE001 - ray.exceptions.RayActorError and kin
            log.warning("attempts actor unavailable (%s): generating the batch", type(exc).__name__)
            return 1

    async def _generate(self, batch: dict) -> list:
        """Each row's ended :class:`Sequence`, or the reason it was not generated."""
        from icecache_ray.engine.generate import prepare_prompt
        from icecache_ray.engine.sequence import Sequence

        loop = asyncio.get_running_loop()
        pending: list = []
        for i in range(batch_len(batch)):
            earlier = error_of(batch, i)
            if earlier:
                pending.append(earlier)
                continue
            try:
                ids, truncated = prepare_prompt(self.model_config, [int(t) for t in batch["prompt_ids"][i]],
                                                self.config.max_new_tokens, self.config.truncate)
            except ValueError as exc:
                pending.append(f"invalid prompt: {exc}")
                continue
            seq = Sequence(ids, self.config.max_new_tokens, self.tokenizer.eos_token_id, truncated)
            future = loop.create_future()
            self._waiters[seq.seq_id] = (loop, future)  # before add: the engine thread may finish it at once
            self.meter.add(seq)
            try:
                self.engine.add(seq)
            except (ValueError, RuntimeError) as exc:  # refused (can never fit) or the engine is down
                self._waiters.pop(seq.seq_id, None)
                self.meter.ended(seq)
                pending.append(str(exc))
                continue
            pending.append(future)
            self._wake.set()
        if len(self._waiters) > self.peak_in_flight:
            self.peak_in_flight = len(self._waiters)
            log.info("%d rows in flight in this replica (its engine runs up to %d at once)", self.peak_in_flight, self.rows)
        return [await p if isinstance(p, asyncio.Future) else p for p in pending]

    def _columns(self, results: list) -> dict:
        cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
        for res in results:
            failed = isinstance(res, str) or bool(res.error)
            cols["error"].append(res if isinstance(res, str) else res.error)
            cols["generated_ids"].append([] if failed else list(res.output))
            cols["generated_text"].append("" if failed else self.tokenizer.decode(res.output, skip_special_tokens=True))
            cols["generated_tokens"].append(0 if failed else len(res.output))
            cols["prompt_tokens"].append(0 if isinstance(res, str) else res.prompt_len)
            cols["truncated"].append(False if isinstance(res, str) else bool(res.truncated))
            stats = _NO_STATS if isinstance(res, str) else res.stats.columns()
            for c in STAT_COLUMNS:
                cols[c].append(stats[c])
        return {c: object_column(v) if c in ("error", "generated_ids") else np.asarray(v) for c, v in cols.items()}

    def close(self) -> None:
        """Stop stepping and free the engine's rows, stores and pool (idempotent)."""
        self._closed = True
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)  # the stepping thread reads self.engine until it sees _closed
        engine, self.engine = getattr(self, "engine", None), None
        replica, self.replica = getattr(self, "replica", None), None
        if replica is not None:
            from icecache_ray.runtime.replica import close_replica

            close_replica(replica)  # its actors, shared-memory segments and channels
        elif engine is not None:
            engine.close()

    def __del__(self) -> None:
        self.close()


def _replica_key() -> str:
    """This replica incarnation: its Ray actor id and process (a restarted actor counts afresh)."""
    try:
        import ray

        actor = ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests): the process alone
        actor = None
    return f"{actor}:{os.getpid()}"


_NO_STATS = {c: (0 if c in ("decode_steps", "pages_loaded", "bytes_loaded") else float("nan")) for c in STAT_COLUMNS}


def _resolve(future: asyncio.Future, seq) -> None:
    if not future.done():
        future.set_result(seq)
