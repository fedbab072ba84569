"""Tokens leaving the decode windows: device K/V → the host stores, with no host sync of their own.

On a CPU the leaving K/V of a layer are host copies already: they go to the stores at once, so
their background insert overlaps the step's later layers. On an accelerator each layer's leaving
K/V are copied into pinned host memory with ``non_blocking=True`` and handed to the stores only
after the step's one device→host transfer (the sampled ids, :func:`icecache_ray.engine.runner.run_stage`):
that transfer is queued on the same stream behind every copy, so once it has returned the copies
are complete. A stage that made no transfer of its own waits for its stream (counted as one).

Either way the stores get them before the next step's layers take their changes, so a delta
issued at step t still lands at step t + 1 (``SparseRows._settle``).
"""

from __future__ import annotations

import numpy as np
import torch

from icecache_ray.engine.transfers import host_transfers, to_host, wait_for_device


class LeavingTokens:
    """The runner's hand-over of leaving window tokens to its layers' stores (see module docstring).

    ``defer``: hold them until :meth:`flush` (``None``: on any device but the CPU)."""

    def __init__(self, device, defer: bool | None = None) -> None:
        self.device = torch.device(device)
        self.defer = self.device.type != "cpu" if defer is None else defer
        self.pending: list[tuple[object, list[tuple[str, torch.Tensor]]]] = []
        self._queued_at = 0  # device→host transfers made before the last staged copy was queued

    def hand_over(self, stores, items: list[tuple[str, torch.Tensor]]) -> None:
        """``items``: (sequence, K/V [2, H, m, d] on the device) of one layer, for ``stores``."""
        if not self.defer:
            stores.insert([(seq, *_host_pair(kv)) for seq, kv in items])
            return
        self.pending.append((stores, [(seq, _stage(kv)) for seq, kv in items]))
        self._queued_at = host_transfers()

    def flush(self) -> None:
        """After the step's device→host transfer: the staged copies to their stores. A transfer
        made after the last copy was queued has waited for it; without one, wait for the stream."""
        if not self.pending:
            return
        if host_transfers() == self._queued_at:
            wait_for_device(self.device)
        pending, self.pending = self.pending, []
        for stores, staged in pending:
            stores.insert([(seq, kv[0].numpy(), kv[1].numpy()) for seq, kv in staged])


def _stage(kv: torch.Tensor) -> torch.Tensor:
    """A float32 host tensor that ``kv`` [2, H, m, d] is being copied into (asynchronously from a GPU:
    pinned memory); read it only after the stream has passed the copy."""
    out = torch.empty(kv.shape, dtype=torch.float32, pin_memory=kv.device.type == "cuda")
    out.copy_(kv.float(), non_blocking=True)  # converted on the device first, then one copy
    return out


def _host_pair(kv: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """K, V [H, m, d] float32 host copies of ``kv`` [2, H, m, d] (off a CPU: a blocking, counted transfer)."""
    host = to_host(kv, count=kv.device.type != "cpu")
    return host[0], host[1]
