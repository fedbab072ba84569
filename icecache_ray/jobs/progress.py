"""Progress of a batch job in its log, in tokens: prompt tokens prefilled and tokens generated
against their totals, documents done and failed, the rates and an ETA.

Documents say little under continuous batching (every document of a batch ends in the same step,
minutes after the first prefill), so :class:`Progress` counts the engine's work: the totals are
the prompt tokens of the documents to do (their chat prompts, counted before generation starts)
and ``max_new_tokens`` per document (an upper bound: a document that ends early at EOS gives its
unused tokens back, a failed one its whole share). What is done is the engine's work so far:
prompt tokens run through the model and tokens generated, fed after its steps (the local engine
in this process; the Ray Data replicas through :class:`~icecache_ray.data.inflight.InFlight`),
and never less than the tokens of the documents that ended. Nothing shown is ever above its total
(work a failed document or a retried batch did beyond its share is not shown).

Rates: the time between two updates goes to prefill and to decode in proportion to the work each
did in it (at the rates seen so far; by token counts until both are known), so the prefill rate is
prompt tokens per second of prefilling and the decode rate generated tokens per second of
decoding. ETA = remaining prompt tokens / prefill rate + remaining tokens / decode rate (``>``: a
lower bound, while one of the rates is not known yet).

:meth:`Progress.ticking` logs a line every ``interval_s`` seconds from a background thread (also
while one long prefill step runs) and a last one at the end.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

log = logging.getLogger("icecache_ray.jobs.progress")

MIN_PHASE_S = 1.0  # a rate needs this much time of its phase behind it


@dataclass(frozen=True)
class Snapshot:
    """What one progress line says (every ``*_done`` at most its ``*_total``)."""

    documents: int
    ok: int
    failed: int
    prompt_done: int
    prompt_total: int
    generated_done: int
    generated_total: int
    prefill_rate: float | None  # prompt tokens per second of prefill (None: not known yet)
    decode_rate: float | None  # generated tokens per second of decode
    elapsed_s: float
    eta_s: float | None  # None: nothing to go on yet
    eta_is_lower_bound: bool

    def line(self) -> str:
        """The log line."""
        eta = "?" if self.eta_s is None else (">" if self.eta_is_lower_bound else "") + clock(self.eta_s)
        return (f"{self.ok} of {self.documents} documents done, {self.failed} failed | "
                f"prompt {self.prompt_done:,}/{self.prompt_total:,} tokens prefilled ({_rate(self.prefill_rate)}) | "
                f"generated {self.generated_done:,}/{self.generated_total:,} tokens ({_rate(self.decode_rate)}) | "
                f"elapsed {clock(self.elapsed_s)}, ETA {eta}")


class Progress:
    """A job's progress in tokens (see module docstring). Thread-safe."""

    def __init__(self, max_new_tokens: int = 0, interval_s: float = 10.0, clock_fn: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"Progress.interval_s={interval_s!r}: must be positive")
        self.max_new_tokens, self.interval_s, self._now = max_new_tokens, interval_s, clock_fn
        self._lock = threading.RLock()  # reentrant: :meth:`together` holds it around other methods
        self.documents = self.ok = self.failed = 0
        self._prompt_total = self._generated_total = 0  # the plan, less what ended documents gave back
        self._ended_prompt = self._ended_generated = 0  # tokens of documents that ended
        self._work = (0, 0)  # (prompt tokens prefilled, tokens generated) by the engine so far
        self.start = self._now()
        self._last = (self.start, 0, 0)  # (time, prompt done, generated done) at the last change
        self.prefill_s = self.decode_s = 0.0
        self._logged: tuple | None = None  # the counts of the last line logged

    # ---------------------------------------------------------------- feeding
    def plan(self, documents: int = 0, prompt_tokens: int = 0) -> None:
        """Add documents to do (each may generate up to ``max_new_tokens``) and their prompt tokens."""
        with self._lock:
            self.documents += documents
            self._prompt_total += prompt_tokens
            self._generated_total += documents * self.max_new_tokens

    def begin(self) -> None:
        """Generation starts now: the time before (loading, starting replicas) is no phase's."""
        with self._lock:
            self._last = (self._now(), *self._done())

    def ended(self, ok: bool, planned_prompt: int, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        """A document ended (summarized, or failed: then its tokens are 0). ``planned_prompt``:
        the prompt tokens :meth:`plan` counted for it."""
        with self._lock:
            self.ok += ok
            self.failed += not ok
            self._prompt_total += prompt_tokens - planned_prompt
            self._generated_total += generated_tokens - self.max_new_tokens
            self._ended_prompt += prompt_tokens
            self._ended_generated += generated_tokens
            self._account()

    @contextlib.contextmanager
    def together(self) -> Iterator["Progress"]:
        """Documents that ended in one step are counted in one go: no line shows part of them."""
        with self._lock:
            yield self

    def work(self, prefilled: int, generated: int) -> None:
        """The engine's work so far: prompt tokens prefilled and tokens generated (cumulative)."""
        with self._lock:
            self._work = (max(prefilled, self._work[0]), max(generated, self._work[1]))
            self._account()

    @property
    def tokens(self) -> int:
        """Tokens generated for the documents that ended."""
        return self._ended_generated

    # ---------------------------------------------------------------- reading
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot()

    def log(self, unless_unchanged: bool = False) -> None:
        """Log a progress line (``unless_unchanged``: not when it would only repeat the last one's counts)."""
        snap = self.snapshot()
        counts = (snap.ok, snap.failed, snap.prompt_done, snap.generated_done, snap.documents)
        if unless_unchanged and counts == self._logged:
            return
        self._logged = counts
        log.info("%s", snap.line())

    @contextlib.contextmanager
    def ticking(self, poll: Callable[[], tuple[int, int]] | None = None) -> Iterator["Progress"]:
        """Log a line now, every ``interval_s`` seconds while the block runs, and at its end.
        ``poll``: returns the engine's work so far (for :meth:`work`) before each line; its
        failures are logged and skipped."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.interval_s):
                self._poll(poll)
                self.log()

        self.log()
        thread = threading.Thread(target=tick, name="icecache-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=30)
            self._poll(poll)
            self.log(unless_unchanged=True)

    def _poll(self, poll: Callable[[], tuple[int, int]] | None) -> None:
        if poll is None:
            return
        try:
            self.work(*poll())
        except Exception as exc:  # noqa: BLE001 - progress must never end the job
            log.debug("progress poll failed: %s: %s", type(exc).__name__, exc)

    # ---------------------------------------------------------------- internals
    def _done(self) -> tuple[int, int]:
        return max(self._ended_prompt, self._work[0]), max(self._ended_generated, self._work[1])

    def _account(self) -> None:
        """Give the time since the last change to prefill and decode (see module docstring)."""
        now, (prompt, generated) = self._now(), self._done()
        then, prompt_then, generated_then = self._last
        dp, dg = max(0, prompt - prompt_then), max(0, generated - generated_then)
        if dp == 0 and dg == 0:
            return  # nothing new: the time stays with the next change
        prefill, decode = self._rates(prompt_then, generated_then)
        if prefill and decode:
            cost_p, cost_g = dp / prefill, dg / decode
        else:  # until both rates are known: by token counts
            cost_p, cost_g = dp, dg
        share = cost_p / (cost_p + cost_g)
        self.prefill_s += (now - then) * share
        self.decode_s += (now - then) * (1 - share)
        self._last = (now, prompt, generated)

    def _rates(self, prompt: int, generated: int) -> tuple[float | None, float | None]:
        """Tokens per second of prefill and of decode, given that much work done (None: not known yet)."""
        prefill = prompt / self.prefill_s if self.prefill_s >= MIN_PHASE_S and prompt else None
        decode = generated / self.decode_s if self.decode_s >= MIN_PHASE_S and generated else None
        return prefill, decode

    def _snapshot(self) -> Snapshot:
        work_prompt, work_generated = self._done()
        prefill, decode = self._rates(work_prompt, work_generated)
        prompt_total, generated_total = max(0, self._prompt_total), max(0, self._generated_total)
        prompt, generated = min(work_prompt, prompt_total), min(work_generated, generated_total)
        eta, lower = 0.0, False
        for remaining, rate in ((prompt_total - prompt, prefill), (generated_total - generated, decode)):
            if remaining <= 0:
                continue
            if rate:
                eta += remaining / rate
            else:
                lower = True
        return Snapshot(
            documents=max(self.documents, self.ok + self.failed), ok=self.ok, failed=self.failed,
            prompt_done=prompt, prompt_total=prompt_total, generated_done=generated, generated_total=generated_total,
            prefill_rate=prefill, decode_rate=decode, elapsed_s=self._now() - self.start,
            eta_s=None if lower and eta == 0 else eta, eta_is_lower_bound=lower)


def clock(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s``."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _rate(rate: float | None) -> str:
    return "? tokens/s" if rate is None else f"{rate:,.1f} tokens/s"
