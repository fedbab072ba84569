"""Device→host transfers of a step, counted: every one a decode step makes goes through here.

On a GPU a device→host copy blocks the host until the device has caught up, so the decode step
makes exactly one (the sampled token ids, or the logits when asked for). Host-side selection and
the other host paths still copy queries and K/V back; routing them through :func:`to_host` makes
that cost visible (``StepStats.host_syncs``) and testable on a CPU, where the same calls are free.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_counts = threading.local()


def to_host(x: torch.Tensor, count: bool = True) -> np.ndarray:
    """A host NumPy copy of ``x`` (float tensors as float32), counted as one device→host transfer
    unless ``count`` is False (copies outside a decode step, e.g. a finished prefill)."""
    if count:
        _counts.n = getattr(_counts, "n", 0) + 1
    if x.is_floating_point() and x.dtype != torch.float32:
        x = x.float()
    return x.detach().cpu().numpy().copy()


def host_transfers() -> int:
    """Device→host transfers made by this thread so far."""
    return getattr(_counts, "n", 0)


def wait_for_device(device: torch.device) -> None:
    """Block until ``device``'s current stream has done its queued work (a no-op on a CPU); counted
    like a transfer, since it blocks the host the same way."""
    if device.type == "cpu":
        return
    _counts.n = getattr(_counts, "n", 0) + 1
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    else:
        torch.accelerator.synchronize(device)
