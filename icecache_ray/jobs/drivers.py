"""Where the batch job's documents go: :func:`run_local` (this process, one engine) or
:func:`run_ray` (the Ray Data pipeline of :mod:`icecache_ray.jobs.pipeline`). Both hand every
ended document to the same :class:`~icecache_ray.jobs.sink.ResultSink` and return the runtime's
shape for ``run.json``."""

from __future__ import annotations

import logging
import os
from collections import deque

from icecache_ray.config import IceCacheConfig
from icecache_ray.jobs.inputs import read_documents
from icecache_ray.jobs.pipeline import JobSpec
from icecache_ray.jobs.prompts import document_prompt
from icecache_ray.jobs.sink import ResultSink, output_row, plain
from icecache_ray.serving_config import EngineConfig

log = logging.getLogger("icecache_ray.jobs.summarize")


def replica_threads(requested: int) -> int:
    """Torch threads per engine: ``--threads``, else this machine's cores (at most 8)."""
    return requested or min(8, os.cpu_count() or 1)


def prepare(docs, tokenizer, spec: JobSpec, sink: ResultSink) -> list[dict]:
    """Chat prompts for the documents; a document that cannot be prepared becomes an error."""
    items = []
    for doc in docs:
        prompt, error = document_prompt(tokenizer, doc.text, spec.instruction, spec.max_prompt_tokens)
        if error:
            sink.add_error(doc.id, doc.source, error)
            continue
        if prompt.truncated:
            log.warning("%s: %d tokens, middle-truncated to fit the %d-token prompt", doc.id, prompt.document_tokens,
                        spec.max_prompt_tokens)
        items.append({"id": doc.id, "source": doc.source, "ids": prompt.ids, "document_tokens": prompt.document_tokens, "truncated": prompt.truncated})
    return items


def generate_all(engine, items: list[dict], on_rows, on_step=None) -> None:
    """Feed documents to the engine as it has room, step it, and hand every ended document's row
    to ``on_rows`` (a document the engine refuses is an error row); ``on_step()`` after each step."""
    queue = deque(items)
    while queue or engine.in_flight:
        refused = []
        while queue and engine.in_flight < engine.capacity:
            item = queue.popleft()
            try:
                engine.submit(item)
            except (ValueError, RuntimeError) as exc:
                refused.append({"id": item["id"], "error": str(exc)})
        rows = refused + (engine.step() if engine.in_flight else [])
        if on_step is not None:
            on_step()
        if rows:
            on_rows(rows)


def run_local(args, spec: JobSpec, config: IceCacheConfig, engine_cfg: EngineConfig, files: list[str], done: set[str],
              sink: ResultSink) -> dict:
    """The job in this process: documents read here, one local engine. Returns the runtime shape."""
    from icecache_ray.jobs.engines import LocalJobEngine
    from icecache_ray.model import load_tokenizer

    docs, errors = read_documents(files, spec.id_column, spec.text_column)
    todo = [d for d in docs if d.id not in done]
    sink.skipped_done = len(docs) - len(todo)
    if args.limit:
        todo = todo[: args.limit]
    progress = sink.progress
    progress.plan(documents=len(todo) + sum(e.id is not None for e in errors))  # a bad row is a document that fails
    for e in errors:
        sink.add_error(e.id, e.source, e.reason)
    log.info("%d document(s): %d already done, %d to summarize; %d input error(s)", len(docs), sink.skipped_done, len(todo), len(errors))
    items = prepare(todo, load_tokenizer(spec.model_source), spec, sink)
    progress.plan(prompt_tokens=sum(len(it["ids"]) for it in items))
    by_id = {it["id"]: it for it in items}
    if not items:
        return {"engine": "local", "replicas": 0}

    def on_rows(rows: list[dict]) -> None:
        with progress.together():
            for r in rows:
                item = by_id[r["id"]]
                if "error" in r:
                    sink.add_error(r["id"], "generation", r["error"], len(item["ids"]))
                else:
                    sink.add_result(output_row(r, item["document_tokens"], item["truncated"], config), item["source"], len(item["ids"]))

    with progress.ticking():
        engine = LocalJobEngine(spec.model_source, config, engine_cfg, args.max_new_tokens, replica_threads(args.threads))
        try:
            progress.begin()
            generate_all(engine, items, on_rows, on_step=lambda: progress.work(*engine.work()))
            return engine.runtime_shape()
        finally:
            engine.shutdown()


def plan_ray_progress(progress, totals: dict, limit: int) -> int:
    """Plan the Ray job's progress from :func:`~icecache_ray.jobs.pipeline.count_documents`
    ``totals`` (a bad row is a document that fails). With ``limit`` (N input rows as read: which
    ones is not known here) the prompt tokens are the average document's. Returns the documents."""
    documents = totals["todo"] + totals["row_errors"]
    prompt_tokens = totals["prompt_tokens"]
    if limit and limit < documents:
        prompt_tokens = round(prompt_tokens * limit / documents)
        documents = limit
    progress.plan(documents=documents, prompt_tokens=prompt_tokens)
    return documents


def take_row(row: dict, sink: ResultSink, config: IceCacheConfig) -> None:
    """One result row of the Ray Data pipeline into the sink (a summary, or an error)."""
    from icecache_ray.data.stage import STAT_COLUMNS

    planned = int(row.get("planned_prompt_tokens") or 0)
    if isinstance(row["error"], str) and row["error"]:  # not None (nor NaN, Ray Data's null in numpy batches)
        sink.add_error(row["id"] or None, row["source"], row["error"], planned)
        return
    result = {"id": row["id"], "summary": row["generated_text"].strip(), "prompt_tokens": int(row["prompt_tokens"]),
              "generated_tokens": int(row["generated_tokens"]), **{c: plain(row[c]) for c in STAT_COLUMNS}}
    sink.add_result(output_row(result, int(row["document_tokens"]), bool(row["document_truncated"] or row["truncated"]), config),
                    row["source"], planned)


def run_ray(args, spec: JobSpec, config: IceCacheConfig, engine_cfg: EngineConfig, files: list[str], done: set[str],
            sink: ResultSink) -> dict:
    """The job as a Ray Data pipeline (:mod:`icecache_ray.jobs.pipeline`). Returns the runtime shape."""
    from icecache_ray import ray_utils
    from icecache_ray.data import IceCacheEngineProcessorConfig
    from icecache_ray.data.stage import replica_shape
    from icecache_ray.jobs import pipeline
    from icecache_ray.pool import remove_orphaned_segments

    if not files:
        return {"engine": "ray.data", "replicas": 0, "stage_workers": 0, "index_actors": 0}  # nothing to read: no Ray
    ray = ray_utils.connect(args.address)
    resources = ray.cluster_resources()
    threads = replica_threads(args.threads)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    replicas = args.replicas or pipeline.replica_count(resources, threads, gpus)
    try:
        processor = IceCacheEngineProcessorConfig(
            model_source=spec.model_source, policy=config.policy, budget=config.budget, max_new_tokens=args.max_new_tokens,
            max_running=engine_cfg.max_running, max_step_tokens=engine_cfg.max_step_tokens, batch_size=args.batch_size,
            device_kv_bytes=engine_cfg.device_kv_bytes,
            concurrency=replicas, max_concurrent_batches=args.max_concurrent_batches,
            num_cpus=pipeline.replica_cpus(resources, threads, replicas), num_gpus=gpus, threads=threads, truncate=False,
            index_mode=getattr(args, "index_mode", "auto")).resolved(ray)
    except ValueError as exc:
        raise SystemExit(f"replica options: {exc}") from None
    shape = replica_shape(processor)
    frozen_done = frozenset(done)
    totals = pipeline.count_documents(ray, files, spec, frozen_done)
    sink.skipped_done = totals["done"]
    planned = plan_ray_progress(sink.progress, totals, args.limit)
    log.info("%d document(s): %d already done, %d to summarize; %d input error(s); %d replica(s) of %d thread(s), %s GPU, "
             "index %s", totals["todo"] + totals["done"], totals["done"], planned, totals["errors"], replicas, threads, gpus,
             processor.index_mode)
    inflight = pipeline.progress_actor(ray)
    ds = pipeline.build_dataset(ray, files, spec, frozen_done, processor, args.limit or None, inflight)
    with sink.progress.ticking(poll=lambda: ray.get(inflight.totals.remote(), timeout=10)):
        sink.progress.begin()
        for row in ds.iter_rows():
            take_row(row, sink, config)
    remove_orphaned_segments()  # pools of engine actors killed on this node (others sweep at their restart)
    return {"engine": "ray.data", "replicas": replicas, "threads_per_replica": threads, "gpus_per_replica": gpus,
            "cpus_per_replica": processor.num_cpus, "batch_size": processor.batch_size,
            "max_concurrent_batches": processor.max_concurrent_batches, "index_mode": processor.index_mode,
            "stage_workers": replicas * shape["stage_workers"], "index_actors": replicas * shape["index_actors"]}
