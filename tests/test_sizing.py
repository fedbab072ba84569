"""One device memory budget for every policy (EngineConfig.device_kv_bytes): the rows each policy
gets, the summary-table allowance, and the refusal of a budget too small for one row."""

import pytest
import torch
from transformers import LlamaConfig

from icecache_ray.config import IceCacheConfig, PoolConfig
from icecache_ray.engine.local import plan_rows
from icecache_ray.engine.sizing import budget_rows, policy_row_cost, row_cost, summary_table_bytes
from icecache_ray.model import SMOLLM2_SHAPE
from icecache_ray.serving_config import EngineConfig

SMOL = LlamaConfig(**SMOLLM2_SHAPE)  # 30 layers, 3 KV heads, head_dim 64
CTX = 8192
FULL_ROW_BF16 = 2 * 3 * 64 * 2 * 30 * CTX  # K and V, bf16, every layer, the whole context


def _rows(ice, budget, **engine):
    cfg = EngineConfig(device_kv_bytes=budget, max_seq_len=CTX, max_step_tokens=4096, **engine)
    return plan_rows(SMOL, ice, cfg, range(30), torch.device("cpu"), 2)[0]


def test_summary_table_formula():
    # 8192 / 16 = 512 pages, x 1.25 = 640 entries of 64 * 4 + 16 B, per sparse layer and KV head
    assert summary_table_bytes(8192, 16, 3, 64, 28) == 28 * 3 * 640 * 272
    assert summary_table_bytes(8000, 16, 8, 128, 1) == 8 * 625 * (128 * 4 + 16)  # ceil(500 * 1.25)
    assert summary_table_bytes(8192, 16, 3, 64, 0) == 0


def test_full_cache_row_is_the_whole_context_and_a_sparse_row_its_resident_rows():
    full = policy_row_cost(IceCacheConfig(policy="full"), 30, 0, 3, 64, 2, CTX)
    assert full.device == FULL_ROW_BF16 and full.staging == 0
    ice = IceCacheConfig(budget=256)
    sparse = policy_row_cost(ice, 30, 28, 3, 64, 2, CTX)
    resident = 32 + ice.retrieved_pages * 16 + 3 * 16  # sink + slots + (window pages + 1) ring
    per_token = 2 * 3 * 64 * 2
    assert sparse.device == per_token * (2 * CTX + 28 * resident) + summary_table_bytes(CTX, 16, 3, 64, 28)
    assert sparse.staging == per_token * 28 * CTX
    # a 16-bit pool: half the page bytes, plus the index's float32 key copy (4 * d B per page slot)
    f32 = row_cost(2, 28, 3, 64, 2, CTX, resident, 16, pool_itemsize=4)
    b16 = policy_row_cost(ice.with_(pool=PoolConfig(dtype="bfloat16")), 30, 28, 3, 64, 2, CTX)
    assert b16.host == f32.host


def test_the_same_budget_gives_the_full_cache_fewer_rows_than_icecache():
    budget = 16 * FULL_ROW_BF16
    full = _rows(IceCacheConfig(policy="full"), budget)
    ice = _rows(IceCacheConfig(budget=256), budget)
    assert full == 16
    assert ice > 3 * full  # 2 dense layers of the whole context + 28 small rings per row
    assert _rows(IceCacheConfig(budget=256), budget // 2) < ice


def test_a_budget_too_small_for_one_row_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=rf"device_kv_bytes={FULL_ROW_BF16 - 1}: too small for one row of {CTX} tokens, "
                                         rf"which needs {FULL_ROW_BF16} B"):
        _rows(IceCacheConfig(policy="full"), FULL_ROW_BF16 - 1)
    with pytest.raises(ValueError, match="plus .* B of prefill staging"):  # a sparse row needs room to prefill
        _rows(IceCacheConfig(budget=256), FULL_ROW_BF16)


def test_a_configured_max_running_must_fit_the_budget_and_the_cap_holds():
    assert _rows(IceCacheConfig(policy="full"), 4 * FULL_ROW_BF16, max_running=3) == 3
    with pytest.raises(ValueError, match="max_running=5: more rows than device_kv_bytes"):
        _rows(IceCacheConfig(policy="full"), 4 * FULL_ROW_BF16, max_running=5)
    cost = policy_row_cost(IceCacheConfig(policy="full"), 30, 0, 3, 64, 2, CTX)
    assert budget_rows(cost, 1000 * FULL_ROW_BF16, CTX, cap=63) == 63


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_engine_config_refuses_a_bad_budget(value):
    with pytest.raises(ValueError, match=f"EngineConfig.device_kv_bytes={value!r}"):
        EngineConfig(device_kv_bytes=value)


def test_quest_on_the_device_costs_what_its_layers_allocate():
    """Quest with the device selector keeps every sparse layer's middle K/V and page bounds on the
    device (as the Quest paper does): its row cost counts them, and an engine allocates exactly that."""
    from icecache_ray.engine.local import LocalEngine
    from icecache_ray.engine.sizing import quest_device_bytes
    from transformers import LlamaForCausalLM

    tiny = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048)
    ice = IceCacheConfig(policy="quest", budget=64)
    with LocalEngine(LlamaForCausalLM(tiny).eval(), ice, EngineConfig(max_running=3, max_seq_len=1000)) as eng:
        allocated = sum(layer.device_quest.nbytes() for layer in eng.runner.sparse)
    assert allocated == 3 * quest_device_bytes(1000, 16, 2, 16, 4, 2)
    host = policy_row_cost(ice.with_(selector="host"), 30, 28, 3, 64, 2, CTX)
    device = policy_row_cost(ice, 30, 28, 3, 64, 2, CTX)
    assert device.host == 0 and host.host > 0
    assert device.device - host.device == quest_device_bytes(CTX, 16, 3, 64, 2, 28)


@pytest.mark.parametrize("ice", [IceCacheConfig(budget=256, selector="host"), IceCacheConfig(policy="oracle", budget=256),
                                 IceCacheConfig(policy="streaming", budget=256), IceCacheConfig(policy="quest", budget=256, selector="host")],
                         ids=["icecache-host", "oracle", "streaming", "quest-host"])
def test_only_the_device_selector_pays_for_a_summary_table(ice):
    """A configuration whose layers allocate no device page summary is not charged one."""
    from icecache_ray.engine.local import LocalEngine
    from transformers import LlamaForCausalLM

    tiny = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048)
    with LocalEngine(LlamaForCausalLM(tiny).eval(), ice.with_(budget=64), EngineConfig(max_running=2, max_seq_len=1000)) as eng:
        assert all(layer.device_pages is None for layer in eng.runner.sparse)
    cost = policy_row_cost(ice, 30, 28, 3, 64, 2, CTX)
    resident = ice.sink_tokens + ice.retrieved_pages * ice.page_size + (ice.window_pages + 1) * ice.page_size
    assert cost.device == 2 * 3 * 64 * 2 * (2 * CTX + 28 * resident)
