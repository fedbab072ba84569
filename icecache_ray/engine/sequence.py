"""One request as the engine sees it (plain Python: no torch, no ray).

A :class:`Sequence` owns its prompt ids, generated ids, status, the device row it was lent and
its per-request counters. The scheduler moves it WAITING -> PREFILLING -> RUNNING -> FINISHED (or
FAILED) and is the only one that changes ``status`` and ``row``.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from icecache_ray.engine.stats import StepStats

_IDS = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued: no row, no host pages yet
    PREFILLING = "prefilling"  # holds a row; prompt chunks still to run
    RUNNING = "running"  # prompt done; one token per step
    FINISHED = "finished"  # EOS or max_new_tokens
    FAILED = "failed"  # see ``error``


@dataclass
class SeqStats(StepStats):
    """Counters of one request: the :class:`StepStats` fields summed over its decode steps (times
    of a step — select / load / attend — are the step's, shared with the sequences decoding beside
    it; pages are this sequence's own), and when it was submitted, admitted, first answered, done."""

    decode_steps: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    def summary(self) -> dict:
        """Per-step means and totals (the job's and the API's ``stats``)."""
        n = max(1, self.decode_steps)
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        start = self.admitted_at if self.admitted_at is not None else self.submitted_at
        return {
            "steps": self.decode_steps,
            "select_ms_per_step": self.select_ms / n,
            "load_ms_per_step": self.load_ms / n,
            "attend_ms_per_step": self.attend_ms / n,
            "pages_loaded": self.pages_loaded,
            "bytes_loaded": self.bytes_loaded,
            "hit_rate": self.hit_rate,
            "queue_s": start - self.submitted_at,
            "wall_s": end - start,
            "ttft_s": (self.first_token_at - start) if self.first_token_at is not None else None,
        }

    def columns(self) -> dict:
        """:meth:`summary` as flat output columns (the job's Parquet parts, the Ray Data processor's
        rows): every value a plain number, ``ttft_s`` NaN when no token came."""
        st = self.summary()
        return {
            "wall_s": float(st["wall_s"]), "queue_s": float(st["queue_s"]),
            "ttft_s": float(st["ttft_s"]) if st["ttft_s"] is not None else float("nan"),
            "decode_steps": int(st["steps"]),
            **{k: float(st[k]) for k in ("select_ms_per_step", "load_ms_per_step", "attend_ms_per_step", "hit_rate")},
            "pages_loaded": int(st["pages_loaded"]), "bytes_loaded": int(st["bytes_loaded"]),
        }


class Sequence:
    """A request: prompt, generated tokens, status, row, stats (see module docstring)."""

    def __init__(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None, truncated: bool = False,
                 seq_id: str | None = None) -> None:
        self.seq_id = seq_id if seq_id is not None else f"s{next(_IDS)}"
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.truncated = truncated
        self.output: list[int] = []
        self.status = SeqStatus.WAITING
        self.row: int | None = None
        self.prefilled = 0  # prompt tokens already run through the model
        self.error: str | None = None
        self.finish_reason: str | None = None  # "eos", "length" or "error"
        self.stats = SeqStats()
        self.forced: list[int] | None = None  # teacher forcing: these are appended instead of the model's tokens

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, {self.status.value}, prompt={len(self.prompt)}, out={len(self.output)}, row={self.row})"

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def length(self) -> int:
        """Tokens in the model's cache after this step's input: prompt + generated so far."""
        return len(self.prompt) + len(self.output)

    @property
    def max_length(self) -> int:
        """Most tokens this sequence can ever hold (prompt + every new token)."""
        return len(self.prompt) + self.max_new_tokens

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt) - self.prefilled

    @property
    def done(self) -> bool:
        return self.status in (SeqStatus.FINISHED, SeqStatus.FAILED)

    def append(self, token: int) -> bool:
        """Record a generated token (the forced one, under teacher forcing); returns True when the
        sequence is complete (EOS or length)."""
        if self.forced is not None:
            token = self.forced[len(self.output)]
        self.output.append(int(token))
        if self.stats.first_token_at is None:
            self.stats.first_token_at = time.perf_counter()
        if self.eos_token_id is not None and int(token) == self.eos_token_id:
            self.finish_reason = "eos"
        elif len(self.output) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None
