"""Benchmark model shapes: llama-8b on the meta device (no allocation), smollm2 in the model dtype."""

import pytest
import torch

from icecache_ray.bench.shapes import parameter_count, random_model, shape_config


def test_llama_8b_builds_on_meta_with_its_parameter_count():
    model = random_model("llama-8b", "meta", torch.bfloat16, context=32768)
    assert parameter_count(model) == 8_030_261_248  # Llama-3-8B: untied 128256 x 4096 embeddings
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 32, 8, 128)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (4096, 14336, 128256)
    assert torch.get_default_dtype() == torch.float32  # restored


def test_smollm2_shape_is_made_in_the_model_dtype_and_seeded():
    a = random_model("smollm2", "cpu", torch.bfloat16, seed=3)
    b = random_model("smollm2", "cpu", torch.bfloat16, seed=3)
    assert parameter_count(a) == 134_515_008 and next(a.parameters()).dtype == torch.bfloat16
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)


def test_bad_shape_or_context_is_refused():
    with pytest.raises(ValueError, match="shape='llama-70b'"):
        shape_config("llama-70b")
    with pytest.raises(ValueError, match="context=0"):
        shape_config("smollm2", 0)
    assert shape_config("smollm2", 32768).max_position_embeddings == 32768
