"""Batch long-document summarization: ``python -m icecache_ray.jobs.summarize --input PATH --output DIR``.

Runs directly or as ``ray job submit --working-dir . -- python -m icecache_ray.jobs.summarize ...``
(it joins the cluster in ``$RAY_ADDRESS``; without one it starts a local Ray on loopback). With
``--engine ray`` (default) the job is a Ray Data pipeline (:mod:`icecache_ray.jobs.pipeline`:
read and validate files on workers → prompt + tokenize tasks → engine actors → parts written by
the driver); ``--engine local`` runs everything in this process. Input: Parquet, JSONL or
``.txt`` files, folders of them, local or any pyarrow filesystem URI. Output folder: Parquet parts
(id, summary, token counts, truncated flag, timings, decode stats), ``errors.jsonl`` (documents
that failed, with the reason) and ``run.json`` (options and totals). Re-running the same command
skips documents already written (resume); every document appears once.

Exit status: 0 every document summarized (or already done); 1 the job could not run (a bad option
value, the model folder, Ray, a pipeline failure); 2 command-line usage; 3 some documents failed
(the others are written; ``errors.jsonl`` says why); 4 nothing was summarized (no document found,
or all failed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import deque

from icecache_ray.config import POLICIES, IceCacheConfig
from icecache_ray.jobs.inputs import list_sources, read_documents
from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.pipeline import JobSpec, driver_peak_rss_mib
from icecache_ray.jobs.progress import Progress
from icecache_ray.jobs.prompts import DEFAULT_INSTRUCTION, chat_prompt
from icecache_ray.jobs.sink import ResultSink
from icecache_ray.serving_config import EngineConfig

log = logging.getLogger("icecache_ray.jobs.summarize")

EXIT_OK, EXIT_JOB_ERROR, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_NOTHING_SUMMARIZED = 0, 1, 2, 3, 4


def exit_code(summary: dict) -> int:
    """The job's exit status from its totals (see module docstring)."""
    if summary["ok"] == 0 and summary["skipped_done"] == 0:
        return EXIT_NOTHING_SUMMARIZED
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m icecache_ray.jobs.summarize", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="files (.parquet/.jsonl/.txt) or folders of them")
    p.add_argument("--output", required=True, help="output folder (created; re-running resumes)")
    p.add_argument("--id-column", default="id")
    p.add_argument("--text-column", default="text")
    p.add_argument("--policy", default="icecache", choices=POLICIES, help="KV policy; 'full' is the dense baseline")
    p.add_argument("--budget", type=int, default=256, help="IceCache token budget per layer and KV head")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    p.add_argument("--max-running", type=int, default=0,
                   help="sequences decoding at once per replica (0: sized from memory)")
    p.add_argument("--max-step-tokens", type=int, default=2048,
                   help="tokens per forward pass: a decode token per running sequence, the rest prompt chunks")
    p.add_argument("--engine", choices=["ray", "local"], default="ray", help="Ray replicas, or this process")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--replicas", type=int, default=0, help="0: sized from the cluster's resources")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per replica (0: this machine's cores, at most 8)")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--batch-size", type=int, default=4, help="--engine ray: documents per Ray Data batch")
    p.add_argument("--max-concurrent-batches", type=int, default=8,
                   help="--engine ray: batches in flight per replica (keeps its running batch full)")
    p.add_argument("--part-rows", type=int, default=64, help="summaries per Parquet part (a part is also written every 60 s)")
    p.add_argument("--limit", type=int, default=0,
                   help="at most N documents this run (local: the first N not yet done; ray: N input rows as read)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2)")
    return p.parse_args(argv)


def check_args(args) -> tuple[IceCacheConfig, EngineConfig]:
    """Every option validated before Ray or a model starts (SystemExit with the reason)."""
    for name in ("max_new_tokens", "max_step_tokens", "batch_size", "max_concurrent_batches", "part_rows"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    for name in ("replicas", "threads", "limit", "max_running"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name}={getattr(args, name)}: must be >= 0")
    try:
        config = IceCacheConfig(policy=args.policy, budget=args.budget)
    except ValueError as exc:
        raise SystemExit(f"--budget/--policy: {exc}") from None
    try:
        engine = EngineConfig(max_running=args.max_running or None, max_step_tokens=args.max_step_tokens)
    except ValueError as exc:
        raise SystemExit(f"--max-running/--max-step-tokens: {exc}") from None
    return config, engine


def check_model(path):
    """(folder, tokenizer) of ``--model`` (default: the bundled model), checked before any Ray
    work: SystemExit saying what is wrong with the path."""
    from icecache_ray.model import load_tokenizer, model_folder

    try:
        folder = model_folder(path)
        return folder, load_tokenizer(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--model: {exc}") from None


def prepare(docs, tokenizer, spec: JobSpec, sink: ResultSink) -> list[dict]:
    """Chat prompts for the documents; a document that cannot be prepared becomes an error."""
    items = []
    for doc in docs:
        try:
            prompt = chat_prompt(tokenizer, doc.text, spec.instruction, spec.max_prompt_tokens)
        except Exception as exc:  # noqa: BLE001 - one document's problem, the job goes on
            sink.add_error(doc.id, doc.source, f"could not build the prompt: {exc}")
            continue
        if prompt.truncated:
            log.warning("%s: %d tokens, middle-truncated to fit the %d-token prompt", doc.id, prompt.document_tokens,
                        spec.max_prompt_tokens)
        items.append({"id": doc.id, "ids": prompt.ids, "document_tokens": prompt.document_tokens, "truncated": prompt.truncated})
    return items


def generate_all(engine, items: list[dict], on_rows) -> None:
    """Feed documents to the engine as it has room, step it, and hand every ended document's row
    to ``on_rows`` (a document the engine refuses is an error row)."""
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
        if rows:
            on_rows(rows)


def run_local(args, spec: JobSpec, config: IceCacheConfig, engine_cfg: EngineConfig, files: list[str], done: set[str],
              sink: ResultSink) -> dict:
    """The job in this process: documents read here, one local engine. Returns the runtime shape."""
    from icecache_ray.jobs.engines import LocalJobEngine
    from icecache_ray.model import load_tokenizer

    docs, errors = read_documents(files, spec.id_column, spec.text_column)
    for e in errors:
        sink.add_error(e.id, e.source, e.reason)
    todo = [d for d in docs if d.id not in done]
    sink.skipped_done = len(docs) - len(todo)
    if args.limit:
        todo = todo[: args.limit]
    log.info("%d document(s): %d already done, %d to summarize; %d input error(s)", len(docs), sink.skipped_done, len(todo), len(errors))
    items = prepare(todo, load_tokenizer(spec.model_source), spec, sink)
    sink.progress.total = len(items)
    by_id = {it["id"]: it for it in items}
    if not items:
        return {"engine": "local", "replicas": 0}
    engine = LocalJobEngine(spec.model_source, config, engine_cfg, args.max_new_tokens, args.threads or min(8, os.cpu_count() or 1))

    def on_rows(rows: list[dict]) -> None:
        for r in rows:
            if "error" in r:
                sink.add_error(r["id"], "generation", r["error"])
            else:
                item = by_id[r["id"]]
                sink.add_result(output_row(r, item["document_tokens"], item["truncated"], config))

    try:
        generate_all(engine, items, on_rows)
        return engine.runtime_shape()
    finally:
        engine.shutdown()


def run_ray(args, spec: JobSpec, config: IceCacheConfig, engine_cfg: EngineConfig, files: list[str], done: set[str],
            sink: ResultSink) -> dict:
    """The job as a Ray Data pipeline (:mod:`icecache_ray.jobs.pipeline`). Returns the runtime shape."""
    from icecache_ray import ray_utils
    from icecache_ray.data import IceCacheEngineProcessorConfig
    from icecache_ray.data.stage import STAT_COLUMNS
    from icecache_ray.jobs import pipeline
    from icecache_ray.pool import remove_orphaned_segments

    ray = ray_utils.connect(args.address)
    resources = ray.cluster_resources()
    threads = args.threads or min(8, os.cpu_count() or 1)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    replicas = args.replicas or pipeline.replica_count(resources, threads, gpus)
    try:
        processor = IceCacheEngineProcessorConfig(
            model_source=spec.model_source, policy=config.policy, budget=config.budget, max_new_tokens=args.max_new_tokens,
            max_running=engine_cfg.max_running, max_step_tokens=engine_cfg.max_step_tokens, batch_size=args.batch_size,
            concurrency=replicas, max_concurrent_batches=args.max_concurrent_batches,
            num_cpus=pipeline.replica_cpus(resources, threads, replicas), num_gpus=gpus, threads=threads, truncate=False)
    except ValueError as exc:
        raise SystemExit(f"replica options: {exc}") from None
    frozen_done = frozenset(done)
    totals = pipeline.count_documents(ray, files, spec, frozen_done)
    sink.skipped_done = totals["done"]
    sink.progress.total = min(totals["todo"], args.limit) if args.limit else totals["todo"]
    log.info("%d document(s): %d already done, %d to summarize; %d input error(s); %d replica(s) of %d thread(s), %s GPU",
             totals["todo"] + totals["done"], totals["done"], sink.progress.total, totals["errors"], replicas, threads, gpus)
    ds = pipeline.build_dataset(ray, files, spec, frozen_done, processor, args.limit or None)
    for row in ds.iter_rows():
        if row["error"]:
            sink.add_error(row["id"] or None, row["source"], row["error"])
            continue
        result = {"id": row["id"], "summary": row["generated_text"].strip(), "prompt_tokens": int(row["prompt_tokens"]),
                  "generated_tokens": int(row["generated_tokens"]), **{c: _plain(row[c]) for c in STAT_COLUMNS}}
        sink.add_result(output_row(result, int(row["document_tokens"]), bool(row["document_truncated"] or row["truncated"]), config))
    remove_orphaned_segments()  # pools of engine actors killed on this node (others sweep at their restart)
    return {"engine": "ray.data", "replicas": replicas, "threads_per_replica": threads, "gpus_per_replica": gpus,
            "cpus_per_replica": processor.num_cpus, "batch_size": processor.batch_size,
            "max_concurrent_batches": processor.max_concurrent_batches}


def run(args) -> dict:
    """The whole job (see module docstring). Returns the run summary written to run.json."""
    from transformers import AutoConfig

    t0 = time.perf_counter()
    config, engine_cfg = check_args(args)
    folder, _ = check_model(args.model)
    out = OutputDir(args.output)
    files, list_errors = list_sources(args.input)
    done = out.done_ids()
    context = AutoConfig.from_pretrained(folder).max_position_embeddings
    spec = JobSpec(str(folder), args.instruction, context - args.max_new_tokens, args.id_column, args.text_column)
    sink = ResultSink(out, done, Progress(0), part_rows=args.part_rows)
    for e in list_errors:
        sink.add_error(e.id, e.source, e.reason)
    runner = run_local if args.engine == "local" else run_ray
    error, runtime = None, None
    try:
        runtime = runner(args, spec, config, engine_cfg, files, done, sink)
    except Exception as exc:  # noqa: BLE001 - the run ends, but what it finished is kept and the cause reported
        log.exception("the job failed")
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sink.flush()
    summary = {
        "options": {k: v for k, v in vars(args).items()},
        "config": config.to_dict(),
        "engine_config": engine_cfg.to_dict(),
        "engine": args.engine,
        "data": "ray.data" if args.engine == "ray" else "local",
        "replicas": (runtime or {}).get("replicas", 0),
        "runtime": runtime,
        "documents": sink.documents + sink.skipped_done,
        "ok": sink.ok,
        "failed": sink.failed,
        "skipped_done": sink.skipped_done,
        "truncated": sink.truncated,
        "generated_tokens": sink.progress.tokens,
        "wall_s": time.perf_counter() - t0,
        "driver_peak_rss_mib": driver_peak_rss_mib(),
        "output": str(out.path),
        "error": error,
    }
    summary["exit_code"] = EXIT_JOB_ERROR if error else exit_code(summary)
    out.write_run(summary)
    return summary


def output_row(result: dict, document_tokens: int, truncated: bool, config: IceCacheConfig) -> dict:
    """A Parquet row: the engine's result (id, summary, token counts, decode stats) + the document's facts."""
    return {**result, "document_tokens": document_tokens, "truncated": truncated,
            "policy": config.policy, "budget": config.budget if config.policy != "full" else None}


def _plain(value):
    """A numpy scalar as the Python number Parquet rows are built from."""
    return value.item() if hasattr(value, "item") else value


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    summary = run(args)
    code = summary["exit_code"]
    outcome = {EXIT_OK: "done", EXIT_SOME_FAILED: "done with failures", EXIT_NOTHING_SUMMARIZED: "nothing summarized"}[code]
    log.log(logging.INFO if code == EXIT_OK else logging.ERROR,
            "%s: %d ok, %d failed%s, %d already done, %d truncated in %.1f s -> %s (exit %d)", outcome,
            summary["ok"], summary["failed"], " (reasons in errors.jsonl)" if summary["failed"] else "", summary["skipped_done"],
            summary["truncated"], summary["wall_s"], summary["output"], code)
    print(summary["output"])  # the CLI's result: where the summaries are
    return code


if __name__ == "__main__":
    sys.exit(main())
