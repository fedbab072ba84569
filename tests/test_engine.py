"""Sparse decoding inside stock transformers: the key invariants on tiny random models."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.cache import IceCache
from icecache_ray.pool import list_leaked_segments

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)


def _model(kind="llama", **extra):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**{**COMMON, **extra})).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**{**COMMON, "sliding_window": None, **extra})).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **extra})).eval()
    return Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 24, **extra})).eval()


def _decode_logits(model, ids, cache, steps):
    """Greedy decode with ``cache``; returns the logits of every step [steps, vocab]."""
    out = []
    with torch.inference_mode():
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
        out.append(logits)
        for _ in range(steps - 1):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
            out.append(logits)
    return torch.cat(out)


def _assert_matches_dense(model, ids, cfg: IceCacheConfig, steps: int) -> IceCache:
    """Decode ``steps`` tokens with an IceCache and with a DynamicCache; logits must agree.
    Returns the (closed) cache so callers can inspect its stats."""
    dense = _decode_logits(model, ids, DynamicCache(config=model.config), steps)
    cache = IceCache(model, cfg)
    try:
        sparse = _decode_logits(model, ids, cache, steps)
    finally:
        cache.close()
    torch.testing.assert_close(sparse, dense, atol=2e-4, rtol=2e-4)
    return cache


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("policy", ["icecache", "quest"])
def test_budget_covering_every_page_equals_dense_attention(kind, policy):
    model = _model(kind)
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(1))
    cfg = IceCacheConfig(budget=1024, policy=policy)  # 60 retrieved pages > the ~20 middle pages
    cache = _assert_matches_dense(model, ids, cfg, 40)
    assert len(cache.stats.steps) == 39


def test_full_policy_is_plain_transformers():
    model = _model()
    ids = torch.randint(0, 96, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=12, do_sample=False)
        cache = IceCache(model, IceCacheConfig(policy="full"))
        with warnings.catch_warnings():  # the stock name the issue asks for; transformers >= 5.24 prefers cache=
            warnings.simplefilter("ignore", FutureWarning)
            ours = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
    cache.close()
    assert torch.equal(plain, ours)


def test_short_prompt_long_generation_loses_no_token():
    """Prompts shorter than sink + window never drop tokens as the window slides (the published
    code does): with a budget that covers everything, decoding stays equal to dense."""
    model = _model()
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    _assert_matches_dense(model, ids, IceCacheConfig(budget=512), 120)


def test_small_budget_decodes_and_moves_only_missing_pages():
    model = _model()
    ids = torch.randint(0, 96, (1, 600), generator=torch.Generator().manual_seed(4))
    cache = IceCache(model, IceCacheConfig(budget=64))
    try:
        _decode_logits(model, ids, cache, 30)
        total = cache.stats.total()
        assert total.pages_selected > 0 and total.pages_loaded <= total.pages_selected
        assert total.pages_hit > 0  # consecutive steps reuse resident pages
    finally:
        cache.close()


def test_model_generate_works_with_our_cache():
    model = _model()
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(5))
    cache = IceCache(model, IceCacheConfig(budget=1024))
    try:
        with torch.inference_mode():
            ours = model.generate(ids, cache=cache, max_new_tokens=10, do_sample=False)
    finally:
        cache.close()
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, plain)


def test_bad_model_or_config_is_rejected_before_work():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        IceCache(gpt2)
    with pytest.raises(ValueError, match="n_full_layers=9"):
        IceCache(_model(), IceCacheConfig(n_full_layers=9))
    sliding = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=64)).eval()
    with pytest.raises(ValueError, match="sliding_window=64"):
        IceCache(sliding)


def test_close_leaves_no_shared_memory():
    before = set(list_leaked_segments())
    model = _model()
    cache = IceCache(model, IceCacheConfig(budget=64))
    ids = torch.randint(0, 96, (1, 100))
    _decode_logits(model, ids, cache, 3)
    cache.close()
    cache.close()
    assert set(list_leaked_segments()) <= before


@pytest.mark.realmodel
def test_eval_harness_output_contract(tmp_path):
    """``python -m icecache_ray.eval passkey`` on SmolLM2: rows and summary as documented."""
    import json

    from icecache_ray.eval.__main__ import main

    out = tmp_path / "pk.json"
    assert main(["passkey", "--policy", "icecache,full", "--budget", "128", "--lengths", "600",
                 "--depths", "0.5", "--seed", "1", "--layer-reuse", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["policy"] for r in data["rows"]} == {"icecache", "full"} and data["layer_reuse"] == 2
    for row in data["rows"]:
        assert {"task", "policy", "budget", "length", "seed", "score", "depth"} <= set(row)
        assert row["layer_reuse"] == (1 if row["policy"] == "full" else 2)
        assert row["task"] == "passkey" and 0.0 <= row["score"] <= 1.0 and row["length"] <= 600
    full = [r for r in data["rows"] if r["policy"] == "full"][0]
    assert full["score"] == 1.0  # the model finds the key with the dense cache at 600 tokens
    assert {(s["task"], s["policy"]) for s in data["summary"]} == {("passkey", "icecache"), ("passkey", "full")}
    assert (tmp_path / "pk.md").read_text().startswith("| task |")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budget_covering_every_page_equals_dense_attention():
    """Same invariant with the model, sink/window and page slots on the GPU (pool on the host)."""
    model = _model().to("cuda")
    ids = torch.randint(0, 96, (1, 400), generator=torch.Generator().manual_seed(6)).to("cuda")
    cache = _assert_matches_dense(model, ids, IceCacheConfig(budget=1024), 30)
    total = cache.stats.total()
    assert total.pages_loaded > 0 and total.bytes_loaded > 0


def _batched_logits(model, prompts, cache, forced):
    """Left-padded batch of ``prompts`` (lists of ids), then teacher-forced decoding of
    ``forced`` [B, steps - 1]; returns logits [steps, B, vocab]."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.inference_mode():
        out.append(model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1])
        for t in range(forced.shape[1]):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            out.append(model(forced[:, t : t + 1], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("policy", ["icecache", "quest", "streaming"])
def test_batch_of_different_lengths_equals_one_by_one(policy):
    """Each sequence of a left-padded batch gets its own sink, window, stores and slots: the
    logits equal running every prompt alone (same tokens fed), with selection active (budget 64)."""
    model = _model()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (300, 170, 45)]
    cfg = IceCacheConfig(budget=64, policy=policy)
    steps, singles, tokens = 40, [], []
    for p in prompts:
        cache = IceCache(model, cfg)
        try:
            logits = _decode_logits(model, torch.tensor([p]), cache, steps)
        finally:
            cache.close()
        singles.append(logits)
        tokens.append(logits.argmax(-1)[:-1])
    cache = IceCache(model, cfg)
    try:
        batched = _batched_logits(model, prompts, cache, torch.stack(tokens))
        assert cache.stats.total().pages_selected > 0 or policy == "streaming"
    finally:
        cache.close()
    for b, single in enumerate(singles):
        torch.testing.assert_close(batched[:, b], single, atol=2e-4, rtol=2e-4)


def test_right_padding_is_rejected_with_a_clear_error():
    model = _model()
    ids = torch.randint(1, 96, (2, 80), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[1, -5:] = 0
    cache = IceCache(model, IceCacheConfig(budget=64))
    try:
        with pytest.raises(ValueError, match="left padding"), torch.inference_mode():
            model(ids, attention_mask=mask, cache=cache, use_cache=True)
    finally:
        cache.close()


@pytest.mark.parametrize("reuse", [2, 3])
def test_layer_reuse_with_full_budget_equals_dense(reuse):
    """IceCache(r): reuse layers attend over their own K/V of the anchor's tokens; with a budget
    covering everything that is still exact dense attention."""
    model = _model(num_hidden_layers=6)
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(9))
    _assert_matches_dense(model, ids, IceCacheConfig(budget=1024, layer_reuse=reuse), 30)


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_causal_attention_equals_one_masked_call(padded):
    """Query chunks (with earlier keys cached, with or without a padding mask) = one SDPA call."""
    from icecache_ray.engine.cache import chunked_causal_attention

    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h, n in ((6, 300), (2, 340), (2, 340)))
    causal = torch.arange(340)[None, :] <= torch.arange(40, 340)[:, None]  # queries are the last 300 keys
    mask = causal[None, None].repeat(2, 1, 1, 1)
    if padded:
        mask[1, :, :, :25] = False  # the second sequence is left-padded
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(1, 2)
    got = chunked_causal_attention(q, k, v, mask if padded else None, 0.25, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_of_a_padded_batch_gives_the_same_tokens():
    from icecache_ray import generate_batch

    model = _model()
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (300, 170)]
    chunked = generate_batch(model, prompts, IceCacheConfig(budget=1024, prefill_chunk=64), max_new_tokens=8)
    whole = generate_batch(model, prompts, IceCacheConfig(budget=1024, prefill_chunk=4096), max_new_tokens=8)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in whole]


def test_generate_batch_matches_single_prompts_and_validates_each_prompt():
    from icecache_ray import generate, generate_batch

    model = _model()
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (260, 120)]
    cfg = IceCacheConfig(budget=1024)  # covers everything: greedy tokens are exactly dense ones
    batch = generate_batch(model, prompts, cfg, max_new_tokens=8)
    for p, result in zip(prompts, batch):
        single = generate(model, p, cfg, max_new_tokens=8)
        assert result.token_ids == single.token_ids and result.prompt_tokens == len(p)
    with pytest.raises(ValueError, match="prompt 1: .*empty"):
        generate_batch(model, [prompts[0], []], cfg, max_new_tokens=8)


@pytest.mark.parametrize("policy", ["icecache", "quest", "full"])
def test_shared_prefill_gives_the_same_tokens_as_generate(policy):
    from icecache_ray import generate
    from icecache_ray.engine.generate import SharedPrefill

    model = _model()
    ids = torch.randint(1, 96, (300,), generator=torch.Generator().manual_seed(12)).tolist()
    cfg = IceCacheConfig(budget=64, policy=policy)
    shared = SharedPrefill(model, ids)
    assert shared.generate(cfg, 12).token_ids == generate(model, ids, cfg, max_new_tokens=12).token_ids


def test_device_kv_is_bounded_during_prefill_and_constant_in_context_during_decode():
    """Peak device K/V in prefill <= dense layers + one layer's full K/V + the resident sets; the
    sparse layers' resident bytes do not depend on the context length."""
    from icecache_ray.engine.dense_layer import spare_rows
    from icecache_ray.engine.memory import KVMeter

    model = _model()
    cfg = IceCacheConfig(budget=64, prefill_chunk=128)
    resident = {}
    for n in (600, 1200):
        ids = torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(15))
        cache = IceCache(model, cfg)
        try:
            meter = KVMeter(cache)
            with meter.tracking(), torch.inference_mode():
                model(ids, cache=cache, use_cache=True)
            layer_full = 2 * 2 * n * 16 * 4  # K and V, 2 KV heads, head_dim 16, float32
            dense = 2 * layer_full * (n + spare_rows(n)) / n  # 2 dense layers, with their spare room
            sparse = meter.current(sparse_only=True)
            assert meter.peak <= dense + layer_full + sparse  # + 1 transient
            assert meter.peak < 4 * layer_full  # the whole prompt of every layer is never resident
            resident[n] = sparse
        finally:
            cache.close()
    assert resident[600] == resident[1200] > 0
