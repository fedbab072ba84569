"""Capture post-RoPE queries and keys from a real forward pass, through the attention registry.

transformers 5 dispatches attention by name (``config._attn_implementation``) through
``AttentionInterface``; the causal mask is built by the function registered under the same name
in ``AttentionMaskInterface``. :mod:`icecache_ray.hf_attention` registers our function
``icecache_capture`` in both (with SDPA's mask builder) on first use. The function records the
query rows asked for and then delegates to stock SDPA, so outputs are unchanged.

The recorder travels with the call as an extra forward keyword (``icecache_recorder``), which
transformers passes through the decoder layers to the attention function; no global state.
Keys are read back from the ``DynamicCache`` at the end (transformers caches keys after RoPE).
The prompt runs in chunks so an 8k prompt never needs a T x T score matrix. Nothing is patched:
the model's previous attention implementation is restored after the call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from icecache_ray.hf_attention import register_attention, sdpa_attention

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

CAPTURE_ATTENTION = "icecache_capture"
RECORDER_KWARG = "icecache_recorder"
DEFAULT_N_QUERIES = 64


@dataclass
class CapturedQK:
    """Post-RoPE keys and queries of one prompt (float32, batch dimension dropped).

    keys[layer]: ``[n_kv_heads, seq_len, head_dim]``; queries[layer]: ``[n_q_heads, n, head_dim]``
    with row ``i`` belonging to absolute position ``query_positions[i]`` (``[n]`` int64, sorted,
    unique). Query head ``h`` shares KV head ``h // (n_q_heads // n_kv_heads)``.
    """

    keys: dict[int, np.ndarray]
    queries: dict[int, np.ndarray]
    query_positions: np.ndarray
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    seq_len: int


class _Recorder:
    """Collects query rows at given absolute positions for given layers, chunk by chunk."""

    def __init__(self, layers: Sequence[int], positions: np.ndarray) -> None:
        self.layers = list(dict.fromkeys(int(layer) for layer in layers))  # ordered, unique
        self.positions = positions
        self.chunk_start = 0
        self.rows: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        self.seen: set[int] = set()

    def record(self, layer: int, query: torch.Tensor) -> None:
        """query: ``[1, n_q_heads, chunk_len, head_dim]`` post-RoPE, rows at ``chunk_start + i``."""
        if layer not in self.rows:
            return
        self.seen.add(layer)
        lo, hi = self.chunk_start, self.chunk_start + query.shape[2]
        wanted = self.positions[(self.positions >= lo) & (self.positions < hi)] - lo
        if len(wanted):
            index = torch.as_tensor(wanted, dtype=torch.long, device=query.device)
            self.rows[layer].append(query[0].index_select(1, index).float().cpu().numpy())


def _capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as ``icecache_capture``.

    query ``[b, n_q_heads, q_len, d]``, key/value ``[b, n_kv_heads, kv_len, d]`` (post-RoPE, the
    cache already appended). Records the query, then returns stock SDPA's
    ``(output [b, q_len, n_q_heads, d], None)``. Without a recorder it is plain SDPA.
    """
    recorder: _Recorder | None = kwargs.pop(RECORDER_KWARG, None)
    if recorder is not None:
        recorder.record(module.layer_idx, query)
    return sdpa_attention()(module, query, key, value, attention_mask, **kwargs)


def _check_inputs(model: PreTrainedModel, input_ids: torch.Tensor, layers: Sequence[int], chunk_size: int) -> int:
    """Validate the arguments of :func:`capture_qk`; returns the prompt length T."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a tensor of shape [1, T] with T > 0, got {shape}")
    n_layers = model.config.num_hidden_layers
    layers = list(layers)
    if not layers or any(not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers={layers}: need at least one layer, each an int in [0, {n_layers})")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be positive")
    return int(input_ids.shape[1])


def _check_positions(query_positions: Sequence[int] | None, n_tokens: int) -> np.ndarray:
    """Sorted unique int64 positions ``[n]``; default: the last 64 positions of the prompt."""
    if query_positions is None:
        return np.arange(max(0, n_tokens - DEFAULT_N_QUERIES), n_tokens, dtype=np.int64)
    positions = np.asarray(list(query_positions))
    if positions.size == 0 or positions.ndim != 1 or not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"query_positions={query_positions!r}: must be a non-empty sequence of ints")
    if positions.min() < 0 or positions.max() >= n_tokens:
        raise ValueError(f"query_positions (min {positions.min()}, max {positions.max()}): must be within [0, {n_tokens})")
    return np.unique(positions.astype(np.int64))


def capture_qk(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    query_positions: Sequence[int] | None = None,
    chunk_size: int = 2048,
) -> CapturedQK:
    """Run ``input_ids`` ``[1, T]`` through ``model`` in chunks of ``chunk_size`` tokens (chunked
    prefill with a ``DynamicCache``) and capture post-RoPE keys of ``layers`` (all T positions)
    and queries at ``query_positions`` (default: the last 64). Outputs equal a plain SDPA run's.

    The model's attention implementation is switched to ``icecache_capture`` for this call and
    restored afterwards, so do not run the same model object from another thread meanwhile.
    """
    from transformers import DynamicCache

    layers = list(layers)
    n_tokens = _check_inputs(model, input_ids, layers, chunk_size)
    positions = _check_positions(query_positions, n_tokens)
    recorder = _Recorder(layers, positions)
    previous = model.config._attn_implementation
    t0 = time.perf_counter()
    model.set_attn_implementation(register_attention(CAPTURE_ATTENTION, _capture_attention))
    try:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            for start in range(0, n_tokens, chunk_size):
                recorder.chunk_start = start
                model(
                    input_ids=input_ids[:, start : start + chunk_size],
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **{RECORDER_KWARG: recorder},
                )
    finally:
        model.set_attn_implementation(previous)
    missing = sorted(set(recorder.layers) - recorder.seen)
    if missing:
        raise RuntimeError(f"layers {missing} never called the registered attention function; "
                           f"{type(model).__name__} does not dispatch through AttentionInterface")
    keys = {layer: cache.layers[layer].keys[0].float().cpu().numpy() for layer in recorder.layers}
    queries = {layer: np.concatenate(recorder.rows[layer], axis=1) for layer in recorder.layers}
    n_kv_heads, _, head_dim = next(iter(keys.values())).shape
    log.info("captured %d layers, %d query rows of a %d-token prompt in %.2f s",
             len(keys), len(positions), n_tokens, time.perf_counter() - t0)
    return CapturedQK(
        keys=keys,
        queries=queries,
        query_positions=positions,
        n_q_heads=next(iter(queries.values())).shape[0],
        n_kv_heads=int(n_kv_heads),
        head_dim=int(head_dim),
        seq_len=n_tokens,
    )
