"""Pipeline stages in one process, deployment settings and admission control (no Ray)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.cache import IceCache
from icecache_ray.engine.generate import generate_batch
from icecache_ray.runtime.admission import DeploymentConfig, PoolBudget, group_pages
from icecache_ray.runtime.stage import GreedyBatch, StageModel, stage_ranges

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)


def _model(kind="llama"):
    torch.manual_seed(0)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=24)).eval()
    return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()


def _pipeline_tokens(model, prompts, cfg, stages, max_new, eos):
    """Greedy tokens through ``stages`` StageModels (each on its own copy of the model)."""
    ranges = stage_ranges(model.config.num_hidden_layers, stages, cfg.n_full_layers, cfg.layer_reuse)
    parts = [StageModel(copy.deepcopy(model), r) for r in ranges]
    caches = [IceCache(p.model, cfg, layer_range=r) for p, r in zip(parts, ranges)]
    batch = GreedyBatch(prompts, max_new, eos, eos if eos is not None else 0)
    try:
        x, mask, pos = batch.prefill_inputs()
        while True:
            for part, cache in zip(parts, caches):
                x = part.forward(cache, x, mask, pos)
            batch.advance(x.argmax(-1))
            if batch.done:
                return batch.results()
            x, mask, pos = batch.step_inputs()
    finally:
        for c in caches:
            c.close()


@pytest.mark.parametrize("kind,stages,reuse", [("llama", 2, 1), ("llama", 3, 2), ("qwen3", 2, 1)])
def test_pipeline_stages_give_the_single_process_tokens(kind, stages, reuse):
    model = _model(kind)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (300, 170, 410)]
    cfg = IceCacheConfig(budget=64, n_full_layers=1, layer_reuse=reuse)
    want = [r.token_ids for r in generate_batch(model, prompts, cfg, 24, eos_token_id=7)]
    assert _pipeline_tokens(model, prompts, cfg, stages, 24, eos=7) == want


def test_stage_ranges_cover_the_model_and_keep_reuse_runs_whole():
    assert stage_ranges(30, 2) == [range(0, 15), range(15, 30)]
    ranges = stage_ranges(30, 4, n_full_layers=2, layer_reuse=2)
    assert [r.start for r in ranges] == [0, 8, 14, 22] and ranges[-1].stop == 30
    assert all((r.start - 2) % 2 == 0 for r in ranges[1:])
    with pytest.raises(ValueError, match="stages=7"):
        stage_ranges(6, 7)


def test_a_stage_starting_inside_a_reuse_run_is_rejected():
    with pytest.raises(ValueError, match="layer_range"):
        IceCache(_model(), IceCacheConfig(n_full_layers=1, layer_reuse=2), layer_range=range(2, 6))


def test_stage_model_rejects_a_bad_layer_range():
    with pytest.raises(ValueError, match="layers=range"):
        StageModel(_model(), range(4, 9))


@pytest.mark.parametrize("field,value", [("replicas", 0), ("stages", -1), ("index_actors_per_stage", -2),
                                         ("worker_num_gpus", -1.0), ("worker_resources", {"x": 0}),
                                         ("call_timeout_s", 0), ("threads", 1.5), ("max_batch", 0)])
def test_deployment_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"DeploymentConfig.{field}="):
        DeploymentConfig(**{field: value})


def test_stage_bundle_holds_the_worker_and_its_index_actors():
    dep = DeploymentConfig(worker_num_cpus=1, index_actors_per_stage=2, index_num_cpus=0.5, worker_num_gpus=1,
                           worker_resources={"icecache_worker": 1})
    assert dep.stage_bundle() == {"CPU": 2.0, "GPU": 1.0, "icecache_worker": 1.0}


def test_pool_budget_admits_waits_and_frees():
    need = group_pages([1000, 500], 100, sparse_layers=4, kv_heads=3, page_size=16)
    assert need == -(-((69 + 38) * 3 * 4 * 1.25) // 1)
    budget = PoolBudget({(0, 0, 0): 1000})
    first = {(0, 0, 0): 600}
    assert budget.fits(first)
    budget.reserve("a", first)
    assert not budget.fits(first) and budget.fits(first, empty=True)
    assert not budget.fits({(0, 0, 0): 1001}, empty=True)
    budget.release("a")
    assert budget.fits(first)
