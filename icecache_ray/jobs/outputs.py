"""A job's output folder: Parquet parts written as results arrive, an errors file, ``run.json``.

Each part is written to a temporary name and renamed, so a killed job leaves only whole parts; the
ids in the parts are what "already done" means when the same command runs again (resume), which
keeps every document exactly once in the output. ``run.json`` also holds the run's generation
settings (:mod:`icecache_ray.jobs.settings`), written before any part, so a resume can check that
the folder's summaries are of the same kind; :meth:`OutputDir.start_over` removes what earlier
runs wrote (and nothing else in the folder).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
RUN_FILE, ERRORS_FILE = "run.json", "errors.jsonl"
OWN_GLOBS = (PART_GLOB, "part-*.parquet.tmp", ERRORS_FILE, RUN_FILE, RUN_FILE + ".tmp")  # what a run writes


class OutputDir:
    """Owner of one output folder (see module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--output {str(self.path)!r} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self._parts = 0

    @property
    def errors_path(self) -> Path:
        return self.path / ERRORS_FILE

    @property
    def run_path(self) -> Path:
        return self.path / RUN_FILE

    def read_run(self) -> dict | None:
        """The folder's ``run.json`` (None when there is none). ValueError when it is not JSON."""
        if not self.run_path.exists():
            return None
        try:
            info = json.loads(self.run_path.read_text())
        except ValueError as exc:
            raise ValueError(f"{self.run_path} is not valid JSON ({exc})") from None
        return info if isinstance(info, dict) else None

    def has_results(self) -> bool:
        """Whether earlier runs wrote summaries or errors here."""
        return self.errors_path.exists() or any(self.path.glob(PART_GLOB))

    def start_over(self) -> int:
        """Remove every file a run writes (parts, errors, run.json); other files stay. Returns how many."""
        removed = 0
        for pattern in OWN_GLOBS:
            for f in self.path.glob(pattern):
                f.unlink(missing_ok=True)
                removed += 1
        return removed

    def done_ids(self) -> set[str]:
        """Ids already written by earlier runs (every whole part file)."""
        done: set[str] = set()
        for part in sorted(self.path.glob(PART_GLOB)):
            done.update(str(i) for i in pq.read_table(part, columns=["id"])["id"].to_pylist())
        return done

    def write_rows(self, rows: list[dict]) -> Path:
        """Write result rows as one new part (atomically). Returns its path."""
        self._parts += 1
        final = self.path / f"part-{self.run_id}-{self._parts:05d}.parquet"
        tmp = final.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, final)
        return final

    def write_errors(self, rows: list[dict]) -> None:
        """Append error rows (each with this run's id) to ``errors.jsonl``."""
        with self.errors_path.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({"run_id": self.run_id, **row}) + "\n")

    def write_run(self, info: dict) -> Path:
        """Replace ``run.json`` (atomically) with ``info`` and this run's id."""
        path = self.run_path
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, **info}, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def read_all(self) -> pa.Table:
        """Every part as one table (for reports and tests)."""
        parts = sorted(self.path.glob(PART_GLOB))
        return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})
