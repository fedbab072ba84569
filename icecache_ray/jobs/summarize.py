"""Batch long-document summarization: ``python -m icecache_ray.jobs.summarize --input PATH --output DIR``.

Runs directly or as ``ray job submit --working-dir . -- python -m icecache_ray.jobs.summarize ...``
(it joins the cluster in ``$RAY_ADDRESS``; without one it starts a local Ray on loopback, or runs
in this process with ``--engine local``). Input: Parquet, JSONL or ``.txt`` files, or folders of
them. Output folder: Parquet parts (id, summary, token counts, truncated flag, timings, decode
stats), ``errors.jsonl`` (documents that failed, with the reason) and ``run.json`` (options and
totals). Re-running the same command skips documents already written (resume).

Exit status: 0 every document summarized (or already done); 1 the job could not run (a bad option
value, the model folder, Ray); 2 command-line usage; 3 some documents failed (the others are
written; ``errors.jsonl`` says why); 4 nothing was summarized (no document found, or all failed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import deque

from icecache_ray.config import POLICIES, IceCacheConfig
from icecache_ray.jobs.inputs import read_documents
from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.progress import Progress
from icecache_ray.jobs.prompts import DEFAULT_INSTRUCTION, chat_prompt
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
    p.add_argument("--limit", type=int, default=0, help="only the first N documents (0: all)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2)")
    return p.parse_args(argv)


def check_args(args) -> tuple[IceCacheConfig, EngineConfig]:
    """Every option validated before Ray or a model starts (SystemExit with the reason)."""
    for name in ("max_new_tokens", "max_step_tokens"):
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


def prepare(docs, tokenizer, args, context: int, errors: list[dict]) -> list[dict]:
    """Chat prompts for the documents; a document that cannot be prepared becomes an error."""
    items = []
    for doc in docs:
        try:
            prompt = chat_prompt(tokenizer, doc.text, args.instruction, context - args.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - one document's problem, the job goes on
            errors.append({"id": doc.id, "source": doc.source, "reason": f"could not build the prompt: {exc}"})
            continue
        if prompt.truncated:
            log.warning("%s: %d tokens, middle-truncated to fit the %d-token context", doc.id, prompt.document_tokens, context)
        items.append({"id": doc.id, "ids": prompt.ids, "document_tokens": prompt.document_tokens, "truncated": prompt.truncated})
    return items


def make_engine(args, config: IceCacheConfig, engine: EngineConfig):
    threads = args.threads or min(8, os.cpu_count() or 1)
    if args.engine == "local":
        from icecache_ray.jobs.engines import LocalJobEngine

        return LocalJobEngine(args.model, config, engine, args.max_new_tokens, threads)
    from icecache_ray import ray_utils
    from icecache_ray.jobs.engines import RayJobEngine

    ray = ray_utils.connect(args.address)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return RayJobEngine(ray, args.model, config, engine, args.max_new_tokens, threads, args.replicas or None, gpus, args.address)


def generate_all(engine, items: list[dict], on_rows) -> None:
    """Feed documents to the engine as it has room, step it, and hand every ended document's row
    to ``on_rows`` (a document the engine refuses, or that finds no live replica, is an error row)."""
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


def run(args) -> dict:
    """The whole job (see module docstring). Returns the run summary written to run.json."""
    from transformers import AutoConfig

    t0 = time.perf_counter()
    config, engine_cfg = check_args(args)
    folder, tokenizer = check_model(args.model)
    out = OutputDir(args.output)
    docs, input_errors = read_documents(args.input, args.id_column, args.text_column)
    errors = [{"id": e.id, "source": e.source, "reason": e.reason} for e in input_errors]
    for e in errors:
        log.error("skipped input %s%s: %s", e["source"], f" ({e['id']})" if e["id"] else "", e["reason"])
    if args.limit:
        docs = docs[: args.limit]
    done = out.done_ids()
    todo = [d for d in docs if d.id not in done]
    log.info("%d document(s): %d already done, %d to summarize; %d input error(s)", len(docs), len(docs) - len(todo), len(todo), len(errors))
    items = prepare(todo, tokenizer, args, AutoConfig.from_pretrained(folder).max_position_embeddings, errors)
    out.write_errors(errors)  # input and prompt problems, known before any generation
    by_id = {it["id"]: it for it in items}
    counts = {"ok": 0, "failed": len(errors)}
    engine = make_engine(args, config, engine_cfg) if items else None
    progress = Progress(len(items))

    def on_rows(rows: list[dict]) -> None:
        good = [_output_row(r, by_id[r["id"]], config) for r in rows if "error" not in r]
        bad = [{"id": r["id"], "source": "generation", "reason": r["error"]} for r in rows if "error" in r]
        if good:
            out.write_rows(good)
        out.write_errors(bad)
        counts["ok"] += len(good)
        counts["failed"] += len(bad)
        progress.update(len(rows), sum(r["generated_tokens"] for r in good))

    try:
        if engine is not None:
            generate_all(engine, items, on_rows)
        runtime = engine.runtime_shape() if engine is not None else None
    finally:
        if engine is not None:
            engine.shutdown()
    summary = {
        "options": {k: v for k, v in vars(args).items()},
        "config": config.to_dict(),
        "engine_config": engine_cfg.to_dict(),
        "engine": engine.name if engine else None,
        "replicas": runtime["replicas"] if runtime else 0,
        "runtime": runtime,
        "documents": len(docs),
        "ok": counts["ok"],
        "failed": counts["failed"],
        "skipped_done": len(docs) - len(todo),
        "truncated": sum(1 for it in items if it["truncated"]),
        "generated_tokens": progress.tokens,
        "wall_s": time.perf_counter() - t0,
        "output": str(out.path),
    }
    summary["exit_code"] = exit_code(summary)
    out.write_run(summary)
    return summary


def _output_row(row: dict, item: dict, config: IceCacheConfig) -> dict:
    return {**row, "document_tokens": item["document_tokens"], "truncated": item["truncated"],
            "policy": config.policy, "budget": config.budget if config.policy != "full" else None}


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
