"""Q/K capture through the attention registry: exact outputs, post-RoPE keys, no global changes."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from icecache_ray.capture import CAPTURE_ATTENTION, capture_qk


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def test_import_registers_nothing():
    import importlib

    import icecache_ray.capture as capture

    before = set(ALL_ATTENTION_FUNCTIONS._global_mapping)
    importlib.reload(capture)
    assert set(ALL_ATTENTION_FUNCTIONS._global_mapping) == before


def test_keys_equal_the_cache_of_a_plain_run_and_model_is_restored(tiny):
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    captured = capture_qk(tiny, ids, layers=[0, 2], chunk_size=128)
    assert tiny.config._attn_implementation == "sdpa"
    cache = DynamicCache(config=tiny.config)
    with torch.inference_mode():
        tiny(ids, past_key_values=cache, use_cache=True)
    for layer in (0, 2):
        np.testing.assert_allclose(captured.keys[layer], cache.layers[layer].keys[0].numpy(), atol=1e-5)
    assert captured.queries[2].shape == (4, 64, 16)
    assert (captured.n_q_heads, captured.n_kv_heads, captured.head_dim, captured.seq_len) == (4, 2, 16, 300)


def test_chunking_does_not_change_queries_and_logits_are_exact(tiny):
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    whole = capture_qk(tiny, ids, layers=[1], query_positions=[5, 150, 199], chunk_size=1000)
    chunked = capture_qk(tiny, ids, layers=[1], query_positions=[5, 150, 199], chunk_size=64)
    np.testing.assert_allclose(whole.queries[1], chunked.queries[1], atol=1e-5)
    # the registered function delegates to SDPA: logits equal a plain run's
    tiny.set_attn_implementation(CAPTURE_ATTENTION)
    try:
        with torch.inference_mode():
            ours = tiny(ids).logits
    finally:
        tiny.set_attn_implementation("sdpa")
    with torch.inference_mode():
        plain = tiny(ids).logits
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def test_query_rows_attend_like_the_model(tiny):
    """softmax(q K^T / sqrt(d)) over the captured keys is a proper causal distribution."""
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    c = capture_qk(tiny, ids, layers=[2], query_positions=[99])
    q, k = c.queries[2][:, 0], c.keys[2]
    assert np.isfinite(q).all() and np.isfinite(k).all() and np.abs(q).sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=torch.zeros((1, 0), dtype=torch.long), layers=[0]), "T > 0"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[7]), r"layers=\[7\]"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[0], query_positions=[10]), "query_positions"),
    ],
)
def test_bad_inputs(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        capture_qk(tiny, **kwargs)


@pytest.mark.slow
def test_real_model_loads_and_generates():
    from icecache_ray.model import load_model

    model, tokenizer = load_model()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


@pytest.mark.realmodel
def test_real_model_semantic_pages_keep_more_attention_than_streaming():
    """SmolLM2 on a 1k-token essay prompt: icecache at budget 128 keeps more attention mass than
    sink + window alone, and not more than the exact token oracle."""
    from icecache_ray.bench.harness import replay_head
    from icecache_ray.config import IceCacheConfig
    from icecache_ray.haystack import essay_prompt_ids
    from icecache_ray.model import load_model
    from icecache_ray.policies import make_policy
    from icecache_ray.pool import PagePool, PoolLayout

    model, tokenizer = load_model()
    ids = essay_prompt_ids(tokenizer, 1024, seed=3)
    c = capture_qk(model, ids, layers=[4, 20], query_positions=range(1008, 1024))
    cfg = IceCacheConfig(budget=128)
    g = c.n_q_heads // c.n_kv_heads
    recall = {}
    with PagePool.create(PoolLayout(capacity_pages=512, page_size=16, head_dim=c.head_dim)) as pool:
        for name in ("icecache", "streaming", "oracle"):
            policy = make_policy(name, c.head_dim, 16, pool=pool)
            recall[name] = np.mean([
                np.mean(replay_head(policy, c.keys[l][h], c.queries[l][h * g : (h + 1) * g], c.query_positions, cfg).recall)
                for l in (4, 20) for h in range(c.n_kv_heads)
            ])
    assert recall["streaming"] < recall["icecache"] <= recall["oracle"] + 1e-9
