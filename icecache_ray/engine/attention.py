"""Attention kernels of the row engine, and its hook into transformers' attention registry.

:func:`prefill_attention` is dense causal attention of a prompt chunk over its sequence's earlier
tokens; :func:`row_attention` is the function registered as ``icecache_rows``: while a
:class:`~icecache_ray.engine.row_cache.RowCache` is active (the runner's forward pass) every layer's
attention is answered by that cache's layer, else it is stock SDPA (so a model switched to it keeps
working as before everywhere else).
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F

from icecache_ray.hf_attention import register_attention, sdpa_attention

ROW_ATTENTION = "icecache_rows"
# The RowCache of the forward pass running in this thread (None outside the runner).
ACTIVE_CACHE: contextvars.ContextVar = contextvars.ContextVar("icecache_rows_cache", default=None)


def row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``icecache_rows`` (see module docstring).

    query: [1, Hq, N, d] for the step's N packed tokens. Returns ([1, N, Hq, d], None)."""
    cache = ACTIVE_CACHE.get()
    if cache is None:
        return sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, scaling)[None], None


def use_row_attention(model) -> str:
    """Register ``icecache_rows`` (once) and switch ``model`` to it; returns the previous name."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_attention(ROW_ATTENTION, row_attention))
    return previous


def _merge(out_a, lse_a, out_b, lse_b):
    """Combine two attention outputs [1, Hq, n, d] over disjoint key sets by their log-sum-exps [1, Hq, n]."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    return (out_a * wa + out_b * wb) / (wa + wb)


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past: int, scaling: float) -> torch.Tensor:
    """Causal attention of a chunk at positions ``past .. past + n - 1``.

    query: [1, Hq, n, d]; key / value: [1, H, past + n, d] (the sequence's tokens so far, GQA:
    Hq a multiple of H). Returns [1, Hq, n, d].

    The first chunk is one fused causal call. A later chunk is, on the CPU, two fused calls merged
    by their log-sum-exps (over the earlier tokens without a mask, over its own tokens causally),
    which avoids the explicit-mask path; elsewhere one call with a bottom-right causal mask."""
    n = query.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    if query.device.type == "cpu" and query.dtype == torch.float32:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_old, lse_old = flash(query, key[:, :, :past], value[:, :, :past], scale=scaling)[:2]  # handles GQA itself
        out_new, lse_new = flash(query, key[:, :, past:], value[:, :, past:], is_causal=True, scale=scaling)[:2]
        return _merge(out_old, lse_old, out_new, lse_new)
    mask = torch.arange(past + n, device=query.device)[None, :] <= (past + torch.arange(n, device=query.device))[:, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
