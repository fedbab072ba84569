"""Capture post-RoPE queries and keys from a real forward pass, through the attention registry.

A registered attention function (``icecache_capture``) records the query rows asked for and then
delegates to stock SDPA, so outputs are unchanged. Keys are read back from the ``DynamicCache``
(transformers caches keys after RoPE). The prompt runs in chunks so an 8k prompt never needs a
T x T score matrix. Nothing is patched; the model's previous attention implementation is restored.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from icecache_ray.hf_attention import register_attention, sdpa_attention

CAPTURE_ATTENTION = "icecache_capture"
_ACTIVE: contextvars.ContextVar["_Recorder | None"] = contextvars.ContextVar("icecache_capture", default=None)


@dataclass
class CapturedQK:
    """keys[layer]: [n_kv_heads, seq_len, head_dim]; queries[layer]: [n_q_heads, n_pos, head_dim]."""

    keys: dict[int, np.ndarray]
    queries: dict[int, np.ndarray]
    query_positions: np.ndarray
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    seq_len: int


class _Recorder:
    def __init__(self, layers: Sequence[int], positions: np.ndarray) -> None:
        self.layers = set(layers)
        self.positions = positions
        self.chunk_start = 0
        self.rows: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}

    def record(self, layer: int, query) -> None:
        """query: [1, H, chunk, d] post-RoPE; keep the rows at the wanted absolute positions."""
        if layer not in self.layers:
            return
        lo, hi = self.chunk_start, self.chunk_start + query.shape[2]
        wanted = self.positions[(self.positions >= lo) & (self.positions < hi)] - lo
        if len(wanted):
            self.rows[layer].append(query[0, :, wanted].float().cpu().numpy())


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.record(module.layer_idx, query)
    return sdpa_attention()(module, query, key, value, attention_mask, **kwargs)


def capture_qk(
    model, input_ids, layers: Sequence[int], query_positions: Sequence[int] | None = None, chunk_size: int = 2048
) -> CapturedQK:
    """Run ``input_ids`` [1, T] through ``model`` and capture keys of ``layers`` and queries at
    ``query_positions`` (default: the last 64). Returns :class:`CapturedQK` (float32 arrays)."""
    import torch
    from transformers import DynamicCache

    n_tokens = int(input_ids.shape[-1]) if input_ids.ndim == 2 else 0
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or n_tokens == 0:
        raise ValueError(f"input_ids: expected shape [1, T] with T > 0, got {tuple(input_ids.shape)}")
    n_layers = model.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers={list(layers)}: need at least one layer, each in [0, {n_layers})")
    positions = np.asarray(query_positions if query_positions is not None else range(max(0, n_tokens - 64), n_tokens))
    if len(positions) == 0 or positions.min() < 0 or positions.max() >= n_tokens:
        raise ValueError(f"query_positions: must be non-empty and within [0, {n_tokens})")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be positive")
    recorder = _Recorder(layers, np.sort(positions))
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_attention(CAPTURE_ATTENTION, _capture_attention))
    token = _ACTIVE.set(recorder)
    try:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            for start in range(0, n_tokens, chunk_size):
                recorder.chunk_start = start
                model(input_ids=input_ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)
    keys = {layer: cache.layers[layer].keys[0].float().cpu().numpy() for layer in layers}
    queries = {layer: np.concatenate(recorder.rows[layer], axis=1) for layer in layers}
    first = next(iter(keys.values()))
    return CapturedQK(
        keys=keys,
        queries=queries,
        query_positions=np.sort(positions),
        n_q_heads=next(iter(queries.values())).shape[0],
        n_kv_heads=first.shape[0],
        head_dim=first.shape[-1],
        seq_len=n_tokens,
    )
