"""Per-step decode statistics (plain Python: no torch, no ray)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class StepStats:
    """Counters of one decode step, summed over the sparse layers (times in milliseconds).

    select_ms: page selection (index queries); load_ms: gathering missing pages from the host pool
    into device slots; attend_ms: attention over sink + slots + window; pages_selected /
    pages_loaded / bytes_loaded: slot traffic; pages_hit: selected pages already resident.
    """

    select_ms: float = 0.0
    load_ms: float = 0.0
    attend_ms: float = 0.0
    pages_selected: int = 0
    pages_loaded: int = 0
    pages_hit: int = 0
    bytes_loaded: int = 0

    @property
    def hit_rate(self) -> float:
        return self.pages_hit / self.pages_selected if self.pages_selected else 1.0

    def add(self, other: "StepStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class RequestStats:
    """StepStats aggregated over the decode steps of a request."""

    steps: list[StepStats] = field(default_factory=list)

    def total(self) -> StepStats:
        out = StepStats()
        for step in self.steps:
            out.add(step)
        return out

    def summary(self) -> dict[str, float]:
        total = self.total()
        n = max(1, len(self.steps))
        return {
            "steps": len(self.steps),
            "select_ms_per_step": total.select_ms / n,
            "load_ms_per_step": total.load_ms / n,
            "attend_ms_per_step": total.attend_ms / n,
            "pages_loaded": total.pages_loaded,
            "bytes_loaded": total.bytes_loaded,
            "hit_rate": total.hit_rate,
        }
