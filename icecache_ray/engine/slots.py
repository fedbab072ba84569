"""Device-resident page slots of one (sequence, layer, KV head): diff, bulk load, valid counts.

The selected host pages are compared with what the slots already hold; only missing (or dirty)
pages are gathered from the host pool into one staging array, copied to the device once, and
scattered into free slots. Attention reads every slot with a per-slot valid-token count, so slot
order does not matter (keys are post-RoPE).
"""

from __future__ import annotations

import numpy as np
import torch


class PageSlots:
    """``n_slots`` page slots on ``device``: K/V ``[n_slots, P, d]`` and valid counts ``[n_slots]``."""

    def __init__(self, n_slots: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.keys = torch.zeros(n_slots, page_size, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.resident: dict[int, int] = {}  # pool page -> slot
        self.page_size = page_size

    def invalidate(self, pool_pages) -> None:
        """Forget pages whose host contents changed (the next selection reloads them)."""
        for page in pool_pages:
            self.resident.pop(int(page), None)

    def load(self, pool, pool_pages: np.ndarray, counts: np.ndarray) -> tuple[int, int, int]:
        """Make exactly ``pool_pages`` resident (valid = ``counts``); others get valid 0.

        Returns (pages loaded, pages already resident, bytes copied host -> device).
        """
        wanted = {int(p): int(c) for p, c in zip(pool_pages, counts)}
        keep = {p: s for p, s in self.resident.items() if p in wanted}
        free = [s for s in range(self.keys.shape[0]) if s not in set(keep.values())]
        missing = [p for p in wanted if p not in keep]
        if missing:
            staging = torch.from_numpy(pool.read(np.asarray(missing)))  # one gather: [n, 2, P, d]
            staging = staging.to(self.keys.device, self.keys.dtype, non_blocking=True)  # one copy
            slots = torch.as_tensor(free[: len(missing)], device=self.keys.device)
            self.keys[slots] = staging[:, 0]  # one scatter each
            self.values[slots] = staging[:, 1]
            keep.update(zip(missing, free[: len(missing)]))
        self.resident = keep
        valid = torch.zeros_like(self.valid)
        if keep:
            idx = torch.as_tensor(list(keep.values()), device=valid.device)
            valid[idx] = torch.as_tensor([wanted[p] for p in keep], device=valid.device)
        self.valid = valid
        nbytes = len(missing) * 2 * self.keys.shape[1] * self.keys.shape[2] * self.keys.element_size()
        return len(missing), len(wanted) - len(missing), nbytes

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [n_slots * P, d], values [n_slots * P, d], mask [n_slots * P] bool)."""
        offsets = torch.arange(self.page_size, device=self.valid.device)
        mask = (offsets[None, :] < self.valid[:, None]).reshape(-1)
        return self.keys.reshape(-1, self.keys.shape[-1]), self.values.reshape(-1, self.values.shape[-1]), mask
