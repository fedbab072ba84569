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
from icecache_ray.engine.leaving import LeavingTokens
from icecache_ray.engine.plan import StepPlan
from icecache_ray.engine.row_cache import RowCache, StepLayout
from icecache_ray.engine.sparse_rows import SparseRows
from icecache_ray.engine.stats import StepStats
from icecache_ray.engine.stores import LayerStores
from icecache_ray.engine.transfers import host_transfers, to_host
from icecache_ray.engine.window import RowWindows

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
        # one window state for every sparse layer: they hold the same positions of the same rows
        self.windows = RowWindows(n_rows, config.sink_tokens, config.window_pages, config.page_size)
        self.leaving = LeavingTokens(self.device)  # leaving window tokens: to the stores after the step's sync
        # dense rows: positions below this were written or zeroed at least once (a padded decode
        # call reads up to the step's longest row; never-written memory there may hold NaN)
        self.clean_end, self.max_seq_len = np.zeros(n_rows, np.int64), max_seq_len
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
            out[i] = SparseRows(i, cfg, self.windows, heads, head_dim, self.dtype, self.device, LayerStores(self.owner[i], i),
                                anchor, max_seq_len, self.leaving)
        return out

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self, plan: StepPlan, x) -> tuple[torch.Tensor, dict]:
        """x: the step's token ids [N] (first stage) or hidden states [N, D]. Returns hidden states
        [N, D], or on the last stage the logits [M, V] of the M emitting segments; and the step's
        counters (:meth:`StepLayout.counters`)."""
        self.release(plan.released)
        ids = self.first and isinstance(x, np.ndarray)  # token ids travel in the step's one upload
        arrays, leaving = self._advance_windows(plan)
        layout = StepLayout(plan, self.device, arrays | ({"tokens": x} if ids else {}))
        layout.leaving = leaving
        layout.dense_zero = self._zero_ahead(layout)
        if not plan.n_segments:
            return torch.zeros(0), layout.counters()
        inner = self.model.model
        x = layout.t["tokens"] if ids else torch.as_tensor(x).to(self.device)
        hidden = inner.embed_tokens(x[None]) if self.first else x[None].to(self.dtype)
        positions = layout.t["positions"][None]
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
        return self.model.lm_head(inner.norm(hidden[0, layout.t["emit"]])), layout.counters()

    def _zero_ahead(self, layout: StepLayout) -> list[tuple[int, int, int]]:
        """Rows of the dense decode span whose buffers must be zeroed up to the span's length
        first: (row, from, to), 256 positions ahead so that this happens once in a while."""
        plan, span = layout.plan, layout.dense
        np.maximum.at(self.clean_end, plan.rows, plan.starts + plan.lengths)  # written this step
        if span is None or len(self.sparse) == len(self.layers):
            return []
        rows = np.arange(span.lo, span.lo + span.n_rows)
        need = rows[self.clean_end[rows] < span.length]
        out = []
        for row in need.tolist():
            hi = min(self.max_seq_len, span.length + 256)
            out.append((row, int(self.clean_end[row]), hi))
            self.clean_end[row] = hi
        return out

    def _advance_windows(self, plan: StepPlan) -> tuple[dict, list]:
        """Once per step, for every sparse layer: the previous step's leaving tokens retire (each
        layer has their insertion finished before it attends), each decode row's new token takes
        its ring row, and what leaves the window now is marked. Returns the arrays the step uploads
        (``ring_flat`` [n, H], ``sink_valid`` [n, sink], ``ring_valid`` [n, ring]) and the leaving
        tokens [(decode index, ring rows [m])]."""
        if not self.sparse or not plan.n_decode:
            return {}, []
        rows, w, kv = plan.rows[: plan.n_decode].astype(np.int64), self.windows, self.sparse[0].kv
        w.retire(rows)
        ring = w.place_next(rows)
        heads = np.arange(kv.heads)
        flat = kv.flat_rows(rows[:, None], heads[None, :], kv.ring_start + ring[:, None])[0]
        arrays = {"ring_flat": flat, "sink_valid": w.sink_valid(rows), "ring_valid": w.ring_valid(rows)}
        leaving = [(i, w.ring_index(np.arange(lo, hi))) for i, (lo, hi) in enumerate(w.leaving(rows)) if hi > lo]
        return arrays, leaving

    @torch.inference_mode()
    def load_prefill(self, row: int, seq_id: str, keys: list, values: list) -> None:
        """Take a finished dense prefill of one sequence (per model layer K/V [H, T, d], post-RoPE)
        as if this runner had run it on ``row``: dense layers keep it, sparse layers keep sink +
        window and index the middle (every policy's prefill is the same dense attention)."""
        self.clean_end[row] = max(self.clean_end[row], keys[self.layers.start].shape[1])
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
    before = host_transfers()
    out, own = runner.step(plan, x)
    device_counts = own.pop("device_counts", None)  # [2, n] pages selected / loaded, still on the device
    if runner.last and not want_logits:
        ids = out.argmax(-1) if out.numel() else torch.zeros(0, dtype=torch.long, device=out.device)
        if device_counts is not None:  # the ids and the counters in ONE device->host copy
            host = to_host(torch.cat([ids, device_counts.reshape(-1)]))
            out, device_counts = torch.from_numpy(host[: ids.shape[0]]), host[ids.shape[0] :].reshape(2, -1)
        else:
            out = torch.from_numpy(to_host(ids))
    elif device_counts is not None:
        device_counts = to_host(device_counts)
    if device_counts is not None:
        _add_device_counts(own, device_counts)
    runner.leaving.flush()
    own["stats"].host_syncs += host_transfers() - before
    return out, merge_counters(counters, own)


def _add_device_counts(counters: dict, counts: np.ndarray) -> None:
    """Fold the device-side page counters [2, n] (selected, loaded per decode row) into a step's."""
    selected, loaded = counts[0].astype(np.int64), counts[1].astype(np.int64)
    stats = counters["stats"]
    stats.pages_selected += int(selected.sum())
    stats.pages_loaded += int(loaded.sum())
    stats.pages_hit += int((selected - loaded).sum())
    page_bytes = counters.pop("page_bytes", 0)
    stats.bytes_loaded += int(loaded.sum()) * page_bytes
    counters["pages_selected"] = counters["pages_selected"] + selected
    counters["pages_loaded"] = counters["pages_loaded"] + loaded
    counters["bytes_loaded"] = counters["bytes_loaded"] + loaded * page_bytes

