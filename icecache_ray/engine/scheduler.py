"""The replica's scheduler: waiting and running queues, rows, host pages, the step's token budget.

Plain Python (no torch, no ray), one per replica. Each :meth:`Scheduler.schedule` forms the next
step from scratch (as nano-vllm does): one decode token for every running sequence, then prompt
chunks of sequences still prefilling and of newly admitted ones, within ``max_step_tokens``. A
waiting sequence is admitted when a device row is free and its worst-case host pages fit the
ledger of every index service; it keeps both until it finishes, and they are lent to the next
waiting sequence at once. A sequence that could never fit is refused when it is added.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np

from icecache_ray.engine.plan import StepPlan
from icecache_ray.engine.sequence import Sequence, SeqStatus

HostNeed = Callable[[int], dict]  # max tokens of a sequence -> {service key: host pages}


class Refused(ValueError):
    """A request that can never run on this replica (too long for a row, or for the host pool)."""


class HostLedger:
    """Host pages reserved per index service against each service's capacity."""

    def __init__(self, capacity: dict) -> None:
        self.capacity = dict(capacity)
        self.used = {key: 0 for key in capacity}
        self.held: dict[str, dict] = {}

    def fits(self, need: dict, empty: bool = False) -> bool:
        """Would ``need`` fit now (or, with ``empty``, with nothing else reserved)?"""
        return all(n <= self.capacity[key] - (0 if empty else self.used[key]) for key, n in need.items())

    def reserve(self, owner: str, need: dict) -> None:
        for key, n in need.items():
            self.used[key] += n
        self.held[owner] = dict(need)

    def release(self, owner: str) -> None:
        for key, n in self.held.pop(owner, {}).items():
            self.used[key] -= n


class Scheduler:
    """Queues, rows and budgets of one replica (see module docstring)."""

    def __init__(self, max_running: int, max_step_tokens: int, max_seq_len: int, host_need: HostNeed | None = None,
                 host_capacity: dict | None = None) -> None:
        self.max_running, self.max_step_tokens, self.max_seq_len = max_running, max_step_tokens, max_seq_len
        self.host_need = host_need or (lambda n: {})
        self.ledger = HostLedger(host_capacity or {})
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # PREFILLING or RUNNING, in admission order
        self.free_rows = list(range(max_running))
        self._released: list[tuple[str, int]] = []

    # ------------------------------------------------------------------ requests
    def check(self, seq: Sequence) -> None:
        """Raise :class:`Refused` if ``seq`` could never run here (before anything is queued)."""
        if seq.max_length > self.max_seq_len:
            raise Refused(f"{seq.prompt_len} prompt tokens + max_new_tokens={seq.max_new_tokens} exceed the "
                          f"{self.max_seq_len} tokens a row holds (EngineConfig.max_seq_len)")
        need = self.host_need(seq.max_length)
        if not self.ledger.fits(need, empty=True):
            key, most = max(need.items(), key=lambda kv: kv[1] - self.ledger.capacity[kv[0]])
            raise Refused(f"needs {most} host pages on index service {key} but it holds {self.ledger.capacity[key]} "
                          f"(raise the pool capacity, or send a shorter prompt / fewer new tokens)")

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        """Sequences queued or running, or finished ones whose rows the stages have yet to free."""
        return bool(self.waiting or self.running or self._released)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> tuple[StepPlan, np.ndarray] | None:
        """The next step's plan and its input token ids [N] (None when nothing can run)."""
        decodes = sorted((s for s in self.running if s.status is SeqStatus.RUNNING), key=lambda s: s.row)
        segments = [(s.seq_id, s.row, s.length - 1, 1, s.prompt_len) for s in decodes]
        tokens = [np.asarray([s.output[-1]], np.int64) for s in decodes]
        budget = self.max_step_tokens - len(decodes)
        for seq in [s for s in self.running if s.status is SeqStatus.PREFILLING]:
            budget = self._add_chunk(seq, budget, segments, tokens)
        while budget > 0 and self._admit_next():
            budget = self._add_chunk(self.running[-1], budget, segments, tokens)
        released, self._released = self._released, []
        if not segments:
            if released:
                return StepPlan.build([], 0, released), np.zeros(0, np.int64)
            return None
        return StepPlan.build(segments, len(decodes), released), np.concatenate(tokens)

    @staticmethod
    def _add_chunk(seq: Sequence, budget: int, segments: list, tokens: list) -> int:
        """Schedule the next prompt chunk of ``seq`` (at most ``budget`` tokens); returns what is left."""
        n = min(seq.remaining_prompt, budget)
        if n > 0:
            segments.append((seq.seq_id, seq.row, seq.prefilled, n, seq.prompt_len))
            tokens.append(np.asarray(seq.prompt[seq.prefilled : seq.prefilled + n], np.int64))
        return budget - max(n, 0)

    def _admit_next(self) -> bool:
        """Give the first waiting sequence a row and its host pages, if both are free (first come,
        first served: a sequence that does not fit yet keeps the ones behind it waiting)."""
        if not (self.waiting and self.free_rows):
            return False
        seq = self.waiting[0]
        need = self.host_need(seq.max_length)
        if not self.ledger.fits(need):
            return False
        self.waiting.popleft()
        self.ledger.reserve(seq.seq_id, need)
        seq.row, seq.status = self.free_rows.pop(0), SeqStatus.PREFILLING
        seq.stats.admitted_at = time.perf_counter()
        self.running.append(seq)
        return True

    def admit_prefilled(self, seq: Sequence) -> None:
        """Give ``seq`` a row and its pages now, its prompt counted as already run (its K/V come
        from elsewhere); ValueError if no row or not enough pages are free."""
        self.check(seq)
        if self.waiting or not self.free_rows or not self.ledger.fits(self.host_need(seq.max_length)):
            raise ValueError("no free row or host pages for a prefilled sequence now")
        self.waiting.append(seq)
        self._admit_next()
        seq.prefilled, seq.status = seq.prompt_len, SeqStatus.RUNNING

    def finish_step(self, plan: StepPlan, next_tokens: list[int]) -> list[Sequence]:
        """Apply a step's results: ``next_tokens`` holds one id per emitting segment (plan order).
        Returns the sequences that finished."""
        by_id = {s.seq_id: s for s in self.running}
        emits = plan.emits.tolist()
        tokens = iter(next_tokens)
        finished = []
        for i, seq_id in enumerate(plan.seq_ids):
            seq = by_id[seq_id]
            if i >= plan.n_decode:
                seq.prefilled += int(plan.lengths[i])
            if not emits[i]:
                continue
            seq.status = SeqStatus.RUNNING
            if seq.append(next(tokens)):
                self.retire(seq)
                finished.append(seq)
        return finished

    # ------------------------------------------------------------------ endings
    def fail(self, seq: Sequence, reason: str) -> None:
        """End one sequence with an error (its row and pages are freed)."""
        seq.error, seq.finish_reason = reason, "error"
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.status = SeqStatus.FAILED
            seq.stats.finished_at = time.perf_counter()
        elif seq in self.running:
            self.retire(seq, SeqStatus.FAILED)

    def fail_all(self, reason: str) -> list[Sequence]:
        """End every queued and running sequence with ``reason``; returns them."""
        every = list(self.running) + list(self.waiting)
        for seq in every:
            self.fail(seq, reason)
        return every

    def retire(self, seq: Sequence, status: SeqStatus = SeqStatus.FINISHED) -> None:
        """End a running sequence: its row and host pages go back at once (its stages free them at
        the next step)."""
        seq.status = status
        seq.stats.finished_at = time.perf_counter()
        self.running.remove(seq)
        self.ledger.release(seq.seq_id)
        self._released.append((seq.seq_id, seq.row))
        self.free_rows.append(seq.row)
        self.free_rows.sort()  # lowest rows first keeps the busy rows contiguous
        seq.row = None
