"""How many times each batch has entered an engine stage (plain Python: no torch, no ray).

Ray Data restarts a dead engine actor and resubmits the batches it held, forever by default
(``max_restarts=-1``, ``max_task_retries=-1``): one document that kills its replica every time
(an out-of-memory prompt, a bad node) would stall the pipeline. The stage asks an
:class:`Attempts` (one small actor per pipeline) which attempt a batch is on, so the rows of a
batch whose replica died ``max_attempts`` times come back as errors instead. Only batches in flight
are held: a batch's entry goes when its rows are returned.
"""

from __future__ import annotations

import hashlib

import numpy as np


class Attempts:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def begin(self, key: str) -> int:
        """Count one more attempt of batch ``key``; returns its number (1 = first)."""
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._counts[key]

    def end(self, key: str) -> None:
        """Batch ``key`` returned its rows: forget it."""
        self._counts.pop(key, None)

    def in_flight(self) -> int:
        return len(self._counts)


def batch_key(batch: dict) -> str:
    """A digest of a batch's ``id`` (if any) and ``prompt_ids`` columns: the same batch resubmitted
    after its actor died has the same key. Two identical batches in flight at once share it (they
    would only be cut short if their replicas kept dying)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("id", "prompt_ids"):
        for value in batch.get(name, ()):
            h.update(np.asarray(value).tobytes() if name == "prompt_ids" else str(value).encode())
            h.update(b"\0")
    return h.hexdigest()
