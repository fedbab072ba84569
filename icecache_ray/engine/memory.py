"""Device-resident KV accounting: what a cache holds on the model's device, and its peak.

Counted per layer: a dense layer's K/V (with any spare room it holds); a sparse layer's sink,
window and page slots. During prefill a sparse layer also returns the whole prompt's K/V of that
layer for dense attention; those tensors are transient (dropped when the layer is done) and
:class:`KVMeter` adds them to the running total only while that layer's update is the latest
one, which is exactly the bound the design promises: dense layers + one layer's full K/V + every
sparse layer's resident set.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache

from icecache_ray.engine.sparse_layer import SparseLayer


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def layer_device_bytes(layer) -> int:
    """Bytes of K/V a cache layer keeps on the device between steps."""
    resident = getattr(layer, "device_bytes", None)
    if resident is not None:
        return resident()
    return _nbytes(getattr(layer, "keys", None), getattr(layer, "values", None))


def device_kv_bytes(cache: Cache, sparse_only: bool = False) -> int:
    """Resident device K/V bytes of every layer of ``cache`` (or of its sparse layers only: the
    part that does not grow with the context)."""
    return sum(layer_device_bytes(layer) for layer in cache.layers if not sparse_only or isinstance(layer, SparseLayer))


class KVMeter:
    """Tracks the peak device K/V of one cache while a forward pass runs under :meth:`tracking`."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.peak = 0

    def current(self, sparse_only: bool = False) -> int:
        return device_kv_bytes(self.cache, sparse_only)

    @contextlib.contextmanager
    def tracking(self):
        """Wrap this cache instance's ``update`` (no class or library is patched) to sample the
        resident bytes plus the transient K/V each layer returns."""
        original = self.cache.update

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            k, v = original(key_states, value_states, layer_idx, *args, **kwargs)
            layer = self.cache.layers[layer_idx]
            transient = 0 if getattr(layer, "keys", None) is k else _nbytes(k, v)
            self.peak = max(self.peak, self.current() + transient)
            return k, v

        self.cache.update = update
        try:
            yield self
        finally:
            del self.cache.update  # back to the class method
