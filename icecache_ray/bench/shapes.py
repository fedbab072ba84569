"""Model shapes the benchmarks run with random weights: no download, the same compute per token.

``smollm2``: SmolLM2-135M (30 layers, 9 query / 3 KV heads, head_dim 64), the bundled model's
shape. ``llama-8b``: Llama-3-8B (32 layers, 32 query / 8 KV heads, head_dim 128, hidden 4096, MLP
14336, vocab 128256; 8.03e9 parameters). :func:`random_model` builds one directly on the target
device in the model dtype (a GPU never sees a float32 copy of an 8B model); on the ``meta`` device
it allocates nothing (shapes and parameter counts only).
"""

from __future__ import annotations

import logging

import torch

from icecache_ray.model import SMOLLM2_SHAPE

log = logging.getLogger(__name__)

LLAMA_8B_SHAPE = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
)
SHAPES: dict[str, dict] = {"smollm2": SMOLLM2_SHAPE, "llama-8b": LLAMA_8B_SHAPE}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shape_config(name: str, context: int | None = None):
    """The ``LlamaConfig`` of shape ``name``; ``context``: at least that many positions."""
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"shape={name!r}: must be one of {sorted(SHAPES)}")
    shape = dict(SHAPES[name])
    if context is not None:
        if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
            raise ValueError(f"context={context!r}: must be a positive integer")
        shape["max_position_embeddings"] = max(shape["max_position_embeddings"], context)
    return LlamaConfig(**shape)


def random_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 context: int | None = None, seed: int = 0):
    """Shape ``name`` with seeded random weights, made on ``device`` in ``dtype`` (eval mode, SDPA)."""
    from transformers import LlamaForCausalLM

    config = shape_config(name, context)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the model dtype, never in float32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.set_attn_implementation("sdpa")
    log.info("random %s model on %s: %.3g parameters in %s", name, device, parameter_count(model), dtype)
    return model


def parameter_count(model) -> int:
    """Parameters of ``model`` (shared tensors, e.g. tied embeddings, counted once)."""
    return sum(p.numel() for p in model.parameters())
