"""``IceCache``: a transformers ``Cache`` whose budgeted layers keep only sink + window on device.

Use it with stock ``model.generate``::

    cache = IceCache(model, IceCacheConfig(budget=256))
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64, do_sample=False)
    cache.close()

Constructing the cache registers our attention function (``icecache_sparse``) and switches *that
model instance* to it; with any other cache the function is plain SDPA, so the model keeps working
as before. Nothing in transformers is patched and importing the package changes nothing.
"""

from __future__ import annotations

import contextvars

from transformers.cache_utils import Cache, DynamicLayer

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.runtime import SparseRuntime
from icecache_ray.engine.sparse_layer import SparseLayer
from icecache_ray.hf_attention import register_attention, sdpa_attention

SPARSE_ATTENTION = "icecache_sparse"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The layer whose update() ran last in this thread; the attention call right after consumes it.
_ACTIVE_LAYER: contextvars.ContextVar[SparseLayer | None] = contextvars.ContextVar("icecache_layer", default=None)


def sparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``icecache_sparse`` (see module docstring)."""
    layer = _ACTIVE_LAYER.get()
    _ACTIVE_LAYER.set(None)
    if layer is None or layer.prefill_step or layer.layer_idx != getattr(module, "layer_idx", None):
        return sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return layer.attend(query, scaling if scaling is not None else query.shape[-1] ** -0.5), None


def check_model(model, config: IceCacheConfig) -> tuple[int, int]:
    """Reject unsupported or mismatched models before any work. Returns (n_layers, head_dim)."""
    mc = model.config
    if getattr(mc, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={getattr(mc, 'model_type', None)!r}: supported are {list(SUPPORTED_MODEL_TYPES)}")
    if getattr(mc, "sliding_window", None) and mc.model_type == "mistral" and mc.sliding_window < mc.max_position_embeddings:
        raise ValueError(f"sliding_window={mc.sliding_window}: sliding-window attention models are not supported")
    n_layers = mc.num_hidden_layers
    if config.n_full_layers > n_layers:
        raise ValueError(f"IceCacheConfig.n_full_layers={config.n_full_layers} exceeds the model's {n_layers} layers")
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    return n_layers, head_dim


class IceCache(Cache):
    """Dense layers for the first ``n_full_layers`` (and for every layer with policy ``full``),
    :class:`SparseLayer` for the rest."""

    def __init__(self, model, config: IceCacheConfig | None = None) -> None:
        config = config or IceCacheConfig()
        n_layers, head_dim = check_model(model, config)
        self.config = config
        self.runtime = SparseRuntime(config, head_dim) if config.policy != "full" else None
        layers = [
            DynamicLayer() if (i < config.n_full_layers or self.runtime is None) else SparseLayer(i, self.runtime)
            for i in range(n_layers)
        ]
        super().__init__(layers=layers)
        self._first_sparse = next((i for i, l in enumerate(layers) if isinstance(l, SparseLayer)), None)
        model.set_attn_implementation(register_attention(SPARSE_ATTENTION, sparse_attention))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if isinstance(layer, SparseLayer):
            if layer_idx == self._first_sparse and layer.seq_len > 0:
                self.runtime.begin_step()
            _ACTIVE_LAYER.set(layer)
        else:
            _ACTIVE_LAYER.set(None)
        return layer.update(key_states, value_states, *args, **kwargs)

    @property
    def stats(self):
        """Per-step :class:`StepStats` of the decode steps so far (``RequestStats``)."""
        return self.runtime.stats if self.runtime is not None else None

    def close(self) -> None:
        """Finish background work, free host pages and unlink the pool (idempotent)."""
        for layer in self.layers:
            if isinstance(layer, SparseLayer):
                layer.close()
        if self.runtime is not None:
            self.runtime.close()
