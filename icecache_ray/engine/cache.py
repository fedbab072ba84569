"""``IceCache``: a transformers ``Cache`` whose budgeted layers keep only sink + window on device.

Use it with stock ``model.generate``::

    cache = IceCache(model, IceCacheConfig(budget=256))
    out = model.generate(input_ids, cache=cache, max_new_tokens=64, do_sample=False)
    cache.close()

Constructing the cache registers our attention function (``icecache_sparse``) and switches *that
model instance* to it; with any other cache the function is plain SDPA, so the model keeps working
as before. Nothing in transformers is patched and importing the package changes nothing.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.dense_layer import GrowingLayer
from icecache_ray.engine.runtime import SparseRuntime
from icecache_ray.engine.sparse_layer import SparseLayer
from icecache_ray.hf_attention import register_attention, sdpa_attention

SPARSE_ATTENTION = "icecache_sparse"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The layer whose update() ran last in this thread; the attention call right after consumes it.
_ACTIVE_LAYER: contextvars.ContextVar[SparseLayer | None] = contextvars.ContextVar("icecache_layer", default=None)
# Query rows per prefill attention call of the IceCache whose update ran last (None: one call).
_PREFILL_CHUNK: contextvars.ContextVar[int | None] = contextvars.ContextVar("icecache_chunk", default=None)


def sparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``icecache_sparse`` (see module docstring).

    Prefill (and every layer of another cache) is dense causal attention, in query chunks of
    ``prefill_chunk`` rows when an IceCache is active and the prompt has a mask (padding); without
    one, torch's fused causal kernel needs no score workspace and runs in one call (1.6x less
    attention work than masked chunks at 7k tokens). A sparse layer then keeps its resident set.
    Decode steps of sparse layers attend over sink + selected pages + window."""
    layer = _ACTIVE_LAYER.get()
    _ACTIVE_LAYER.set(None)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is not None and not layer.prefill_step and layer.layer_idx == getattr(module, "layer_idx", None):
        return layer.attend(query, scaling), None
    chunk = _PREFILL_CHUNK.get()
    if chunk is None or query.shape[2] <= chunk or attention_mask is None:
        out = sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    else:
        out = (chunked_causal_attention(query, key, value, attention_mask, scaling, chunk), None)
    if layer is not None and layer.prefill_step:
        layer.finish_prefill(attention_mask)
    return out


def chunked_causal_attention(query, key, value, attention_mask, scaling: float, chunk: int) -> torch.Tensor:
    """Causal attention in query chunks: query [B, Hq, n, d], key/value [B, H, kv, d] (the last n
    keys are the queries' own positions), mask [B, 1, n, kv] bool/additive or None.
    Returns [B, n, Hq, d]. Each chunk only sees keys up to its last query."""
    n, kv = query.shape[2], key.shape[2]
    past = kv - n
    outs = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        k, v = key[:, :, : past + end], value[:, :, : past + end]
        if attention_mask is not None:
            mask = attention_mask[:, :, start:end, : past + end]
        else:
            q_pos = torch.arange(past + start, past + end, device=query.device)
            mask = torch.arange(past + end, device=query.device)[None, :] <= q_pos[:, None]
        outs.append(F.scaled_dot_product_attention(query[:, :, start:end], k, v, attn_mask=mask, scale=scaling, enable_gqa=True))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


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
    """Dense layers (:class:`GrowingLayer`) for the first ``n_full_layers`` (and for every layer
    with policy ``full``), :class:`SparseLayer` for the rest."""

    def __init__(self, model, config: IceCacheConfig | None = None, stores_factory=None, layer_range: range | None = None) -> None:
        """``stores_factory(layer_idx)`` -> a zero-argument maker of that layer's store backend
        (default: stores in this process; the Ray runtime passes remote index services).
        ``layer_range``: the layers this cache serves (a pipeline stage); the others hold nothing.
        A stage must not start inside a layer-reuse run (its anchor would live in another stage)."""
        config = config or IceCacheConfig()
        n_layers, head_dim = check_model(model, config)
        served = layer_range if layer_range is not None else range(n_layers)
        self.config = config
        self.runtime = SparseRuntime(config, head_dim) if config.policy != "full" else None
        layers = []
        for i in range(n_layers):
            if i < config.n_full_layers or self.runtime is None or i not in served:
                layers.append(GrowingLayer())
                continue
            first_of_run = config.n_full_layers + (i - config.n_full_layers) // config.layer_reuse * config.layer_reuse
            if first_of_run not in served:
                raise ValueError(f"layer_range={served}: starts inside a layer_reuse={config.layer_reuse} run (anchor layer {first_of_run})")
            anchor = layers[first_of_run] if first_of_run != i else None
            layers.append(SparseLayer(i, self.runtime, anchor, stores_factory(i) if stores_factory else None))
        super().__init__(layers=layers)
        self._first_sparse = next((i for i, l in enumerate(layers) if isinstance(l, SparseLayer)), None)
        model.set_attn_implementation(register_attention(SPARSE_ATTENTION, sparse_attention))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        _PREFILL_CHUNK.set(self.config.prefill_chunk)
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

    def load_prefill(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Take a finished dense prefill's K/V (per layer [B, H, T, d], post-RoPE, no padding) as if
        this cache had run it: sparse layers keep sink + window and index the middle. Used to
        share one prefill between policies (every policy's prefill is the same dense attention)."""
        if self.get_seq_length() != 0:
            raise RuntimeError("load_prefill: the cache already holds tokens")
        for layer, k, v in zip(self.layers, keys, values):
            if isinstance(layer, SparseLayer):
                layer.update(k, v)
                layer.finish_prefill(None)
            else:
                layer.update(k.clone(), v.clone())

    def host_memory(self) -> dict[str, float]:
        """Host pool bytes in use, index metadata bytes, and both per stored token and KV head."""
        layers = [l for l in self.layers if isinstance(l, SparseLayer)]
        tokens = sum(l.stored_token_heads() for l in layers)
        pool = self.runtime.pool if self.runtime is not None else None
        pool_bytes = pool.num_used * pool.layout.page_bytes if pool is not None else 0
        index_bytes = sum(l.index_bytes() for l in layers)
        return {
            "host_pool_bytes": pool_bytes,
            "index_bytes": index_bytes,
            "host_pool_bytes_per_token_head": pool_bytes / max(1, tokens),
            "index_bytes_per_token_head": index_bytes / max(1, tokens),
        }

    def drain(self) -> None:
        """Wait until the background index work queued so far (builds, insertions) is done; the
        results are still applied at each layer's next step, as usual."""
        if self.runtime is not None:
            self.runtime.drain()

    def close(self) -> None:
        """Finish background work, free host pages and unlink the pool (idempotent)."""
        for layer in self.layers:
            if isinstance(layer, SparseLayer):
                layer.close()
        if self.runtime is not None:
            self.runtime.close()
