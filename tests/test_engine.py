"""The engine's key invariants on tiny random models: a budget covering every page is dense
attention; a sequence's logits and tokens do not depend on what runs beside it (alone, batched,
joined mid-flight, chunked prefill interleaved with decode); rows and pages are reused at once."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.local import LocalEngine
from icecache_ray.engine.scheduler import Refused
from icecache_ray.engine.sequence import Sequence, SeqStatus
from icecache_ray.pool import list_leaked_segments
from icecache_ray.serving_config import EngineConfig

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)
TOL = dict(atol=2e-4, rtol=2e-4)


def _model(kind="llama", **extra):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**{**COMMON, **extra})).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**{**COMMON, "sliding_window": None, **extra})).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **extra})).eval()
    return Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 24, **extra})).eval()


def _prompt(n, seed):
    return torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _dense_logits(model, prompt, forced):
    """Logits [len(forced), V] of transformers' own DynamicCache, teacher-forced with ``forced``."""
    cache, out = DynamicCache(config=model.config), []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=model.device), cache=cache, use_cache=True).logits[0, -1]
        out.append(logits)
        for token in forced[:-1]:
            logits = model(torch.tensor([[token]], device=model.device), cache=cache, use_cache=True).logits[0, -1]
            out.append(logits)
    return torch.stack(out)


def _greedy_dense(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


class Logits:
    """Collects each sequence's per-step logits from an engine running with want_logits."""

    def __init__(self, engine):
        self.engine, self.by_seq = engine, {}
        engine.want_logits = True

    def step(self):
        pending = self.engine.launch()
        if pending is None:
            return
        emitting = [pending.plan.seq_ids[i] for i, e in enumerate(pending.plan.emits.tolist()) if e]
        self.engine.complete(pending)
        for seq_id, row in zip(emitting, self.engine.last_logits):
            self.by_seq.setdefault(seq_id, []).append(row)

    def run(self):
        while self.engine.has_work:
            self.step()

    def of(self, seq):
        return torch.stack(self.by_seq[seq.seq_id])


def _forced(prompt_len_seed, forced, cfg, model, engine=EngineConfig(max_running=1)):
    """Logits of one sequence alone, teacher-forced."""
    with LocalEngine(model, cfg, engine) as eng:
        seq = Sequence(prompt_len_seed, len(forced))
        seq.forced = list(forced)
        eng.add(seq)
        logs = Logits(eng)
        logs.run()
        return logs.of(seq), eng


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("policy", ["icecache", "quest"])
def test_budget_covering_every_page_equals_dense_attention(kind, policy):
    model = _model(kind)
    prompt = _prompt(300, 1)
    forced = _greedy_dense(model, prompt, 40)
    got, _ = _forced(prompt, forced, IceCacheConfig(budget=1024, policy=policy), model)  # 60 slots > ~20 middle pages
    torch.testing.assert_close(got, _dense_logits(model, prompt, forced), **TOL)


def test_token_slots_covering_the_rest_of_the_pages_equal_dense_attention():
    """10 whole pages + 50 pages' worth of single tokens cover every middle token of a 300-token
    prompt: the token slots must hold exactly the right K/V rows for this to be dense attention."""
    model = _model()
    prompt = _prompt(300, 2)
    forced = _greedy_dense(model, prompt, 40)
    cfg = IceCacheConfig(budget=1024, token_pages=50)
    got, eng = _forced(prompt, forced, cfg, model)
    torch.testing.assert_close(got, _dense_logits(model, prompt, forced), **TOL)


def test_full_policy_gives_the_tokens_of_transformers_generate():
    from icecache_ray import generate

    model = _model()
    prompt = _prompt(120, 2)
    assert generate(model, prompt, IceCacheConfig(policy="full"), max_new_tokens=12).token_ids == _greedy_dense(model, prompt, 12)


def test_short_prompt_long_generation_loses_no_token():
    """Prompts shorter than sink + window never drop tokens as the window slides (the published
    code does): with a budget that covers everything, decoding stays equal to dense."""
    model = _model()
    prompt = _prompt(20, 3)
    forced = _greedy_dense(model, prompt, 120)
    got, _ = _forced(prompt, forced, IceCacheConfig(budget=512), model)
    torch.testing.assert_close(got, _dense_logits(model, prompt, forced), **TOL)


@pytest.mark.parametrize("reuse", [2, 3])
def test_layer_reuse_with_full_budget_equals_dense(reuse):
    """IceCache(r): reuse layers attend over their own K/V of the anchor's tokens; with a budget
    covering everything that is still exact dense attention."""
    model = _model(num_hidden_layers=6)
    prompt = _prompt(300, 9)
    forced = _greedy_dense(model, prompt, 30)
    got, _ = _forced(prompt, forced, IceCacheConfig(budget=1024, layer_reuse=reuse), model)
    torch.testing.assert_close(got, _dense_logits(model, prompt, forced), **TOL)


def test_small_budget_decodes_and_moves_only_missing_pages():
    model = _model()
    with LocalEngine(model, IceCacheConfig(budget=64), EngineConfig(max_running=1)) as eng:
        seq = eng.add(Sequence(_prompt(600, 4), 30))
        eng.run()
    st = seq.stats
    assert st.decode_steps == 29 and st.pages_selected > 0 and st.pages_loaded <= st.pages_selected
    assert st.pages_hit > 0  # consecutive steps reuse resident pages


@pytest.mark.parametrize("policy", ["icecache", "icecache_tokens", "quest", "streaming"])
def test_a_sequence_does_not_depend_on_what_runs_beside_it(policy):
    """Alone vs batched with others joining mid-flight, prompts prefilled in chunks interleaved
    with the others' decoding (budget 64 or 96 with token slots, selection active): same logits,
    same greedy tokens."""
    model = _model()
    if policy == "icecache_tokens":  # 1 whole page + 2 pages' worth of single tokens
        cfg = IceCacheConfig(budget=96, sink_tokens=16, window_tokens=32, token_pages=2)
    else:
        cfg = IceCacheConfig(budget=64, policy=policy)
    prompts = [_prompt(n, 7 + n) for n in (300, 170, 45, 420)]
    alone = []
    for p in prompts:
        with LocalEngine(model, cfg, EngineConfig(max_running=1)) as eng:
            logs = Logits(eng)
            seq = eng.add(Sequence(p, 30))
            logs.run()
            alone.append((seq.output, logs.of(seq)))
    with LocalEngine(model, cfg, EngineConfig(max_running=3, max_step_tokens=64)) as eng:
        logs = Logits(eng)
        seqs = [eng.add(Sequence(prompts[0], 30)), eng.add(Sequence(prompts[1], 30))]
        for _ in range(6):
            logs.step()
        assert seqs[0].status is SeqStatus.RUNNING and seqs[1].status is SeqStatus.PREFILLING  # 300 + 170 > 6 * 64 tokens
        seqs.append(eng.add(Sequence(prompts[2], 30)))
        for _ in range(3):
            logs.step()
        seqs.append(eng.add(Sequence(prompts[3], 30)))  # waits for a row, then joins
        logs.run()
    for seq, (tokens, logits) in zip(seqs, alone):
        assert seq.output == tokens
        torch.testing.assert_close(logs.of(seq), logits, **TOL)


def test_eos_at_different_steps_frees_rows_for_waiting_sequences_at_once():
    model = _model()
    cfg = IceCacheConfig(budget=64)
    prompts = [_prompt(n, 20 + n) for n in (200, 150, 90)]
    with LocalEngine(model, cfg, EngineConfig(max_running=1)) as eng:
        first = eng.add(Sequence(prompts[0], 20))
        eng.run()
    eos = first.output[5]  # the first sequence stops at its 6th token (or earlier)
    stop = first.output.index(eos) + 1
    with LocalEngine(model, cfg, EngineConfig(max_running=2)) as eng:
        seqs = [eng.add(Sequence(p, 20, eos)) for p in prompts]
        steps_until_free = None
        while eng.has_work:
            eng.step()
            if seqs[0].done and steps_until_free is None:
                steps_until_free = eng.steps
                assert seqs[2].status is SeqStatus.WAITING and seqs[0].row is None
            if steps_until_free is not None and eng.steps == steps_until_free + 1:
                assert seqs[2].status is not SeqStatus.WAITING, "the freed row is lent at the next step"
    assert seqs[0].output == first.output[:stop] and seqs[0].finish_reason == "eos"
    assert all(s.finish_reason in ("eos", "length") for s in seqs) and seqs[2].row is None


def test_a_full_pool_makes_requests_wait_and_one_that_can_never_fit_is_refused():
    model = _model()
    cfg = IceCacheConfig(budget=64)
    # per sequence: ceil((n + 8) / 16) * 2 KV heads * 2 sparse layers * 1.25 pages
    with LocalEngine(model, cfg, EngineConfig(max_running=3, max_step_tokens=2048, pool_pages=100)) as eng:
        seqs = [eng.add(Sequence(_prompt(300, 30 + i), 8)) for i in range(3)]  # 100 pages each: one at a time
        eng.step()
        assert seqs[0].status is SeqStatus.RUNNING and [s.status for s in seqs[1:]] == [SeqStatus.WAITING] * 2
        eng.run()
        assert all(len(s.output) == 8 for s in seqs)
        with pytest.raises(Refused, match="needs 110 host pages on index service 0 but it holds 100"):
            eng.add(Sequence(_prompt(340, 9), 8))
        with pytest.raises(Refused, match="exceed the 2048 tokens a row holds"):
            eng.add(Sequence(_prompt(2045, 9), 8))


def test_rows_are_allocated_once_and_sparse_layers_do_not_grow_with_the_context():
    model = _model()
    with LocalEngine(model, IceCacheConfig(budget=64), EngineConfig(max_running=2, max_seq_len=1300)) as eng:
        before = eng.runner.device_bytes()
        sparse = sum(layer.device_bytes() for layer in eng.runner.sparse)
        eng.add(Sequence(_prompt(600, 40), 4))
        eng.add(Sequence(_prompt(1200, 41), 4))
        eng.run()
        assert eng.runner.device_bytes() == before and sum(layer.device_bytes() for layer in eng.runner.sparse) == sparse
        # 2 rows x 2 sparse layers x (16 sink + 2 pages + 2-page ring rows) x 2 KV heads x (K, V) x 16 dims x 4 bytes,
        # plus each layer's page summary and slot table (sized for max_seq_len once)
        tables = sum(layer.device_pages.nbytes() for layer in eng.runner.sparse)
        assert sparse == 2 * 2 * (16 + 32 + 32) * 2 * 2 * 16 * 4 + tables and tables > 0


@pytest.mark.parametrize("past", [0, 37])
def test_prefill_attention_equals_one_masked_call(past):
    from icecache_ray.engine.attention import prefill_attention

    gen = torch.Generator().manual_seed(10)
    n = 50
    q = torch.randn(1, 6, n, 16, generator=gen)
    k, v = (torch.randn(1, 2, past + n, 16, generator=gen) for _ in range(2))
    mask = torch.arange(past + n)[None, :] <= (past + torch.arange(n))[:, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(prefill_attention(q, k, v, past, 0.25), want, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_gives_the_same_tokens():
    from icecache_ray import generate_batch

    model = _model()
    prompts = [_prompt(n, 10 + n) for n in (300, 170)]
    cfg = IceCacheConfig(budget=1024)
    chunked = generate_batch(model, prompts, cfg, max_new_tokens=8, engine=EngineConfig(max_running=2, max_step_tokens=40))
    whole = generate_batch(model, prompts, cfg, max_new_tokens=8, engine=EngineConfig(max_running=2, max_step_tokens=4096))
    assert [r.token_ids for r in chunked] == [r.token_ids for r in whole]


def test_generate_batch_matches_single_prompts_and_validates_each_prompt():
    from icecache_ray import generate, generate_batch

    model = _model()
    prompts = [_prompt(n, 11 + n) for n in (260, 120)]
    cfg = IceCacheConfig(budget=1024)  # covers everything: greedy tokens are exactly dense ones
    batch = generate_batch(model, prompts, cfg, max_new_tokens=8)
    for p, result in zip(prompts, batch):
        assert result.token_ids == generate(model, p, cfg, max_new_tokens=8).token_ids == _greedy_dense(model, p, 8)
        assert result.prompt_tokens == len(p) and result.stats["generated_tokens"] == 8
    with pytest.raises(ValueError, match="prompt 1: .*empty"):
        generate_batch(model, [prompts[0], []], cfg, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"prompt 1: token 2 is 96: token ids must be integers in \[0, 96\)"):
        generate_batch(model, [prompts[0], [3, 4, 96]], cfg, max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 0: token 0 is -1"):
        generate_batch(model, [[-1, 5]], cfg, max_new_tokens=8)


@pytest.mark.parametrize("policy", ["icecache", "quest", "full"])
def test_shared_prefill_gives_the_same_tokens_as_generate(policy):
    from icecache_ray import generate
    from icecache_ray.engine.generate import SharedPrefill

    model = _model()
    ids = _prompt(300, 12)
    cfg = IceCacheConfig(budget=64, policy=policy)
    shared = SharedPrefill(model, ids)
    tokens = shared.generate(cfg, 12).token_ids
    assert tokens == generate(model, ids, cfg, max_new_tokens=12).token_ids
    nll = shared.nll(cfg, tokens)
    assert len(nll) == 12 and all(x >= 0 for x in nll)


@pytest.mark.parametrize("policy", ["icecache", "quest", "full"])
def test_prefills_decoded_together_give_the_tokens_each_gets_alone(policy):
    from icecache_ray.engine.generate import SharedPrefill, generate_prefilled

    model = _model()
    cfg = IceCacheConfig(budget=96, sink_tokens=16, window_tokens=32, token_pages=2, policy=policy)
    prefills = [SharedPrefill(model, _prompt(n, 30 + n)) for n in (300, 90, 410)]
    together = generate_prefilled(prefills, cfg, 12)
    assert [r.token_ids for r in together] == [p.generate(cfg, 12).token_ids for p in prefills]
    assert generate_prefilled([], cfg, 12) == []


def test_bad_model_or_config_is_rejected_before_work():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        LocalEngine(gpt2)
    with pytest.raises(ValueError, match="n_full_layers=9"):
        LocalEngine(_model(), IceCacheConfig(n_full_layers=9))
    sliding = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=64)).eval()
    with pytest.raises(ValueError, match="sliding_window=64"):
        LocalEngine(sliding)


def test_close_leaves_no_shared_memory_and_restores_the_model():
    before = set(list_leaked_segments())
    model = _model()
    eng = LocalEngine(model, IceCacheConfig(budget=64), EngineConfig(max_running=2))
    eng.add(Sequence(_prompt(100, 13), 3))
    eng.run()
    eng.close()
    eng.close()
    assert set(list_leaked_segments()) <= before
    assert model.config._attn_implementation == "sdpa"


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
    """Same invariant with the model, rows and page slots on the GPU (pool on the host, CuPy copies)."""
    model = _model().to("cuda")
    prompt = _prompt(400, 6)
    forced = _greedy_dense(model, prompt, 30)
    want = _dense_logits(model, prompt, forced).cpu()
    got, eng = _forced(prompt, forced, IceCacheConfig(budget=1024), model)
    torch.testing.assert_close(got.cpu(), want, **TOL)


def _batched_logits(model, prompts, forced, cfg):
    """Teacher-forced logits of ``prompts`` decoded together (prefill chunks interleaved with decode)."""
    with LocalEngine(model, cfg, EngineConfig(max_running=len(prompts), max_step_tokens=128)) as eng:
        logs = Logits(eng)
        seqs = []
        for p, f in zip(prompts, forced):
            seqs.append(eng.add(Sequence(p, len(f))))
            seqs[-1].forced = list(f)
        logs.run()
        return [logs.of(s).cpu() for s in seqs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["icecache", "icecache_tokens", "quest", "oracle", "streaming"])
def test_cuda_sparse_decode_equals_the_cpu_engine(policy):
    """Every sparse path on the GPU with selection active (page slots through CuPy, token slots and
    token policies written from host rows, window offload), two sequences in one batch: the CPU
    engine's logits."""
    if policy == "icecache_tokens":
        cfg = IceCacheConfig(budget=96, sink_tokens=16, window_tokens=32, token_pages=2)
    else:
        cfg = IceCacheConfig(budget=64, policy=policy)
    model = _model()
    prompts = [_prompt(n, 40 + n) for n in (330, 250)]
    forced = [_greedy_dense(model, p, 24) for p in prompts]
    want = _batched_logits(model, prompts, forced, cfg)
    got = _batched_logits(_model().to("cuda"), prompts, forced, cfg)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)

