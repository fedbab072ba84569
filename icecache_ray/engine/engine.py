"""The engine: continuous batching of one replica, whatever runs its stages.

::

    step():
        plan, tokens = scheduler.schedule()   # running decodes + prefill chunks, within budgets
        answer = stages(plan, tokens)         # ONE forward pass over every row (ragged, no padding)
        scheduler.finish_step(plan, answer)   # EOS / max_new_tokens: rows and pages freed at once

The stages are handles with ``submit(plan, incoming, want_logits) -> future``: in-process runners
(:class:`LocalStage`) or Ray stage workers (``icecache_ray.runtime``); the engine code is the same.
A step's stage calls are chained (stage k's answer is stage k + 1's input), so on Ray the hidden
states go worker to worker and only the next-token ids come back. :meth:`Engine.launch` /
:meth:`Engine.complete` split a step so that several replicas run theirs at the same time.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from icecache_ray.engine.done import Done
from icecache_ray.engine.plan import StepPlan
from icecache_ray.engine.runner import ModelRunner, run_stage
from icecache_ray.engine.scheduler import Scheduler
from icecache_ray.engine.sequence import Sequence

log = logging.getLogger(__name__)



class LocalStage:
    """A runner in this process as a stage handle (the step runs when submitted)."""

    failures: tuple = ()

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def submit(self, plan: StepPlan, incoming, want_logits: bool = False) -> Done:
        incoming = incoming.result() if isinstance(incoming, Done) else incoming
        return Done(run_stage(self.runner, plan, incoming, want_logits))


@dataclass
class Pending:
    """A launched step: its plan and the last stage's future."""

    plan: StepPlan
    future: object


class Engine:
    """One replica: a scheduler and the handles of its stages (see module docstring)."""

    def __init__(self, stages: list, scheduler: Scheduler, name: str = "engine", timeout_s: float | None = None) -> None:
        self.stages, self.scheduler, self.name, self.timeout_s = stages, scheduler, name, timeout_s
        self.failures = tuple(f for stage in stages for f in getattr(stage, "failures", ()))
        self.alive = True
        self.steps = 0
        self.want_logits = False  # teacher forcing / scoring: the last stage returns logits
        self.last_logits = None
        self.last_stats = None  # StepStats of the last completed step (select / load / attend ms)
        self._lock = threading.RLock()  # add() may come from other threads than step()

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> Sequence:
        """Queue a validated sequence (raises ``Refused`` if it can never run here)."""
        if not self.alive:
            raise RuntimeError(f"{self.name} is not running any more")
        with self._lock:
            self.scheduler.add(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ steps
    def launch(self) -> Pending | None:
        """Schedule the next step and start it on the stages (None: nothing to run)."""
        with self._lock:
            scheduled = self.scheduler.schedule()
        if scheduled is None:
            return None
        plan, tokens = scheduled
        incoming = tokens
        for stage in self.stages:
            incoming = stage.submit(plan, incoming, self.want_logits)
        return Pending(plan, incoming)

    def complete(self, pending: Pending) -> list[Sequence]:
        """Wait for a launched step and apply it. Returns the sequences that ended in it (a stage
        failure ends every sequence of this replica with the reason)."""
        try:
            out, counters = pending.future.result(timeout=self.timeout_s) if self.timeout_s else pending.future.result()
        except self.failures as exc:
            return self.fail(f"{self.name} failed: {_reason(exc)}")
        self.steps += 1
        with self._lock:
            self._account(pending.plan, counters)
            if self.want_logits:
                self.last_logits, tokens = out, (out.argmax(-1).tolist() if pending.plan.n_segments else [])
            else:
                tokens = out.tolist()
            return self.scheduler.finish_step(pending.plan, tokens)

    def step(self) -> list[Sequence]:
        """One whole step; returns the sequences that ended in it."""
        pending = self.launch()
        return self.complete(pending) if pending is not None else []

    def run(self) -> None:
        """Step until every queued sequence has ended."""
        while self.has_work and self.alive:
            self.step()

    def fail(self, reason: str) -> list[Sequence]:
        """Stop this replica: every queued and running sequence ends with ``reason``."""
        log.error("%s", reason)
        self.alive = False
        with self._lock:
            return self.scheduler.fail_all(reason)

    def _account(self, plan: StepPlan, counters: dict) -> None:
        """Per-sequence counters of a step: times are the step's, pages each sequence's own."""
        stats = self.last_stats = counters["stats"]
        by_id = {s.seq_id: s for s in self.scheduler.running}
        for i in range(plan.n_decode):
            st = by_id[plan.seq_ids[i]].stats
            st.decode_steps += 1
            st.select_ms += stats.select_ms
            st.load_ms += stats.load_ms
            st.attend_ms += stats.attend_ms
            st.pages_selected += int(counters["pages_selected"][i])
            st.pages_loaded += int(counters["pages_loaded"][i])
            st.pages_hit += int(counters["pages_selected"][i] - counters["pages_loaded"][i])
            st.bytes_loaded += int(counters["bytes_loaded"][i])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
