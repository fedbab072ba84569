"""Where a job's results go: Parquet parts (buffered, written whole), ``errors.jsonl``, counts and
progress, and the rule that every document id is accounted for at most once.

The same sink serves the local and the Ray Data job: rows arrive as documents end (in any order),
are buffered up to ``part_rows`` rows or ``part_seconds`` seconds and written as one part; a
summary whose id is already in a part (written by an earlier run, or earlier in this one: the id
repeated in two input files) is recorded as an error instead. Errors claim no id: a document
that failed in one file may still be summarized from another. A killed driver loses only its unwritten buffer: those documents
are not in any part, so the re-run generates them again (resume), never twice.
"""

from __future__ import annotations

import logging
import time

from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.progress import Progress

log = logging.getLogger(__name__)


class ResultSink:
    def __init__(self, out: OutputDir, done: set[str], progress: Progress, part_rows: int = 64,
                 part_seconds: float = 60.0) -> None:
        self.out, self.progress = out, progress
        self.part_rows, self.part_seconds = part_rows, part_seconds
        self.seen = set(done)  # ids in a part (ids only: a few dozen bytes each)
        self.ok = self.failed = self.truncated = 0
        self.documents = 0  # ids that ended here, with a summary or an error
        self.skipped_done = 0  # set by the job: documents an earlier run wrote
        self._rows: list[dict] = []
        self._since = time.monotonic()

    def add_result(self, row: dict, source: str, planned_prompt: int) -> None:
        """One summarized document (an output row with ``id``, ``prompt_tokens`` and
        ``generated_tokens``) read from ``source``; ``planned_prompt``: its prompt tokens as the
        progress planned them."""
        if row["id"] in self.seen:
            self.add_error(row["id"], source, f"duplicate id {row['id']!r}: only its first occurrence is used", planned_prompt)
            return
        self.seen.add(row["id"])
        self._rows.append(row)
        self.ok += 1
        self.documents += 1
        self.truncated += bool(row.get("truncated"))
        self.progress.ended(True, planned_prompt, row["prompt_tokens"], row["generated_tokens"])
        if len(self._rows) >= self.part_rows or time.monotonic() - self._since >= self.part_seconds:
            self.flush()

    def add_error(self, doc_id: str | None, source: str, reason: str, planned_prompt: int = 0) -> None:
        """A document (``doc_id``) or a whole file (``None``) that produced no summary, and why;
        ``planned_prompt``: the document's prompt tokens as the progress planned them."""
        log.error("%s%s: %s", source, f" ({doc_id})" if doc_id else "", reason)
        self.out.write_errors([{"id": doc_id, "source": source, "reason": reason}])
        self.failed += 1
        if doc_id is not None:
            self.documents += 1
            self.progress.ended(False, planned_prompt)

    def flush(self) -> None:
        """Write the buffered rows as one part (atomically)."""
        if self._rows:
            self.out.write_rows(self._rows)
        self._rows = []
        self._since = time.monotonic()


def output_row(result: dict, document_tokens: int, truncated: bool, config) -> dict:
    """A Parquet row: the engine's result (id, summary, token counts, decode stats) + the document's facts."""
    return {**result, "document_tokens": document_tokens, "truncated": truncated,
            "policy": config.policy, "budget": config.budget if config.policy != "full" else None}


def plain(value):
    """A numpy scalar as the Python number Parquet rows are built from."""
    return value.item() if hasattr(value, "item") else value
