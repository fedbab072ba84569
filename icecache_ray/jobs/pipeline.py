"""The batch job on Ray Data (``--engine ray``): files → read and validate → prompt → generate → the driver's sink.

::

    files (driver: listing only) ─ from_items, a block per file
      → flat_map(read_rows)        every row of a file, or the reason it is unusable; ids already
                                   done are dropped here (resume)
      → map_batches(prompt_batch)  chat prompt + tokenize on CPU tasks
      → generate_stage             icecache_ray.data's engine actors, one replica each
      → driver: iter_rows          ResultSink writes parts / errors.jsonl as documents end

Before it, :func:`count_documents` reads the files once more (in parallel, counting documents and
their prompts' tokens) so the progress line has its totals and run.json the number of documents
already done. The driver holds
file names, the ids it has accounted for and one part's buffer: never the documents.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

from icecache_ray.jobs.inputs import Document, read_source, unique
from icecache_ray.jobs.prompts import document_prompt

log = logging.getLogger(__name__)

DRIVER_COLUMNS_DROPPED = ["prompt_ids", "generated_ids"]  # token lists the driver does not write
TASK_CPUS = 0.25  # read and prompt tasks are light next to a replica; they must still fit beside it
REPARTITION_CPUS = 1.0  # Ray Data's streaming repartition (before the engine stage) asks 1 CPU per task


@dataclass(frozen=True)
class JobSpec:
    """What the pipeline's stages need from the command line (picklable, sent to Ray tasks)."""

    model_source: str
    instruction: str
    max_prompt_tokens: int
    id_column: str = "id"
    text_column: str = "text"


COUNTS = ("todo", "done", "errors", "row_errors", "prompt_tokens")


def count_documents(ray, files: list[str], spec: JobSpec, done: frozenset) -> dict:
    """Totals over ``files`` (read in parallel tasks): ``todo`` documents, ``done`` ones (skipped),
    ``errors`` (rows or files that will be reported; ``row_errors``: those of rows with an id, which
    are documents that fail), ``prompt_tokens`` (of the todo documents' chat prompts)."""
    count = ray.remote(num_cpus=TASK_CPUS)(_count_source)
    totals = dict.fromkeys(COUNTS, 0)
    for part in ray.get([count.remote(f, spec, done) for f in files]):
        for k in totals:
            totals[k] += part[k]
    return totals


def _count_source(source: str, spec: JobSpec, done: frozenset) -> dict:
    from icecache_ray.data.columns import cached_tokenizer

    counts = dict.fromkeys(COUNTS, 0)
    for got in unique(read_source(source, spec.id_column, spec.text_column), set()):
        if not isinstance(got, Document):
            counts["errors"] += 1
            counts["row_errors"] += got.id is not None
        elif got.id in done:
            counts["done"] += 1
        else:
            counts["todo"] += 1
            prompt, _ = document_prompt(cached_tokenizer(spec.model_source), got.text, spec.instruction, spec.max_prompt_tokens)
            counts["prompt_tokens"] += len(prompt.ids) if prompt else 0
    return counts


def build_dataset(ray, files: list[str], spec: JobSpec, done: frozenset, processor_config, limit: int | None = None,
                  progress=None):
    """The lazy dataset of result rows (see module docstring): per row ``id``, ``source``, ``error``
    (None or the reason), ``document_tokens``, ``document_truncated``, ``planned_prompt_tokens``
    and the processor's columns. ``limit``: at most that many input rows (documents or row errors)
    go on past the read. ``progress``: the :class:`~icecache_ray.data.inflight.InFlight` actor."""
    from icecache_ray.data import generate_stage

    ds = ray.data.from_items([{"source": f} for f in files], override_num_blocks=max(1, len(files)))
    ds = ds.flat_map(read_rows, fn_kwargs={"spec": spec, "done": done}, num_cpus=TASK_CPUS)
    if limit:
        ds = ds.limit(limit)
    ds = ds.map_batches(prompt_batch, fn_kwargs={"spec": spec}, batch_size=processor_config.batch_size, num_cpus=TASK_CPUS)
    return generate_stage(ds, processor_config, progress).drop_columns(DRIVER_COLUMNS_DROPPED)


def read_rows(row: dict, spec: JobSpec, done: frozenset) -> Iterator[dict]:
    """One file's rows, streamed: ``{"id", "source", "text", "error"}`` (``id`` "" for a file-level
    error, ``error`` "" when there is none: a column never all-null, so blocks share one schema)."""
    for got in unique(read_source(row["source"], spec.id_column, spec.text_column), set()):
        if isinstance(got, Document):
            if got.id not in done:
                yield {"id": got.id, "source": got.source, "text": got.text, "error": ""}
        else:
            yield {"id": got.id or "", "source": got.source, "text": "", "error": got.reason}


def prompt_batch(batch: dict, spec: JobSpec) -> dict:
    """Chat prompts of a batch of documents: ``prompt_ids``, ``planned_prompt_tokens`` (their
    count), ``document_tokens``, ``document_truncated``; a document that cannot be prepared gets its
    ``error``. Drops ``text``."""
    from icecache_ray.data.columns import cached_tokenizer, object_column

    tokenizer = cached_tokenizer(spec.model_source)
    ids, tokens, truncated, errors = [], [], [], []
    for text, error in zip(batch["text"], batch["error"]):
        prompt = None
        if not error:
            prompt, error = document_prompt(tokenizer, str(text), spec.instruction, spec.max_prompt_tokens)
        ids.append(prompt.ids if prompt else [])
        tokens.append(prompt.document_tokens if prompt else 0)
        truncated.append(bool(prompt and prompt.truncated))
        errors.append(str(error) if error else None)
    return {"id": batch["id"], "source": batch["source"], "prompt_ids": object_column(ids),
            "planned_prompt_tokens": [len(i) for i in ids], "document_tokens": tokens, "document_truncated": truncated,
            "error": object_column(errors)}


def progress_actor(ray):
    """The :class:`~icecache_ray.data.inflight.InFlight` actor the replicas tell their work, on the
    driver's node (no CPU)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from icecache_ray.data.inflight import InFlight

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(InFlight).options(num_cpus=0, scheduling_strategy=here, max_restarts=-1).remote()


def replica_count(resources: dict, threads: int, gpus_per_replica: float) -> int:
    """Replicas that fit the cluster: one per ``gpus_per_replica`` GPUs when replicas use GPUs,
    else one per ``threads`` CPUs (at least one)."""
    if gpus_per_replica > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_replica))
    return max(1, int(resources.get("CPU", 1) // threads))


def replica_cpus(resources: dict, threads: int, replicas: int) -> float:
    """The CPUs a replica asks Ray for: its threads, less what the read / prompt tasks need when
    the replicas would otherwise take every CPU of the cluster (the tasks could never run)."""
    spare = (resources.get("CPU", threads * replicas) - 2 * TASK_CPUS - REPARTITION_CPUS) / replicas
    return float(max(TASK_CPUS, min(threads, spare)))


def driver_peak_rss_mib() -> float:
    """This process's peak resident memory (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if os.name == "posix" else float("nan")
