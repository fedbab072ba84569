"""Pipeline stages in one process (runners chained in one engine), deployment settings (no Ray)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.engine import Engine, LocalStage
from icecache_ray.engine.generate import generate_batch
from icecache_ray.engine.index_service import IndexService
from icecache_ray.engine.runner import ModelRunner, keep_only_layers
from icecache_ray.engine.scheduler import Scheduler
from icecache_ray.engine.sequence import Sequence
from icecache_ray.engine.stores import InProcessTransport, ServiceClient
from icecache_ray.runtime.placement import stage_ranges
from icecache_ray.serving_config import DeploymentConfig, EngineConfig

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)


def _model(kind="llama"):
    torch.manual_seed(0)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=24)).eval()
    return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()


def _pipeline_tokens(model, prompts, cfg, stages, max_new, eos):
    """Greedy tokens of one engine whose stages are runners over layer ranges of model copies,
    each with its own in-process index service (what a Ray replica does, without Ray)."""
    ranges = stage_ranges(model.config.num_hidden_layers, stages, cfg.n_full_layers, cfg.layer_reuse)
    parts, runners = [], []
    try:
        for r in ranges:
            part = copy.deepcopy(model)
            keep_only_layers(part, r)
            service = IndexService(cfg, part.config.head_dim or 16, 4096)
            transport = InProcessTransport(service)
            client = ServiceClient(transport)
            parts.append((service, transport, client))
            runners.append(ModelRunner(part, cfg, r, 3, 1024, [client]))
        engine = Engine([LocalStage(r) for r in runners], Scheduler(3, 128, 1024))
        seqs = [engine.add(Sequence(p, max_new, eos)) for p in prompts]
        engine.run()
        return [s.output for s in seqs]
    finally:
        for runner in runners:
            runner.close()
        for service, transport, client in parts:
            client.close()
            transport.close()
            service.close()


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
    with pytest.raises(ValueError, match="layer_range|layers=range"):
        ModelRunner(_model(), IceCacheConfig(n_full_layers=1, layer_reuse=2), range(2, 6), 1, 64, [object()])


def test_runner_rejects_a_bad_layer_range():
    with pytest.raises(ValueError, match="layers=range"):
        ModelRunner(_model(), IceCacheConfig(policy="full"), range(4, 9), 1, 64)


@pytest.mark.parametrize("field,value", [("replicas", 0), ("stages", -1), ("index_actors_per_stage", -2),
                                         ("worker_num_gpus", -1.0), ("worker_resources", {"x": 0}),
                                         ("call_timeout_s", 0), ("threads", 1.5), ("engine", {"max_running": 2})])
def test_deployment_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"DeploymentConfig.{field}="):
        DeploymentConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("max_running", 0), ("max_step_tokens", -1), ("max_seq_len", 1.5),
                                         ("pool_pages", 0), ("select_threads", 0), ("memory_fraction", 1.5)])
def test_engine_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}="):
        EngineConfig(**{field: value})


def test_stage_bundle_holds_the_worker_and_its_index_actors():
    dep = DeploymentConfig(worker_num_cpus=1, index_actors_per_stage=2, index_num_cpus=0.5, worker_num_gpus=1,
                           worker_resources={"icecache_worker": 1})
    assert dep.stage_bundle() == {"CPU": 2.0, "GPU": 1.0, "icecache_worker": 1.0}
