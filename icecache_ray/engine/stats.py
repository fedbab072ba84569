"""Per-step decode statistics (plain Python: no torch, no ray)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class StepStats:
    """Counters of one decode step, summed over the sparse layers (times in milliseconds).

    select_ms: page selection (index queries); load_ms: gathering missing pages from the host pool
    into device slots; attend_ms: attention over sink + slots + window; pages_selected /
    pages_loaded / bytes_loaded: slot traffic; pages_hit: selected pages already resident;
    host_syncs: device→host transfers (each blocks the host on a GPU; the step's own ids included).
    """

    select_ms: float = 0.0
    load_ms: float = 0.0
    attend_ms: float = 0.0
    pages_selected: int = 0
    pages_loaded: int = 0
    pages_hit: int = 0
    bytes_loaded: int = 0
    host_syncs: int = 0

    @property
    def hit_rate(self) -> float:
        return self.pages_hit / self.pages_selected if self.pages_selected else 1.0

    def add(self, other: "StepStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
