"""Progress of a batch job in its log: documents done / total, tokens/s, ETA."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("icecache_ray.jobs.progress")


class Progress:
    """Counts ended documents; logs a line at most every ``interval_s`` seconds and at the end."""

    def __init__(self, total: int, interval_s: float = 10.0) -> None:
        self.total, self.done, self.tokens = total, 0, 0
        self.interval_s = interval_s
        self.start = time.perf_counter()
        self._logged = float("-inf")

    def update(self, documents: int, tokens: int) -> None:
        """Count finished documents (ok or failed) and generated tokens."""
        self.done += documents
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._logged >= self.interval_s or self.done >= self.total:
            self._logged = now
            self.log()

    def log(self) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / self.done * max(0, self.total - self.done) if self.done else float("nan")
        log.info("[%d/%d documents] %.1f tokens/s, elapsed %s, ETA %s", self.done, self.total, rate, _clock(elapsed), _clock(eta))


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: unknown yet
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
