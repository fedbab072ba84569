"""Spread a list of independent items over a few threads (the index kernels release the GIL).

Bookkeeping only: no torch, no ray. Used by the index actors, whose selections of different
(sequence, layer, KV head) stores are independent. (In one process next to the model it gave no
measurable gain at 8k on the 2-core development machine, so the local stores select in order.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class WorkSplitter:
    """Runs ``fn`` over contiguous shares of a list: the calling thread takes the first share and
    ``threads - 1`` pool threads the others, so answers come back in item order."""

    def __init__(self, threads: int, name: str = "select") -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix=name) if threads > 1 else None

    def map_shares(self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
        """``fn(share)`` returns one answer per item of its share; returns all answers in order."""
        if self._pool is None or len(items) < 2:
            return list(fn(items))
        n = min(self.threads, len(items))
        cut = [len(items) * i // n for i in range(n + 1)]
        futures = [self._pool.submit(fn, items[a:b]) for a, b in zip(cut[1:-1], cut[2:])]
        answers = list(fn(items[: cut[1]]))
        for future in futures:
            answers.extend(future.result())
        return answers

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
