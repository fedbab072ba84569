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
actors, each driving one engine replica — the same continuous-batching engine as ``generate``,
its host stores in the actor's process — with ``max_concurrent_batches`` batches in flight per
actor so its running batch stays full) → ``postprocess`` (``Dataset.map``). Rows that fail
(tokenization, a prompt that cannot fit, an engine failure) carry the reason in ``error`` instead
of stopping the pipeline; ``postprocess`` sees them too.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np

from icecache_ray.config import POLICIES, IceCacheConfig, _fail, _positive_int
from icecache_ray.serving_config import EngineConfig

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("generated_text", "generated_ids", "generated_tokens", "prompt_tokens", "truncated", "error")


@dataclass(frozen=True)
class IceCacheEngineProcessorConfig:
    """What :func:`build_processor` builds (validated on construction, ``ValueError`` naming the field).

    model_source: a saved model folder (default: the bundled SmolLM2).
    policy / budget: the KV policy (``IceCacheConfig``). max_new_tokens: per row (greedy, stops at EOS).
    max_running / max_step_tokens: each replica's continuous batching (``EngineConfig``).
    batch_size: rows per ``map_batches`` call. concurrency: engine actors (replicas).
    max_concurrent_batches: batches in flight per actor (Ray Core ``max_concurrency``).
    num_cpus / num_gpus: what each engine actor requests. threads: torch threads in it.
    truncate: middle-truncate prompts longer than the context (else such a row is an error).
    """

    model_source: str | None = None
    policy: str = "icecache"
    budget: int = 256
    max_new_tokens: int = 128
    max_running: int = 8
    max_step_tokens: int = 2048
    batch_size: int = 8
    concurrency: int = 1
    max_concurrent_batches: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1
    truncate: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("max_new_tokens", "max_running", "max_step_tokens", "batch_size", "concurrency", "max_concurrent_batches", "threads"):
            _positive_int(name, f, getattr(self, f))
        if self.policy not in POLICIES:
            _fail(name, "policy", self.policy, f"must be one of {list(POLICIES)}")
        for f in ("num_cpus", "num_gpus"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                _fail(name, f, value, "must be a number >= 0")
        self.ice_config()
        self.engine_config()

    def ice_config(self) -> IceCacheConfig:
        return IceCacheConfig(policy=self.policy, budget=self.budget)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_running=self.max_running, max_step_tokens=self.max_step_tokens)

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
    import ray.data

    if not isinstance(config, IceCacheEngineProcessorConfig):
        raise ValueError(f"config={config!r}: must be an IceCacheEngineProcessorConfig")
    stages: list[Callable] = []
    if preprocess is not None:
        stages.append(lambda ds: ds.map(preprocess, **(preprocess_map_kwargs or {})))
    stages.append(lambda ds: ds.map_batches(tokenize_batch, fn_kwargs={"model_source": config.model_source},
                                            batch_size=config.batch_size, num_cpus=1))
    # as ray.data.llm: more tasks in flight per actor than it runs at once, so one is always queued
    compute = ray.data.ActorPoolStrategy(size=config.concurrency, max_concurrent_calls_per_actor=config.max_concurrent_batches,
                                         max_tasks_in_flight_per_actor=2 * config.max_concurrent_batches)
    stages.append(lambda ds: ds.map_batches(IceCacheEngineStage, fn_constructor_kwargs={"config": config},
                                            batch_size=config.batch_size, compute=compute,
                                            num_cpus=config.num_cpus, num_gpus=config.num_gpus))
    if postprocess is not None:
        stages.append(lambda ds: ds.map(postprocess, **(postprocess_map_kwargs or {})))
    return Processor(config, stages)


# ---------------------------------------------------------------------------- tokenize (CPU tasks)
_TOKENIZERS: dict = {}


def _tokenizer(model_source):
    if model_source not in _TOKENIZERS:
        from icecache_ray.model import load_tokenizer, model_folder

        _TOKENIZERS[model_source] = load_tokenizer(model_folder(model_source))
    return _TOKENIZERS[model_source]


def tokenize_batch(batch: dict, model_source=None) -> dict:
    """Add ``prompt_ids`` (and ``error`` where a row cannot be tokenized) to a batch."""
    tokenizer = _tokenizer(model_source)
    n = len(next(iter(batch.values())))
    ids, errors = [], []
    for i in range(n):
        try:
            ids.append(_row_ids(tokenizer, {k: v[i] for k, v in batch.items()}))
            errors.append(None)
        except (ValueError, TypeError, KeyError) as exc:
            ids.append([])
            errors.append(f"could not tokenize: {exc}")
    errors = [_error_of(batch, i) or e for i, e in enumerate(errors)]
    return {**batch, "prompt_ids": _object_column(ids), "error": _object_column(errors)}


def _row_ids(tokenizer, row: dict) -> list[int]:
    if row.get("prompt_ids") is not None and len(row["prompt_ids"]):
        return [int(t) for t in row["prompt_ids"]]
    if row.get("messages") is not None and len(row["messages"]):
        messages = [dict(m) for m in row["messages"]]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    raise ValueError("the row has no non-empty 'prompt_ids', 'messages' or 'prompt'")


def _error_of(batch: dict, i: int) -> str | None:
    """Row ``i``'s earlier error, if any (Ray Data turns a column of ``None`` into NaN)."""
    value = batch["error"][i] if "error" in batch else None
    return value if isinstance(value, str) and value else None


def _object_column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ---------------------------------------------------------------------------- generate (actors)
class IceCacheEngineStage:
    """One engine replica in a Ray Data actor: a background thread steps the engine while
    ``__call__`` (async, several batches at once) queues a batch's rows and awaits them."""

    def __init__(self, config: IceCacheEngineProcessorConfig) -> None:
        import torch

        from icecache_ray.engine.local import LocalEngine
        from icecache_ray.model import load_model

        torch.set_num_threads(config.threads)
        self.config = config
        self.model, self.tokenizer = load_model(config.model_source)
        if config.num_gpus > 0 and torch.cuda.is_available():
            self.model.to("cuda")
        self.engine = LocalEngine(self.model, config.ice_config(), config.engine_config())
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._step_until_closed, name="icecache-engine", daemon=True)
        self._thread.start()
        # Ray Data ends its actors without a call of ours: free the engine's shared-memory pool
        # when the process exits (a killed actor leaves its icr_ segment; Deployment-style sweeps
        # of /dev/shm are what catch those)
        atexit.register(self.close)

    def _step_until_closed(self) -> None:
        while not self._closed:
            if not self.engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                ended = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - an engine failure becomes every waiting row's error
                log.exception("engine step failed")
                ended = self.engine.fail(f"engine step failed: {type(exc).__name__}: {exc}")
            for seq in ended:
                loop, future = self._waiters.pop(seq.seq_id, (None, None))
                if future is not None:
                    loop.call_soon_threadsafe(_resolve, future, seq)

    async def __call__(self, batch: dict) -> dict:
        from icecache_ray.engine.generate import prepare_prompt
        from icecache_ray.engine.sequence import Sequence

        loop = asyncio.get_running_loop()
        n = len(batch["prompt_ids"])
        pending: list = []
        for i in range(n):
            earlier = _error_of(batch, i)
            if earlier:
                pending.append(earlier)
                continue
            try:
                ids, truncated = prepare_prompt(self.model.config, [int(t) for t in batch["prompt_ids"][i]],
                                                self.config.max_new_tokens, self.config.truncate)
            except ValueError as exc:
                pending.append(f"invalid prompt: {exc}")
                continue
            seq = Sequence(ids, self.config.max_new_tokens, self.tokenizer.eos_token_id, truncated)
            future = loop.create_future()
            self._waiters[seq.seq_id] = (loop, future)  # before add: the engine thread may finish it at once
            try:
                self.engine.add(seq)
            except (ValueError, RuntimeError) as exc:  # refused (can never fit) or the engine is down
                self._waiters.pop(seq.seq_id, None)
                pending.append(str(exc))
                continue
            pending.append(future)
            self._wake.set()
        results = [await p if isinstance(p, asyncio.Future) else p for p in pending]
        return {**{k: v for k, v in batch.items() if k != "error"}, **self._columns(results)}

    def _columns(self, results: list) -> dict:
        cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
        for res in results:
            failed = isinstance(res, str) or res.error
            cols["error"].append(res if isinstance(res, str) else res.error)
            cols["generated_ids"].append([] if failed else list(res.output))
            cols["generated_text"].append("" if failed else self.tokenizer.decode(res.output, skip_special_tokens=True))
            cols["generated_tokens"].append(0 if failed else len(res.output))
            cols["prompt_tokens"].append(0 if isinstance(res, str) else res.prompt_len)
            cols["truncated"].append(False if isinstance(res, str) else bool(res.truncated))
        return {c: _object_column(v) if c in ("error", "generated_ids") else np.asarray(v) for c, v in cols.items()}

    def close(self) -> None:
        """Stop stepping and free the engine's rows, stores and pool (idempotent)."""
        self._closed = True
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)  # the stepping thread reads self.engine until it sees _closed
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def __del__(self) -> None:
        self.close()


def _resolve(future: asyncio.Future, seq) -> None:
    if not future.done():
        future.set_result(seq)
