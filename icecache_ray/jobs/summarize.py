"""Batch long-document summarization: ``python -m icecache_ray.jobs.summarize --input PATH --output DIR``.

Runs directly or as ``ray job submit --working-dir . -- python -m icecache_ray.jobs.summarize ...``
(it joins the cluster in ``$RAY_ADDRESS``; without one it starts a local Ray on loopback). With
``--engine ray`` (default) the job is a Ray Data pipeline (:mod:`icecache_ray.jobs.pipeline`:
read and validate files on workers → prompt + tokenize tasks → engine actors → parts written by
the driver); ``--engine local`` runs everything in this process. Input: Parquet, JSONL or
``.txt`` files, folders of them, local or any pyarrow filesystem URI. Output folder: Parquet parts
(id, summary, token counts, truncated flag, timings, decode stats), ``errors.jsonl`` (documents
that failed, with the reason) and ``run.json`` (generation settings, options and totals).
Re-running the same command skips documents already written (resume); every document appears once.

One folder, one job, one kind of summary: a job holds a lock on its output folder while it runs
(:mod:`icecache_ray.jobs.lock`; a second job there exits 1 at once, naming the owner), and a rerun
whose generation settings (model, policy, budget, max-new-tokens, instruction, chat template)
differ from those the folder's summaries were made with exits 2 naming each difference, unless
``--overwrite`` tells it to start over (:mod:`icecache_ray.jobs.settings`).

Exit status: 0 every document summarized (or already done); 1 the job could not run (a bad option
value, the model folder, the output folder in use by another job, Ray, a pipeline failure); 2
command-line usage, or settings that differ from the output folder's; 3 some documents failed
(the others are written; ``errors.jsonl`` says why); 4 nothing was summarized (no document found,
or all failed).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from icecache_ray.config import POLICIES, IceCacheConfig
from icecache_ray.jobs.drivers import run_local, run_ray
from icecache_ray.jobs.inputs import list_sources
from icecache_ray.jobs.lock import FolderLock, FolderLocked
from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.pipeline import JobSpec, driver_peak_rss_mib
from icecache_ray.jobs.progress import Progress
from icecache_ray.jobs.prompts import DEFAULT_INSTRUCTION
from icecache_ray.jobs.settings import LEGACY_FIELDS, SETTINGS_KEY, RunSettings, legacy_settings
from icecache_ray.jobs.sink import ResultSink
from icecache_ray.serving_config import EngineConfig

log = logging.getLogger("icecache_ray.jobs.summarize")

EXIT_OK, EXIT_JOB_ERROR, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_NOTHING_SUMMARIZED = 0, 1, 2, 3, 4


class JobRefused(SystemExit):
    """The job will not run in this output folder (exit ``code``; ``str()``: why, for the user)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_code(summary: dict) -> int:
    """The job's exit status from its totals (see module docstring)."""
    if summary["ok"] == 0 and summary["skipped_done"] == 0:
        return EXIT_NOTHING_SUMMARIZED
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (``python -m icecache_ray.jobs.summarize`` / ``icecache-ray summarize``)."""
    p = argparse.ArgumentParser(prog="python -m icecache_ray.jobs.summarize", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="files (.parquet/.jsonl/.txt) or folders of them")
    p.add_argument("--output", required=True,
                   help="output folder (created; re-running resumes, with the same generation settings only)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: remove the summaries, errors and run.json earlier runs wrote in --output")
    p.add_argument("--id-column", default="id")
    p.add_argument("--text-column", default="text")
    p.add_argument("--policy", default="icecache", choices=POLICIES, help="KV policy; 'full' is the dense baseline")
    p.add_argument("--budget", type=int, default=256, help="IceCache token budget per layer and KV head")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    p.add_argument("--max-running", type=int, default=0,
                   help="sequences decoding at once per replica (0: sized from memory)")
    p.add_argument("--device-kv-gib", type=float, default=0.0,
                   help="device memory budget per replica for the K/V rows (GiB; 0: none): max_running is what "
                        "fits it under the chosen policy (run.json's runtime.max_running)")
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
    p.add_argument("--index-mode", choices=["auto", "in_process", "actors"], default="auto",
                   help="--engine ray: where each replica's index runs: 'actors' (a stage worker with index actors "
                        "on the engine actor's node, as a Deployment), 'in_process' (the engine actor's own process), "
                        "'auto' (actors on nodes of >= 8 CPUs, else in-process); run.json's runtime records the "
                        "stage_workers and index_actors used")
    p.add_argument("--part-rows", type=int, default=64, help="summaries per Parquet part (a part is also written every 60 s)")
    p.add_argument("--limit", type=int, default=0,
                   help="at most N documents this run (local: the first N not yet done; ray: N input rows as read)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="a progress line (tokens prefilled and generated, documents, rates, ETA) this often")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args) -> tuple[IceCacheConfig, EngineConfig]:
    """Every option validated before Ray or a model starts (SystemExit with the reason)."""
    for name in ("max_new_tokens", "max_step_tokens", "batch_size", "max_concurrent_batches", "part_rows", "progress_every"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    for name in ("replicas", "threads", "limit", "max_running", "device_kv_gib"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name}={getattr(args, name)}: must be >= 0")
    try:
        config = IceCacheConfig(policy=args.policy, budget=args.budget)
    except ValueError as exc:
        raise SystemExit(f"--budget/--policy: {exc}") from None
    try:
        engine = EngineConfig(max_running=args.max_running or None, max_step_tokens=args.max_step_tokens,
                              device_kv_bytes=int(args.device_kv_gib * 2**30) or None)
    except ValueError as exc:
        raise SystemExit(f"--max-running/--max-step-tokens/--device-kv-gib: {exc}") from None
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


def open_output(path: str) -> OutputDir:
    """The ``--output`` folder (created); SystemExit when it is a file or cannot be created."""
    try:
        return OutputDir(path)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"--output: {exc}") from None


def lock_output(out: OutputDir) -> FolderLock:
    """This job's lock on its output folder; JobRefused (exit 1) naming the job that holds it."""
    try:
        return FolderLock(out.path).acquire()
    except FolderLocked as exc:
        raise JobRefused(str(exc), EXIT_JOB_ERROR) from None


def check_settings(out: OutputDir, settings: RunSettings, overwrite: bool) -> None:
    """Make the folder this run's: resume only under the settings its results were made with,
    start over with ``overwrite``; JobRefused (exit 2) naming each difference otherwise."""
    if overwrite:
        removed = out.start_over()
        if removed:
            log.warning("--overwrite: removed the %d file(s) earlier runs wrote in %s", removed, out.path)
        return
    if not out.has_results():
        return
    try:
        info = out.read_run() or {}
    except ValueError as exc:
        raise JobRefused(f"--output: {exc}; rerun with --overwrite to start over", EXIT_USAGE) from None
    recorded, fields = info.get(SETTINGS_KEY), None
    if not isinstance(recorded, dict) and isinstance(info.get("options"), dict):  # written by an older version
        recorded, fields = legacy_settings(info["options"]), LEGACY_FIELDS
        log.warning("%s: its run.json (an older version's) records no model fingerprint or chat template; "
                    "checking %s only", out.path, ", ".join(fields))
    if not isinstance(recorded, dict):
        raise JobRefused(f"--output {str(out.path)!r} holds results whose generation settings were not recorded "
                         "(no run.json): cannot tell whether they match this run's; "
                         "rerun with --overwrite to start over, or choose another --output", EXIT_USAGE)
    differences = settings.differences(recorded, fields)
    if differences:
        raise JobRefused(f"--output {str(out.path)!r} holds summaries made with other settings; they differ in:\n  "
                         + "\n  ".join(differences) + "\nrerun with the folder's settings to resume it, with --overwrite "
                         "to start over, or choose another --output", EXIT_USAGE)


def run(args) -> dict:
    """The whole job (see module docstring). Returns the run summary written to run.json."""
    t0 = time.perf_counter()
    config, engine_cfg = check_args(args)
    folder, tokenizer = check_model(args.model)
    settings = RunSettings.of_job(folder, tokenizer, config.policy, config.budget, args.max_new_tokens, args.instruction)
    out = open_output(args.output)
    lock = lock_output(out)
    try:
        check_settings(out, settings, args.overwrite)
        out.write_run({SETTINGS_KEY: settings.to_dict(), "status": "running", "options": vars(args)})
        return summarize_into(out, args, folder, settings, config, engine_cfg, t0)
    finally:
        lock.release()


def summarize_into(out: OutputDir, args, folder, settings: RunSettings, config: IceCacheConfig, engine_cfg: EngineConfig,
                   t0: float) -> dict:
    """The job proper, in a folder it holds (see :func:`run`). Returns the run summary written to run.json."""
    from transformers import AutoConfig

    files, list_errors = list_sources(args.input)
    done = out.done_ids()
    context = AutoConfig.from_pretrained(folder).max_position_embeddings
    spec = JobSpec(str(folder), args.instruction, context - args.max_new_tokens, args.id_column, args.text_column)
    sink = ResultSink(out, done, Progress(args.max_new_tokens, args.progress_every), part_rows=args.part_rows)
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
        SETTINGS_KEY: settings.to_dict(),
        "status": "ended",
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    # `ray job stop` sends SIGTERM: end like Ctrl-C, so the summaries buffered for the next part are written
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        summary = run(args)
    except JobRefused as exc:
        log.error("%s", exc)
        return int(exc.code)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    code = summary["exit_code"]
    outcome = {EXIT_OK: "done", EXIT_JOB_ERROR: f"failed ({summary['error']})", EXIT_SOME_FAILED: "done with failures",
               EXIT_NOTHING_SUMMARIZED: "nothing summarized"}[code]
    log.log(logging.INFO if code == EXIT_OK else logging.ERROR,
            "%s: %d ok, %d failed%s, %d already done, %d truncated in %.1f s -> %s (exit %d)", outcome,
            summary["ok"], summary["failed"], " (reasons in errors.jsonl)" if summary["failed"] else "", summary["skipped_done"],
            summary["truncated"], summary["wall_s"], summary["output"], code)
    print(summary["output"])  # the CLI's result: where the summaries are
    return code


if __name__ == "__main__":
    sys.exit(main())
