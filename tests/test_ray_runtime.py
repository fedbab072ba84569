"""The Ray runtime on simulated nodes (``ray.cluster_utils.Cluster``, loopback only): a 2-stage
pipeline across 2 nodes, 2 replicas in parallel, index-actor and worker deaths, admission
control, and a clean shutdown of a deployment that started its own Ray."""

import os
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from icecache_ray.config import IceCacheConfig  # noqa: E402
from icecache_ray.engine.generate import generate_batch  # noqa: E402
from icecache_ray.model import load_model  # noqa: E402
from icecache_ray.pool import list_leaked_segments  # noqa: E402
from icecache_ray.runtime.admission import DeploymentConfig  # noqa: E402
from icecache_ray.runtime.deployment import Deployment, RequestFailed  # noqa: E402

NODE = {"num_cpus": 2, "resources": {"icecache_node": 1}, "object_store_memory": 80 * 1024**2}
ICE = IceCacheConfig(budget=64, n_full_layers=1)
EOS = 1  # "<|im_end|>" of the tiny tokenizer; these prompts never make the tiny model produce it


def _dep(**extra) -> DeploymentConfig:
    base = dict(stages=2, worker_num_cpus=0.5, index_num_cpus=0.0, worker_resources={"icecache_node": 1},
                pool_pages_per_node=2048, call_timeout_s=120)
    return DeploymentConfig(**{**base, **extra})


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={**NODE, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    c.add_node(**NODE, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (260, 140, 380, 200)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    """Greedy tokens of the single-process engine, same config."""
    model, _ = load_model(tiny_model_dir)
    want = [r.token_ids for r in generate_batch(model, prompts, ICE, 16, eos_token_id=EOS)]
    assert all(len(t) == 16 for t in want)
    return want


def _generate(dep, prompts):
    return [r.token_ids for r in dep.generate(prompts, 16, eos_token_id=EOS)]


def test_two_stage_pipeline_across_two_nodes_equals_single_process(cluster, tiny_model_dir, prompts, reference):
    with Deployment(_dep(), ICE, tiny_model_dir) as dep:
        nodes = [st["info"]["node_id"] for st in dep.replicas[0]["stages"]]
        assert len(set(nodes)) == 2, "the stages must live on different nodes"
        assert _generate(dep, prompts) == reference
        stats = dep.stats()
        assert [s["layers"] for s in stats["replicas"][0]["stages"]] == [[0, 2], [2, 4]]
    assert not list_leaked_segments(f"icr_{dep.id}")


def test_two_replicas_serve_one_batch_concurrently(cluster, tiny_model_dir, prompts, reference):
    with Deployment(_dep(stages=1, replicas=2, max_batch=2), ICE, tiny_model_dir) as dep:
        gids = dep.submit(prompts, 16, eos_token_id=EOS)
        dep._round()  # one round admits both groups and prefills them
        assert sorted(dep.groups[g].replica for g in gids) == [0, 1]
        while not all(dep.groups[g].finished for g in gids):
            dep._round()
        assert [t for g in gids for t in dep.groups[g].batch.results()] == reference
        dep.groups.clear()


def test_killing_an_index_actor_mid_generation_keeps_the_tokens(cluster, tiny_model_dir, prompts, reference):
    with Deployment(_dep(), ICE, tiny_model_dir) as dep:
        tokens = []
        for token in dep.stream(prompts[2], 16, eos_token_id=EOS):
            tokens.append(token)
            if len(tokens) == 5:
                ray.kill(dep.replicas[0]["stages"][1]["index"][0], no_restart=False)
        assert tokens == reference[2]
        assert dep.stats()["replicas"][0]["stages"][1]["worker"]["index_recoveries"] == 1
    assert not list_leaked_segments(f"icr_{dep.id}")


def test_killing_a_worker_fails_its_requests_quickly(cluster, tiny_model_dir, prompts):
    with Deployment(_dep(), ICE, tiny_model_dir) as dep:
        dep.generate(prompts[:1], 4, eos_token_id=EOS)
        ray.kill(dep.replicas[0]["stages"][1]["worker"])
        t0 = time.monotonic()
        with pytest.raises(RequestFailed, match="replica 0 failed: .*Actor"):
            dep.generate(prompts[:2], 16, eos_token_id=EOS)
        assert time.monotonic() - t0 < 30
        with pytest.raises(RequestFailed, match="no live replica"):
            dep.generate(prompts[:1], 4, eos_token_id=EOS)


def test_admission_control_queues_or_rejects(cluster, tiny_model_dir, prompts, reference):
    # 1 sparse layer per index actor on stage 1 (2 layers, 2 actors): one prompt of ~260 tokens
    # needs ceil(276 / 16) * 2 heads * 1.25 = 45 pages; give each actor 96 pages.
    with Deployment(_dep(index_actors_per_stage=2, pool_pages_per_node=192, max_batch=1), ICE, tiny_model_dir) as dep:
        gids = dep.submit(prompts[:2], 16, eos_token_id=EOS)
        dep._round()
        assert len(dep.waiting) == 0
        gids += dep.submit(prompts[2:3], 16, eos_token_id=EOS)
        dep._round()
        assert [g.gid for g in dep.waiting] == [gids[2]], "the third group waits for pages"
        while not all(dep.groups[g].finished for g in gids):
            dep._round()
        assert [dep.groups[g].batch.results()[0] for g in gids] == reference[:3]
        dep.groups.clear()
        with pytest.raises(RequestFailed, match="host pages on one index actor"):
            dep.generate([prompts[2] * 2], 16, eos_token_id=EOS)


def test_bad_deployment_input_fails_before_any_actor(cluster, tiny_model_dir):
    with pytest.raises(ValueError, match="stages=9"):
        Deployment(_dep(stages=9), ICE, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Deployment(_dep(), ICE, "/tmp/no-such-model")
    with Deployment(_dep(stages=1, index_actors_per_stage=0), ICE, tiny_model_dir) as dep:
        with pytest.raises(ValueError, match="prompt 1: .*empty"):
            dep.generate([[5, 6, 7], []], 4)


def test_shutdown_leaves_no_ray_process_or_segment(tiny_model_dir, cluster):
    """A deployment that starts its own local Ray: nothing of it survives ``shutdown``."""
    psutil = pytest.importorskip("psutil")
    ray.shutdown()  # leave the simulated cluster (its nodes are stopped by the fixture)
    before = {p.pid for p in psutil.process_iter()}
    dep = Deployment(_dep(stages=1, worker_resources={}), ICE, tiny_model_dir)
    dep.generate([[5, 6, 7, 8] * 40], 4, eos_token_id=EOS)
    ours = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert ours, "the deployment should have started Ray processes"
    dep.shutdown()
    gone, alive = psutil.wait_procs(ours, timeout=20)
    assert not alive, [p.info for p in alive] if alive else None
    assert not ray.is_initialized()
    assert not list_leaked_segments(f"icr_{dep.id}")
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
