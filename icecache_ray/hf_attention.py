"""Registration of our attention functions in transformers' attention registry.

transformers 5 dispatches attention through ``AttentionInterface`` (and the causal-mask builder
through ``AttentionMaskInterface``) by the name in ``config._attn_implementation``. We add new,
``icecache_``-prefixed names on first use (never at import, never replacing a stock entry), so
stock models are unaffected until a caller opts a model in with ``set_attn_implementation``.
"""

from __future__ import annotations

from typing import Callable

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def sdpa_attention() -> Callable:
    """The stock SDPA attention function (what our functions delegate dense work to)."""
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def register_attention(name: str, fn: Callable) -> str:
    """Register ``fn`` under ``name`` (must start with ``icecache_``) with SDPA's causal mask.

    Idempotent for the same function; a different function under a taken name is an error.
    Returns the name, ready for ``model.set_attn_implementation(name)``.
    """
    if not name.startswith("icecache_"):
        raise ValueError(f"attention name {name!r}: ours must start with 'icecache_'")
    existing = ALL_ATTENTION_FUNCTIONS._global_mapping.get(name)
    if existing is not None and existing is not fn:
        raise ValueError(f"attention name {name!r} is already registered to another function")
    if existing is None:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name
