"""Which pool page each page slot holds, per (row, KV head) of one sparse layer, on the device.

A step's wanted pages are matched against what the slots hold: pages still wanted keep their slot,
the others take the freed slots in order, and only those are copied. All in static-shape tensor
ops (no data-dependent sizes), so planning never waits for the device. Slot order does not matter
to attention (keys are post-RoPE and each slot carries its valid-row count).
"""

from __future__ import annotations

import torch


class DeviceSlots:
    """``page`` [R, H, S] (pool page held, -1 = none), ``count`` [R, H, S] (its valid rows)."""

    def __init__(self, n_rows: int, heads: int, n_slots: int, device) -> None:
        self.page = torch.full((n_rows, heads, n_slots), -1, dtype=torch.long, device=device)
        self.count = torch.zeros((n_rows, heads, n_slots), dtype=torch.long, device=device)

    @property
    def n_slots(self) -> int:
        return self.page.shape[2]

    def reset_row(self, row: int) -> None:
        self.page[row] = -1
        self.count[row] = 0

    def drop(self, pool_pages: torch.Tensor) -> None:
        """Forget every slot holding one of ``pool_pages`` [m] (their contents changed)."""
        if pool_pages.numel():
            stale = torch.isin(self.page, pool_pages)
            self.page.masked_fill_(stale, -1)
            self.count.masked_fill_(stale, 0)

    def plan(self, rows: torch.Tensor, want: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make ``want`` [n, H, k] (distinct pool pages per item, -1 = none; k <= S) resident in
        ``rows`` [n] with valid rows ``counts`` [n, H, k]. Returns (missing [n, H, k] bool: pages to
        copy, slot [n, H, k]: the slot each wanted page ends in). Every other slot ends with count 0."""
        held = self.page[rows]  # [n, H, S]
        real = want >= 0
        match = (want[..., :, None] == held[..., None, :]) & real[..., :, None]  # [n, H, k, S]
        keep = match.any(-2)  # slots whose page is still wanted
        missing = real & ~match.any(-1)
        free_first = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)  # free slots in order, then kept
        rank = (torch.cumsum(missing.long(), -1) - 1).clamp(min=0)
        slot = torch.where(missing, free_first.gather(-1, rank), match.long().argmax(-1))
        n_slots = held.shape[-1]
        new_page = torch.cat([torch.where(keep, held, -1), held.new_full(held.shape[:-1] + (1,), -1)], -1)
        new_count = torch.zeros_like(new_page)
        target = torch.where(real, slot, n_slots)  # unreal picks write the spare column, dropped below
        new_page.scatter_(-1, target, want)
        new_count.scatter_(-1, target, counts)
        self.page[rows] = new_page[..., :n_slots]
        self.count[rows] = new_count[..., :n_slots]
        return missing, slot
