"""16-bit host page pools (bfloat16 / float16): the index selects exactly what it selects over a
float32 pool (it scores its own float32 key copy), the pool holds the rounded K/V, and an engine
decoding from a bfloat16 pool gives the float32 pool's logits within bfloat16 rounding."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from icecache_ray.config import IceCacheConfig, IndexConfig, PoolConfig
from icecache_ray.engine.local import LocalEngine
from icecache_ray.engine.sequence import Sequence
from icecache_ray.index.mdci import MDCIIndex
from icecache_ray.pool import PagePool, PoolLayout, bf16_bits_to_float32
from icecache_ray.serving_config import EngineConfig

D, P = 16, 16


def _data(n, seed=0, n_topics=12):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_topics, D)).astype(np.float32) * 3
    keys = centres[rng.integers(0, n_topics, n)] + rng.standard_normal((n, D)).astype(np.float32)
    return keys.astype(np.float32), rng.standard_normal((n, D)).astype(np.float32)


def _decoded(pool, ids):
    return pool.read(ids)  # [n, 2, P, d] float32 (bf16 bits widened, fp16 cast)


def _index_pair(dtype, n_build=2500, n_insert=700, batch=37):
    """The same tokens (a build, then inserts in batches: fast path, new clusters and splits)
    into an index over a float32 pool and one over a ``dtype`` pool."""
    keys, values = _data(n_build + n_insert)
    pools = [PagePool.create(PoolLayout(4096, P, D, "float32")), PagePool.create(PoolLayout(4096, P, D, dtype))]
    indexes = [MDCIIndex(pool, IndexConfig(), D) for pool in pools]
    for index in indexes:
        index.build(keys[:n_build], values[:n_build])
        for start in range(n_build, n_build + n_insert, batch):
            index.insert(keys[start : start + batch], values[start : start + batch])
    return pools, indexes, keys, values


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_pool_index_selects_the_float32_pools_pages(dtype):
    pools, (ref, got), keys, values = _index_pair(dtype)
    try:
        n = ref.n_pages
        assert got.n_pages == n and got.n_tokens == ref.n_tokens == len(keys)
        np.testing.assert_array_equal(got.table.page_tokens[:n], ref.table.page_tokens[:n])
        np.testing.assert_array_equal(got.table.cluster_keys[: ref.n_clusters], ref.table.cluster_keys[: ref.n_clusters])
        # the key copy holds the keys exactly; the pool holds K and V rounded to its dtype
        tokens = ref.table.page_tokens[:n]
        valid = tokens >= 0
        np.testing.assert_array_equal(got.table.key_pages[got.table.key_index[:n], 0][valid], keys[tokens[valid]])
        stored = _decoded(pools[1], got.table.page_pool[:n])
        for kv, want in ((0, keys), (1, values)):
            rounded = pools[1].layout.encode(want[tokens[valid]])
            exact = bf16_bits_to_float32(rounded) if dtype == "bfloat16" else rounded.astype(np.float32)
            np.testing.assert_array_equal(stored[:, kv][valid], exact)
            assert not np.array_equal(exact, want[tokens[valid]])  # the pool really is 16-bit
        rng = np.random.default_rng(7)
        for _ in range(12):
            qs = (keys[rng.integers(0, len(keys), 3)] + rng.standard_normal((3, D)).astype(np.float32)).astype(np.float32)
            for a, b in zip(got.select_fast(qs, 8, 2 * P), ref.select_fast(qs, 8, 2 * P)):
                np.testing.assert_array_equal(a, b)
            qa, qb = got.query(qs, 8, P), ref.query(qs, 8, P)
            np.testing.assert_array_equal(qa.pages, qb.pages)
            np.testing.assert_array_equal(qa.token_rows, qb.token_rows)
        assert got.table.key_copy_bytes() == n * P * D * 4
        assert got.metadata_bytes() == ref.metadata_bytes() + n * P * D * 4
        got.release()
        assert pools[1].num_used == 0
    finally:
        for pool in pools:
            pool.close()
            pool.unlink()


def test_python_insert_path_keeps_the_16bit_pool_and_key_copy_in_step():
    """Every token through the Python path (appends, new clusters, splits) also agrees."""
    keys, values = _data(900, seed=3)
    pools = [PagePool.create(PoolLayout(1024, P, D, "float32")), PagePool.create(PoolLayout(1024, P, D, "bfloat16"))]
    try:
        indexes = []
        for pool in pools:
            index = MDCIIndex(pool, IndexConfig(), D)
            index.fast_insert = False
            index.build(keys[:300], values[:300])
            for start in range(300, 900, 50):
                index.insert(keys[start : start + 50], values[start : start + 50])
            indexes.append(index)
        ref, got = indexes
        n = ref.n_pages
        np.testing.assert_array_equal(got.table.page_tokens[:n], ref.table.page_tokens[:n])
        np.testing.assert_array_equal(got.table.key_pages[got.table.key_index[:n], 0], pools[0].pages[ref.table.page_pool[:n], 0])
        np.testing.assert_allclose(_decoded(pools[1], got.table.page_pool[:n]), pools[0].pages[ref.table.page_pool[:n]],
                                   rtol=2**-8, atol=0)
    finally:
        for pool in pools:
            pool.close()
            pool.unlink()


def _tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def _decode_logits(model, prompt, forced, ice):
    """Teacher-forced logits [len(forced), V] of one sequence on a local engine (CPU, float32 rows)."""
    with LocalEngine(model, ice, EngineConfig(max_running=1)) as eng:
        assert eng.service.pool.layout.dtype == ice.pool.dtype
        seq = Sequence(prompt, len(forced))
        seq.forced = list(forced)
        eng.add(seq)
        eng.want_logits = True
        out = []
        while eng.has_work:
            pending = eng.launch()
            if pending is None:
                continue
            eng.complete(pending)
            out.extend(eng.last_logits)
        return torch.stack(out)


def test_engine_logits_from_a_bfloat16_pool_match_the_float32_pool_within_bf16_tolerance():
    model = _tiny_model()
    prompt = torch.randint(1, 96, (400,), generator=torch.Generator().manual_seed(5)).tolist()
    forced = torch.randint(1, 96, (24,), generator=torch.Generator().manual_seed(6)).tolist()
    ice = IceCacheConfig(budget=64)  # 1 sink + 1 retrieved page... + window: selection is active
    want = _decode_logits(model, prompt, forced, ice)
    got = _decode_logits(model, prompt, forced, ice.with_(pool=PoolConfig(dtype="bfloat16")))
    assert not torch.equal(got, want)  # the bf16 pool's rounded rows did reach attention
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
