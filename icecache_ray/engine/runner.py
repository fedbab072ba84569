"""The model runner: one forward pass over every row of a step, for a range of the model's layers.

A :class:`ModelRunner` owns the device rows of its layers (a :class:`RowCache`, allocated once for
``n_rows`` rows) and runs layers ``[start, stop)`` of a stock transformers Llama-family model
exactly as the model's own forward does (embeddings, rotary embeddings, decoder layers, final
norm and LM head), except that the step's tokens of all sequences are packed on one token axis
and attention goes through :func:`~icecache_ray.engine.attention.row_attention`. The local engine
runs one runner over every layer; a Ray stage worker runs one over its layer range.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.attention import ACTIVE_CACHE, use_row_attention
from icecache_ray.engine.dense_rows import DenseRows
from icecache_ray.engine.plan import StepPlan
from icecache_ray.engine.row_cache import RowCache, StepLayout
from icecache_ray.engine.sparse_rows import SparseRows
from icecache_ray.engine.stats import StepStats
from icecache_ray.engine.stores import LayerStores

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_model(model_config, config: IceCacheConfig) -> tuple[int, int]:
    """Reject unsupported or mismatched models before any work. Returns (n_layers, head_dim)."""
    mc = model_config
    if getattr(mc, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={getattr(mc, 'model_type', None)!r}: supported are {list(SUPPORTED_MODEL_TYPES)}")
    if getattr(mc, "sliding_window", None) and mc.model_type == "mistral" and mc.sliding_window < mc.max_position_embeddings:
        raise ValueError(f"sliding_window={mc.sliding_window}: sliding-window attention models are not supported")
    n_layers = mc.num_hidden_layers
    if config.n_full_layers > n_layers:
        raise ValueError(f"IceCacheConfig.n_full_layers={config.n_full_layers} exceeds the model's {n_layers} layers")
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    return n_layers, head_dim


def is_sparse(layer: int, config: IceCacheConfig) -> bool:
    return config.policy != "full" and layer >= config.n_full_layers


def keep_only_layers(model, layers: range) -> None:
    """Free the weights of every decoder layer outside ``layers`` (a stage's own copy only)."""
    inner = model.model
    for i in range(model.config.num_hidden_layers):
        if i not in layers:
            inner.layers[i] = torch.nn.Module()


class ModelRunner:
    """Layers ``layers`` of ``model`` over ``n_rows`` rows (see module docstring).

    ``clients``: the index services holding this stage's sparse layers' stores (layers dealt
    round-robin); not needed for the ``full`` policy."""

    def __init__(self, model, config: IceCacheConfig, layers: range, n_rows: int, max_seq_len: int, clients: list | None = None) -> None:
        n_layers, head_dim = check_model(model.config, config)
        if layers.start < 0 or layers.stop > n_layers or len(layers) == 0:
            raise ValueError(f"layers={layers}: must be a non-empty part of the model's {n_layers} layers")
        self.model, self.config, self.layers = model, config, layers
        self.first, self.last = layers.start == 0, layers.stop == n_layers
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.clients = list(clients or [])
        sparse = [i for i in layers if is_sparse(i, config)]
        if sparse and not self.clients:
            raise ValueError(f"policy {config.policy!r} needs at least one index service for its sparse layers")
        self.owner = {layer: self.clients[k % len(self.clients)] for k, layer in enumerate(sparse)}
        self.cache = RowCache(self._build_layers(n_layers, head_dim, n_rows, max_seq_len))
        self.sparse = [layer for layer in self.cache.layers if isinstance(layer, SparseRows)]
        self._previous_attention = use_row_attention(model)

    def _build_layers(self, n_layers: int, head_dim: int, n_rows: int, max_seq_len: int) -> list:
        cfg, heads = self.config, self.model.config.num_key_value_heads
        out: list = [None] * n_layers
        for i in self.layers:
            if not is_sparse(i, cfg):
                out[i] = DenseRows(n_rows, heads, max_seq_len, head_dim, self.dtype, self.device)
                continue
            anchor_idx = cfg.n_full_layers + (i - cfg.n_full_layers) // cfg.layer_reuse * cfg.layer_reuse
            if anchor_idx not in self.layers:
                raise ValueError(f"layers={self.layers}: starts inside a layer_reuse={cfg.layer_reuse} run (anchor layer {anchor_idx})")
            anchor = out[anchor_idx] if anchor_idx != i else None
            out[i] = SparseRows(i, cfg, n_rows, heads, head_dim, self.dtype, self.device, LayerStores(self.owner[i], i), anchor)
        return out

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self, plan: StepPlan, x) -> tuple[torch.Tensor, dict]:
        """x: the step's token ids [N] (first stage) or hidden states [N, D]. Returns hidden states
        [N, D], or on the last stage the logits [M, V] of the M emitting segments; and the step's
        counters (:meth:`StepLayout.counters`)."""
        self.release(plan.released)
        layout = StepLayout(plan, self.device)
        if not plan.n_segments:
            return torch.zeros(0), layout.counters()
        inner = self.model.model
        if isinstance(x, np.ndarray) and not x.flags.writeable:  # token ids out of Ray's object store are read-only
            x = x.copy()
        x = torch.as_tensor(x).to(self.device)
        hidden = inner.embed_tokens(x[None]) if self.first else x[None].to(self.dtype)
        positions = torch.from_numpy(plan.positions).to(self.device)[None]
        rotary = inner.rotary_emb(hidden, position_ids=positions)
        self.cache.begin(layout)
        token = ACTIVE_CACHE.set(self.cache)
        try:
            for i in self.layers:
                hidden = inner.layers[i](hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                                         cache=self.cache, use_cache=True)
        finally:
            ACTIVE_CACHE.reset(token)
        if not self.last:
            return hidden[0], layout.counters()
        emit = torch.from_numpy(plan.emit_tokens).to(self.device)
        return self.model.lm_head(inner.norm(hidden[0, emit])), layout.counters()

    @torch.inference_mode()
    def load_prefill(self, row: int, seq_id: str, keys: list, values: list) -> None:
        """Take a finished dense prefill of one sequence (per model layer K/V [H, T, d], post-RoPE)
        as if this runner had run it on ``row``: dense layers keep it, sparse layers keep sink +
        window and index the middle (every policy's prefill is the same dense attention)."""
        for i in self.layers:
            self.cache.layers[i].load_prefill(row, seq_id, keys[i].to(self.device, self.dtype), values[i].to(self.device, self.dtype))

    def release(self, released) -> None:
        """Free the rows and host stores of finished sequences ((seq id, row) pairs)."""
        if not released:
            return
        for layer in self.sparse:
            layer.stores.wait()  # nothing of theirs may still be in flight
        for _, row in released:
            self.cache.release(row)
        seqs = [seq for seq, _ in released]
        for client in self.clients:
            client.release(seqs)

    def device_bytes(self) -> int:
        return self.cache.device_bytes()

    def close(self) -> None:
        """Finish background work; the model's attention implementation is restored."""
        for layer in self.sparse:
            try:
                layer.stores.wait()
            except Exception as exc:  # noqa: BLE001 - closing goes on whatever one layer says
                log.warning("layer %d: %s", layer.layer_idx, exc)
        self.model.set_attn_implementation(self._previous_attention)


def merge_counters(a: dict | None, b: dict) -> dict:
    """Counters of two stages of one step added up (times along the pipeline add)."""
    if a is None:
        return b
    stats = StepStats()
    stats.add(a["stats"])
    stats.add(b["stats"])
    return {"stats": stats, **{k: a[k] + b[k] for k in ("pages_selected", "pages_loaded", "bytes_loaded")}}


def run_stage(runner: ModelRunner, plan: StepPlan, incoming, want_logits: bool = False):
    """One stage's share of a step, as every transport runs it. ``incoming``: token ids [N] (first
    stage) or the previous stage's answer. Returns (hidden states, counters), or on the last stage
    (next-token ids [M] or logits [M, V], counters)."""
    x, counters = incoming if isinstance(incoming, tuple) else (incoming, None)
    out, own = runner.step(plan, x)
    if runner.last and not want_logits:
        out = out.argmax(-1) if out.numel() else torch.zeros(0, dtype=torch.long)
    return out, merge_counters(counters, own)

