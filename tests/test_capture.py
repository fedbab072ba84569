"""Q/K capture through the attention registry: exact outputs, post-RoPE keys and queries, no global
changes; plus the model-loading and prompt helpers it is used with."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from icecache_ray.capture import CAPTURE_ATTENTION, RECORDER_KWARG, _capture_attention, _Recorder, capture_qk
from icecache_ray.hf_attention import register_attention

VOCAB = 128


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _manual_queries(model: LlamaForCausalLM, ids: torch.Tensor, layer: int, positions: list[int]) -> np.ndarray:
    """Post-RoPE queries [n_q_heads, len(positions), head_dim] recomputed from the hidden states."""
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer]  # input of `layer`
        block = model.model.layers[layer]
        x = block.input_layernorm(hidden)
        attn = block.self_attn
        q = attn.q_proj(x).view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return q[0][:, positions].numpy()


def test_import_changes_no_registry_or_model():
    """In a fresh interpreter: importing our modules adds no attention/mask function and leaves a
    model's attention implementation alone (registration happens on first capture only)."""
    code = textwrap.dedent("""
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM(cfg)
        before = (set(ALL_ATTENTION_FUNCTIONS), set(ALL_MASK_ATTENTION_FUNCTIONS), model.config._attn_implementation)
        import icecache_ray.capture, icecache_ray.model, icecache_ray.haystack
        after = (set(ALL_ATTENTION_FUNCTIONS), set(ALL_MASK_ATTENTION_FUNCTIONS), model.config._attn_implementation)
        assert before == after, (before, after)
        assert "icecache_capture" not in ALL_ATTENTION_FUNCTIONS
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_capture_adds_only_our_names(tiny):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ALL_ATTENTION_FUNCTIONS}
    masks_before = {name: ALL_MASK_ATTENTION_FUNCTIONS[name] for name in ALL_MASK_ATTENTION_FUNCTIONS}
    capture_qk(tiny, _ids(20, 0), layers=[0])
    after = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ALL_ATTENTION_FUNCTIONS}
    masks_after = {name: ALL_MASK_ATTENTION_FUNCTIONS[name] for name in ALL_MASK_ATTENTION_FUNCTIONS}
    assert set(after) - set(before) <= {CAPTURE_ATTENTION}
    assert all(after[name] is fn for name, fn in before.items())
    assert set(masks_after) - set(masks_before) <= {CAPTURE_ATTENTION}
    assert all(masks_after[name] is fn for name, fn in masks_before.items())


def test_chunked_logits_through_capture_equal_plain_sdpa(tiny):
    """The registered function (recording) gives a plain SDPA run's logits, also in chunks with a
    cache (where the mask is a real [q, kv] causal mask, not is_causal)."""
    ids = _ids(200, 2)
    with torch.inference_mode():
        plain = tiny(ids).logits
    recorder = _Recorder([0, 1, 2], np.array([5, 150, 199]))
    tiny.set_attn_implementation(register_attention(CAPTURE_ATTENTION, _capture_attention))
    try:
        cache, parts = DynamicCache(config=tiny.config), []
        with torch.inference_mode():
            for start in range(0, 200, 64):
                recorder.chunk_start = start
                parts.append(tiny(ids[:, start : start + 64], cache=cache, **{RECORDER_KWARG: recorder}).logits)
    finally:
        tiny.set_attn_implementation("sdpa")
    torch.testing.assert_close(torch.cat(parts, dim=1), plain, atol=1e-5, rtol=1e-5)
    assert recorder.seen == {0, 1, 2}


def test_attention_implementation_is_restored(tiny):
    capture_qk(tiny, _ids(50, 1), layers=[1], chunk_size=16)
    assert tiny.config._attn_implementation == "sdpa"
    tiny.set_attn_implementation("eager")
    try:
        capture_qk(tiny, _ids(50, 1), layers=[1])
        assert tiny.config._attn_implementation == "eager"
        with pytest.raises(IndexError):  # token id outside the vocabulary fails inside the forward
            capture_qk(tiny, torch.full((1, 8), VOCAB + 5), layers=[1])
        assert tiny.config._attn_implementation == "eager"
        assert all(layer.self_attn.config._attn_implementation == "eager" for layer in tiny.model.layers)
    finally:
        tiny.set_attn_implementation("sdpa")


def test_keys_equal_the_cache_of_a_plain_unchunked_run(tiny):
    ids = _ids(300, 1)
    captured = capture_qk(tiny, ids, layers=[2, 0], chunk_size=128)
    cache = DynamicCache(config=tiny.config)
    with torch.inference_mode():
        tiny(ids, cache=cache, use_cache=True)
    assert list(captured.keys) == [2, 0]
    for layer in (0, 2):
        assert captured.keys[layer].dtype == np.float32
        np.testing.assert_allclose(captured.keys[layer], cache.layers[layer].keys[0].numpy(), atol=1e-5)
    assert captured.keys[0].shape == (2, 300, 16)
    assert captured.queries[2].shape == (4, 64, 16)  # default: the last 64 positions
    np.testing.assert_array_equal(captured.query_positions, np.arange(236, 300))
    assert captured.query_positions.dtype == np.int64
    assert (captured.n_q_heads, captured.n_kv_heads, captured.head_dim, captured.seq_len) == (4, 2, 16, 300)


def test_queries_are_post_rope_and_independent_of_chunking(tiny):
    ids = _ids(300, 3)
    positions = [299, 0, 127, 128, 5, 5]  # chunk edges at 128 and 256; unsorted, duplicated
    chunked = capture_qk(tiny, ids, layers=[1, 2], query_positions=positions, chunk_size=128)
    whole = capture_qk(tiny, ids, layers=[1, 2], query_positions=positions, chunk_size=4096)
    np.testing.assert_array_equal(chunked.query_positions, [0, 5, 127, 128, 299])
    for layer in (1, 2):
        assert chunked.queries[layer].shape == (4, 5, 16)
        np.testing.assert_allclose(chunked.queries[layer], whole.queries[layer], atol=1e-5)
        np.testing.assert_allclose(chunked.queries[layer], _manual_queries(tiny, ids, layer, [0, 5, 127, 128, 299]), atol=1e-5)


def test_queries_and_keys_reproduce_the_attention_pattern(tiny):
    """softmax(q K[:p+1]^T / sqrt(d)) from captured rows matches eager attention weights."""
    ids = _ids(100, 4)
    c = capture_qk(tiny, ids, layers=[2], query_positions=[60, 99], chunk_size=32)
    tiny.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            weights = tiny(ids, output_attentions=True).attentions[2][0]  # [n_q_heads, T, T]
    finally:
        tiny.set_attn_implementation("sdpa")
    g = c.n_q_heads // c.n_kv_heads
    for i, p in enumerate(c.query_positions):
        for h in range(c.n_q_heads):
            scores = c.keys[2][h // g, : p + 1] @ c.queries[2][h, i] / np.sqrt(c.head_dim)
            probs = np.exp(scores - scores.max())
            np.testing.assert_allclose(probs / probs.sum(), weights[h, p, : p + 1].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=torch.zeros((1, 0), dtype=torch.long), layers=[0]), "T > 0"),
        (dict(input_ids=torch.zeros(10, dtype=torch.long), layers=[0]), r"got \(10,\)"),
        (dict(input_ids=[[1, 2, 3]], layers=[0]), "got list"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[7]), r"layers=\[7\]"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[-1]), r"layers=\[-1\]"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[]), r"layers=\[\]"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[0], query_positions=[10]), "max 10"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[0], query_positions=[-1]), "min -1"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[0], query_positions=[]), "non-empty"),
        (dict(input_ids=torch.zeros((1, 10), dtype=torch.long), layers=[0], chunk_size=0), "chunk_size=0"),
    ],
)
def test_bad_inputs(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        capture_qk(tiny, **kwargs)
    assert tiny.config._attn_implementation == "sdpa"


def test_model_paths_and_errors(tmp_path, monkeypatch):
    from icecache_ray.model import default_model_path, load_model

    monkeypatch.setenv("ICECACHE_CACHE_DIR", str(tmp_path / "cache"))
    assert default_model_path() == tmp_path / "cache"
    monkeypatch.delenv("ICECACHE_CACHE_DIR")
    assert default_model_path().parts[-2:] == ("icecache_ray", "smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_essay_prompt_ids_are_exact_and_deterministic(monkeypatch, tmp_path):
    from icecache_ray import haystack

    def char_tokenizer(text: str) -> dict:
        return {"input_ids": [ord(ch) % VOCAB for ch in text]}

    a = haystack.essay_prompt_ids(char_tokenizer, 500, seed=7)
    assert a.shape == (1, 500) and a.dtype == torch.long
    assert torch.equal(a, haystack.essay_prompt_ids(char_tokenizer, 500, seed=7))
    assert not torch.equal(a, haystack.essay_prompt_ids(char_tokenizer, 500, seed=8))
    with pytest.raises(ValueError, match="n_tokens=0"):
        haystack.essay_prompt_ids(char_tokenizer, 0)
    monkeypatch.setenv("ICECACHE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        haystack.load_essays()


@pytest.mark.slow
def test_real_model_loads_and_generates():
    from icecache_ray.model import load_model

    model, tokenizer = load_model()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == 64 and cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg._attn_implementation == "sdpa" and not model.training
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert tokenizer.decode(out[0, ids.shape[1] :]).strip()


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
