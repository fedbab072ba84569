"""The device selector: its kernels against slow references, the same pages as the host search
when both score every page exactly, slot planning that copies only misses, and a decode step with
one device→host transfer."""

import numpy as np
import pytest
import torch

from icecache_ray.config import BeamRule, IceCacheConfig, IndexConfig
from icecache_ray.engine.device_select import pick, pick_reference, shortlist
from icecache_ray.engine.device_slots import DeviceSlots
from icecache_ray.engine.local import LocalEngine
from icecache_ray.engine.page_summary import PageSummary
from icecache_ray.engine.pool_view import pool_tensor
from icecache_ray.engine.sequence import Sequence
from icecache_ray.policies import make_policy
from icecache_ray.pool import PagePool, PoolLayout
from icecache_ray.serving_config import EngineConfig


def _keys(n, s, p, d, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, 2, s, p, d, generator=g)
    count = torch.randint(0, p + 1, (n, 2, s), generator=g)
    return torch.randn(n, 2, 3, d, generator=g), keys, count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_pages,n_tokens", [(3, 0), (2, 5), (1, 12)])
def test_pick_equals_its_slow_reference(seed, n_pages, n_tokens):
    q, keys, count = _keys(2, 6, 4, 8, seed)
    got = pick(q, keys, count, n_pages, n_tokens, 0.35)
    pages, tokens = pick_reference(q, keys, count, n_pages, n_tokens, 0.35)
    for item, (want_pages, want_tokens) in enumerate(zip(pages, tokens)):
        i, h = divmod(item, 2)
        assert set(got.pages[i, h][got.page_ok[i, h]].tolist()) == want_pages
        assert set(got.tokens[i, h][got.token_ok[i, h]].tolist()) == want_tokens


def test_shortlist_skips_empty_pages_and_prefers_the_aligned_centroid():
    q = torch.zeros(1, 1, 2, 4)
    q[..., 0] = 5.0
    mean = torch.zeros(1, 1, 5, 4)
    mean[0, 0, 3, 0] = 1.0  # aligned with both query heads
    mean[0, 0, 1, 0] = 2.0  # better aligned, but an empty page
    count = torch.tensor([[[4, 0, 4, 4, 0]]])
    log_count = torch.where(count > 0, count.float().log(), float("-inf"))
    best = shortlist(q, mean, log_count, 3, 1.0)
    assert set(best[0, 0].tolist()) == {0, 2, 3}
    assert shortlist(q, mean, log_count, 1, 1.0)[0, 0].tolist() == [3]


def test_slot_plan_keeps_hits_and_copies_only_misses():
    slots = DeviceSlots(n_rows=3, heads=2, n_slots=3, device="cpu")
    rows = torch.tensor([0, 2])
    want = torch.tensor([[[10, 11, -1], [20, 21, 22]], [[30, -1, -1], [40, 41, 42]]])
    counts = torch.full_like(want, 4).masked_fill(want < 0, 0)
    missing, slot = slots.plan(rows, want, counts)
    assert missing.tolist() == (want >= 0).tolist()  # nothing resident yet
    again = torch.tensor([[[11, 12, -1], [22, 20, 23]], [[30, -1, -1], [42, 40, 41]]])
    missing2, slot2 = slots.plan(rows, again, torch.full_like(again, 4).masked_fill(again < 0, 0))
    assert missing2.tolist() == [[[False, True, False], [False, False, True]], [[False, False, False], [False, False, False]]]
    held = slots.page[rows]
    for i in range(2):
        for h in range(2):
            wanted = {p for p in again[i, h].tolist() if p >= 0}
            assert {p for p in held[i, h].tolist() if p >= 0} == wanted  # exactly the wanted pages
            for j, p in enumerate(again[i, h].tolist()):
                if p >= 0:
                    assert held[i, h, slot2[i, h, j]] == p
            kept = [p for p in again[i, h].tolist() if p >= 0 and not missing2[i, h, again[i, h].tolist().index(p)]]
            for p in kept:  # a hit stays in the slot it had
                assert int(slot[i, h][(want[i, h] == p).nonzero()[0, 0]]) == int(slot2[i, h][(again[i, h] == p).nonzero()[0, 0]])
    assert slots.page[1].eq(-1).all()  # rows not in the step are untouched
    slots.drop(torch.tensor([20]))
    assert 20 not in slots.page.tolist() and slots.count[slots.page < 0].eq(0).all()


def test_device_selector_picks_the_host_searchs_pages_when_both_score_every_page():
    """A beam over every cluster and a shortlist over every page: both score all pages exactly."""
    d, p = 16, 8
    rng = np.random.default_rng(3)
    index = IndexConfig(beam=BeamRule(width=10_000.0))
    with PagePool.create(PoolLayout(512, p, d)) as pool:
        policy = make_policy("icecache", d, p, pool=pool, index=index, token_pages=0)
        store = policy.build(rng.standard_normal((600, d)).astype(np.float32), rng.standard_normal((600, d)).astype(np.float32))
        store.insert(rng.standard_normal((40, d)).astype(np.float32), rng.standard_normal((40, d)).astype(np.float32))
        n = store.n_pages
        summary = PageSummary(1, 1, d, 4, "cpu")  # grows to hold every page
        pages = np.arange(n)
        summary.apply(np.zeros(n, np.int64), np.zeros(n, np.int64), pages, store.pool_pages(pages).astype(np.int64),
                      store.page_counts(pages).astype(np.int64), pool_tensor(pool, "cpu"))
        pool_k = pool_tensor(pool, "cpu")[:, 0]
        for trial in range(5):
            qs = rng.standard_normal((3, d)).astype(np.float32) * 2
            for k, t in ((6, 0), (4, 24)):
                _, host_pool, _, t_pages, t_rows = store.select_pages(qs, k, t)
                q = torch.from_numpy(qs)[None, None]
                best = shortlist(q, summary.mean, summary.log_count, n, d ** -0.5)
                sp = summary.pool.gather(-1, best)
                keys = pool_k.index_select(0, sp.reshape(-1)).view(1, 1, n, p, d)
                picks = pick(q, keys, summary.count.gather(-1, best), k, t, d ** -0.5)
                assert set(sp[0, 0, picks.pages[0, 0]].tolist()) == set(host_pool.tolist())
                chosen = picks.tokens[0, 0][picks.token_ok[0, 0]]
                got = {(int(sp[0, 0, c // p]), int(c % p)) for c in chosen}
                assert got == set(zip(store.pool_pages(t_pages).tolist(), t_rows.tolist()))


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("policy", ["full", "icecache", "quest", "streaming"])
def test_a_decode_step_makes_one_device_to_host_transfer(policy):
    model = _tiny_model()
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (400, 520, 610)]
    with LocalEngine(model, IceCacheConfig(policy=policy, budget=64), EngineConfig(max_running=3)) as eng:
        seqs = [eng.add(Sequence(p, 24)) for p in prompts]
        decode_only = []
        while eng.has_work:
            pending = eng.launch()
            eng.complete(pending)
            if not pending.plan.prefill_segments and pending.plan.n_decode:
                decode_only.append(eng.last_stats.host_syncs)
    assert all(s.output for s in seqs)
    assert len(decode_only) > 10 and set(decode_only) == {1}


@pytest.mark.parametrize("policy,selector", [("icecache", "device"), ("icecache", "host"), ("quest", "host")])
def test_leaving_tokens_handed_over_after_the_step_give_the_same_tokens(policy, selector):
    """The accelerator's window offload (copies staged during the step, handed to the stores after
    its transfer), forced on the CPU: the same tokens as handing them over at once, nothing left
    pending after a step, and no transfer added (one per decode-only step with the device selector)."""
    model = _tiny_model()
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (400, 520, 610)]
    outputs, syncs, handed = {}, {}, []
    for defer in (False, True):
        with LocalEngine(model, IceCacheConfig(policy=policy, budget=64, selector=selector), EngineConfig(max_running=3)) as eng:
            leaving = eng.runner.leaving
            leaving.defer = defer
            if defer:
                hand_over = leaving.hand_over
                leaving.hand_over = lambda stores, items: (handed.append(len(items)), hand_over(stores, items))
            seqs = [eng.add(Sequence(p, 40)) for p in prompts]
            decode_only = []
            while eng.has_work:
                pending = eng.launch()
                eng.complete(pending)
                assert not leaving.pending
                if not pending.plan.prefill_segments and pending.plan.n_decode:
                    decode_only.append(eng.last_stats.host_syncs)
            outputs[defer], syncs[defer] = [s.output for s in seqs], decode_only
    assert handed  # pages left the windows while decoding
    assert outputs[True] == outputs[False] and syncs[True] == syncs[False]
    if selector == "device":
        assert set(syncs[True]) == {1}


def test_staged_leaving_tokens_wait_for_the_device_only_without_a_later_transfer(monkeypatch):
    from icecache_ray.engine import leaving as leaving_mod
    from icecache_ray.engine.transfers import to_host

    waits, inserted = [], []
    monkeypatch.setattr(leaving_mod, "wait_for_device", lambda device: waits.append(device))

    class Stores:
        def insert(self, items):
            inserted.extend(items)

    tokens = leaving_mod.LeavingTokens("cpu", defer=True)
    kv = torch.randn(2, 3, 16, 8)
    tokens.hand_over(Stores(), [("a", kv)])
    assert not inserted  # held until the step's transfer
    to_host(torch.zeros(1))  # the step's sampled ids, queued behind the copy
    tokens.flush()
    assert not waits and len(inserted) == 1
    seq, k, v = inserted[0]
    assert seq == "a" and np.array_equal(k, kv[0].numpy()) and np.array_equal(v, kv[1].numpy())
    tokens.hand_over(Stores(), [("b", kv)])
    tokens.flush()  # no transfer since the copy: wait for the stream
    assert len(waits) == 1 and len(inserted) == 2
    tokens.flush()
    assert len(waits) == 1  # nothing pending, nothing to wait for


def test_page_changes_land_at_the_next_step_whatever_the_background_timing(monkeypatch):
    """Inserts that finish late (a slow background thread) give the same tokens as prompt ones:
    a change issued at step t is applied at step t + 1 either way."""
    import time as _time

    from icecache_ray.engine.index_service import IndexService

    model = _tiny_model()
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 410)]

    def tokens():
        with LocalEngine(model, IceCacheConfig(budget=64), EngineConfig(max_running=2)) as eng:
            seqs = [eng.add(Sequence(p, 40)) for p in prompts]
            eng.run()
        return [list(s.output) for s in seqs]

    prompt_ones = tokens()
    slow_insert = IndexService.insert

    def late(self, *args):
        _time.sleep(0.02)
        return slow_insert(self, *args)

    monkeypatch.setattr(IndexService, "insert", late)
    assert tokens() == prompt_ones


def test_the_fused_cpu_kernel_equals_the_torch_ops_cuda_runs(monkeypatch):
    """Same tokens, logits to float tolerance and page counters, fused kernel vs torch ops."""
    from icecache_ray.engine.device_pages import DevicePages

    model = _tiny_model()
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (500, 650)]

    def run(fused):
        monkeypatch.setattr(DevicePages, "fused", fused)
        with LocalEngine(model, IceCacheConfig(budget=64), EngineConfig(max_running=2)) as eng:
            seqs = [eng.add(Sequence(p, 30)) for p in prompts]
            eng.run()
        return [list(s.output) for s in seqs], [(s.stats.pages_selected, s.stats.pages_loaded) for s in seqs]

    fused, reference = run(True), run(False)
    assert fused[0] == reference[0]
    assert fused[1] == reference[1] and all(sel > loaded > 0 for sel, loaded in fused[1])


@pytest.mark.parametrize("n,k", [(600, 96), (600, 1), (40, 39), (1536, 64), (5, 0)])
def test_the_kernels_partition_top_k_equals_a_stable_sort(n, k):
    """Largest first, ties lowest position first (what argsort(-x, mergesort) gives), -inf and
    repeated values included: the kernel's top-k decides which pages a sequence gets."""
    from icecache_ray.kernels.device_select_cpu import _top

    rng = np.random.default_rng(n + k)
    values = rng.integers(0, 30, n).astype(np.float32)  # many ties
    values[rng.random(n) < 0.1] = -np.inf
    assert np.array_equal(_top(values, k), np.argsort(-values, kind="mergesort")[:k])


def test_the_kernels_page_changes_equal_the_summary_and_slot_ops():
    """apply_changes (CPU) = PageSummary.apply + DeviceSlots.drop: same tables, means to float
    tolerance, and the slots holding a changed pool page freed."""
    from icecache_ray.kernels.device_select_cpu import apply_changes

    rng = np.random.default_rng(3)
    rows_n, heads, pages, p, d, capacity = 3, 2, 10, 4, 8, 64
    pool = torch.from_numpy(rng.standard_normal((capacity, 2, p, d)).astype(np.float32))
    m = 12
    rows, hs = rng.integers(0, rows_n, m), rng.integers(0, heads, m)
    index_pages, counts = rng.integers(0, pages, m), rng.integers(0, p + 1, m)
    pool_pages = rng.permutation(capacity)[:m]
    keep = np.unique(np.stack([rows, hs, index_pages]), axis=1, return_index=True)[1]  # one change per page
    rows, hs, index_pages, counts, pool_pages = (x[keep].astype(np.int64) for x in (rows, hs, index_pages, counts, pool_pages))
    torch_side, kernel_side = PageSummary(rows_n, heads, d, pages, "cpu"), PageSummary(rows_n, heads, d, pages, "cpu")
    slots_t, slots_k = DeviceSlots(rows_n, heads, 3, "cpu"), DeviceSlots(rows_n, heads, 3, "cpu")
    for slots in (slots_t, slots_k):
        slots.page[0, 0] = torch.tensor([int(pool_pages[0]), 63, -1])
        slots.page[1, 1] = torch.tensor([5, int(pool_pages[-1]), 7])
        slots.count[:] = 2
    slots_t.drop(torch_side.apply(rows, hs, index_pages, pool_pages, counts, pool))
    kernel_side.reserve(rows, index_pages)
    apply_changes(rows, hs, index_pages, pool_pages, counts, pool.numpy(), kernel_side.mean.numpy(), kernel_side.pool.numpy(),
                  kernel_side.count.numpy(), kernel_side.log_count.numpy(), slots_k.page.numpy(), slots_k.count.numpy())
    assert torch.allclose(torch_side.mean, kernel_side.mean, atol=1e-6)
    for name in ("pool", "count", "log_count"):
        assert torch.equal(getattr(torch_side, name), getattr(kernel_side, name)), name
    assert np.array_equal(torch_side.used, kernel_side.used)
    assert torch.equal(slots_t.page, slots_k.page) and torch.equal(slots_t.count, slots_k.count)
    assert slots_k.page[0, 0].tolist() == [-1, 63, -1] and slots_k.page[1, 1].tolist() == [5, -1, 7]  # changed pages dropped


def test_quest_on_the_device_picks_the_host_policys_pages():
    """Quest with its middle and page bounds on the device = the host policy (bounds in host
    stores, tokens written per row and head): same tokens, logits to float tolerance, same pages
    selected per sequence; leaving tokens join the device middle at the step the host inserts them."""
    model = _tiny_model()
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (480, 700)]

    def run(selector):
        cfg = IceCacheConfig(policy="quest", budget=64, selector=selector)
        with LocalEngine(model, cfg, EngineConfig(max_running=2)) as eng:
            seqs = [eng.add(Sequence(p, 40)) for p in prompts]
            eng.run()
        return [list(s.output) for s in seqs], [s.stats.pages_selected for s in seqs]

    device, host = run("device"), run("host")
    assert device == host and all(n > 0 for n in device[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_missing_page_kernel_equals_the_indexed_copy(dtype):
    """kernels.device_copy_cuda (one block per planned page, hits skipped) writes exactly what the
    reference's nonzero + index_copy writes, and nothing else."""
    from icecache_ray.engine.resident import ResidentKV
    from icecache_ray.kernels import device_copy_cuda

    g = torch.Generator().manual_seed(0)
    cap, p, d, n, heads, k, sink = 64, 16, 8, 3, 2, 4, 16
    pool = torch.randn(cap, 2, p, d, generator=g).to("cuda", dtype)
    want = torch.randint(0, cap, (n, heads, k), generator=g).cuda()
    missing = (torch.rand(n, heads, k, generator=g) < 0.5).cuda()
    slot = torch.stack([torch.randperm(k, generator=g) for _ in range(n * heads)]).view(n, heads, k).cuda()
    rows = torch.tensor([2, 0, 1], device="cuda")
    kv = ResidentKV(n, heads, sink, k * p, 32, d, dtype, "cuda")
    kv.kv.copy_(torch.randn(kv.kv.shape, generator=g).to(dtype))
    want_kv = kv.kv.clone()
    dst = kv.flat_base(rows)[:, :, None] + kv.slot_start + slot * p  # [n, H, k]
    item, head, j = missing.nonzero(as_tuple=True)
    rows_k = (dst[item, head, j][:, None] + torch.arange(p, device="cuda")).reshape(-1)
    data = pool.index_select(0, want[item, head, j])  # [m, 2, P, d]
    flat = want_kv.view(-1, d)
    flat[rows_k] = data[:, 0].reshape(-1, d)
    flat[rows_k + kv.v_offset] = data[:, 1].reshape(-1, d)
    assert device_copy_cuda.supports(pool, kv.flat)
    device_copy_cuda.copy_missing_pages(pool, want, missing, dst, kv.flat, kv.v_offset)
    assert torch.equal(kv.kv, want_kv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["full", "icecache", "quest"])
def test_cuda_decode_step_syncs_only_where_it_counts_a_transfer(policy):
    """Under ``torch.cuda.set_sync_debug_mode("warn")`` a decode step synchronizes once, in its one
    counted device→host transfer (the sampled ids), also on steps where a page leaves a window
    (its K/V go to pinned memory without a sync, :mod:`icecache_ray.engine.leaving`)."""
    import warnings

    model = _tiny_model().to("cuda")
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (400, 520)]
    with LocalEngine(model, IceCacheConfig(policy=policy, budget=64), EngineConfig(max_running=2)) as eng:
        for p in prompts:
            eng.add(Sequence(p, 40))
        steps = []
        while eng.has_work:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:  # a local stage runs the step in launch(); complete() applies its sampled ids
                    pending = eng.launch()
                    eng.complete(pending)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            if not pending.plan.prefill_segments and pending.plan.n_decode:
                syncs = sum("synchroniz" in str(w.message) for w in caught)
                steps.append((syncs, eng.last_stats.host_syncs))
    assert len(steps) > 20
    assert all(syncs <= 1 and counted == 1 for syncs, counted in steps), steps
