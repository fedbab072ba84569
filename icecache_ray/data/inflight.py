"""The engine replicas' work, for the job's progress: :class:`TokenMeter` counts one engine's
prompt tokens prefilled and tokens generated; :class:`InFlight` (a small Ray actor on the driver's
node) holds each replica's latest count, so the driver can log progress while the replicas still
hold every document of their running batch (:mod:`icecache_ray.jobs.progress`)."""

from __future__ import annotations

import threading


class TokenMeter:
    """Cumulative work of one engine: prompt tokens run through the model and tokens generated,
    over the sequences it was given (those in flight are read as they stand). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seqs: dict[str, object] = {}  # seq_id -> Sequence in flight
        self._ended = [0, 0]

    def add(self, seq) -> None:
        """Count ``seq`` (an :class:`~icecache_ray.engine.sequence.Sequence`) from now on."""
        with self._lock:
            self._seqs[seq.seq_id] = seq

    def ended(self, seq) -> None:
        """``seq`` ended (or was refused): keep its final counts, stop reading it."""
        with self._lock:
            if self._seqs.pop(seq.seq_id, None) is not None:
                self._ended[0] += seq.prefilled
                self._ended[1] += len(seq.output)

    def totals(self) -> tuple[int, int]:
        """(prompt tokens prefilled, tokens generated) so far."""
        with self._lock:
            seqs = list(self._seqs.values())
            prefilled, generated = self._ended
        return prefilled + sum(s.prefilled for s in seqs), generated + sum(len(s.output) for s in seqs)


class InFlight:
    """Each replica's latest :meth:`TokenMeter.totals` (a Ray actor: ``ray.remote(InFlight)``).
    A replica that dies keeps its last count: its work was done, and a retried batch is counted
    again (the job's progress never shows more than its totals)."""

    def __init__(self) -> None:
        self._by_replica: dict[str, tuple[int, int]] = {}

    def report(self, replica: str, prefilled: int, generated: int) -> None:
        self._by_replica[replica] = (int(prefilled), int(generated))

    def totals(self) -> tuple[int, int]:
        """(prompt tokens prefilled, tokens generated) over every replica."""
        return (sum(p for p, _ in self._by_replica.values()), sum(g for _, g in self._by_replica.values()))
