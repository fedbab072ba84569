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
from icecache_ray.runtime.deployment import Deployment, RequestFailed  # noqa: E402
from icecache_ray.serving_config import DeploymentConfig, EngineConfig  # noqa: E402

NODE = {"num_cpus": 2, "resources": {"icecache_node": 1}, "object_store_memory": 80 * 1024**2}
ICE = IceCacheConfig(budget=64, n_full_layers=1)
EOS = 1  # "<|im_end|>" of the tiny tokenizer; these prompts never make the tiny model produce it


def _dep(max_running=4, pool_pages=None, **extra) -> DeploymentConfig:
    base = dict(stages=2, worker_num_cpus=0.5, index_num_cpus=0.0, worker_resources={"icecache_node": 1}, call_timeout_s=120,
                engine=EngineConfig(max_running=max_running, max_step_tokens=256, max_seq_len=512, pool_pages=pool_pages))
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
        nodes = [st["info"]["node_id"] for st in dep.replicas[0].stages]
        assert len(set(nodes)) == 2, "the stages must live on different nodes"
        assert _generate(dep, prompts) == reference
        stats = dep.stats()
        assert [s["layers"] for s in stats["replicas"][0]["stages"]] == [[0, 2], [2, 4]]
        assert dep.runtime_shape() == {"engine": "ray", "replicas": 1, "stages": 2, "stage_workers": 2, "index_actors": 2,
                                       "max_running": 4}
    assert not list_leaked_segments(f"icr_{dep.id}")


def test_two_replicas_share_the_work_and_a_stream_joins_mid_flight(cluster, tiny_model_dir, prompts, reference):
    with Deployment(_dep(stages=1, replicas=2, max_running=2), ICE, tiny_model_dir) as dep:
        ids = dep.submit(prompts[:3], 16, eos_token_id=EOS)
        assert sorted(dep.requests[i][1] for i in ids) == [0, 0, 1]  # least-loaded routing
        for _ in range(4):
            dep.step()
        assert all(len(dep.poll(i)["tokens"]) > 0 for i in ids[:2])
        streamed = list(dep.stream(prompts[3], 16, eos_token_id=EOS))  # joins while the others decode
        assert streamed == reference[3]
        dep._drive(ids)
        assert [dep.result(i).token_ids for i in ids] == reference[:3]


def test_killing_an_index_actor_mid_generation_keeps_the_tokens(cluster, tiny_model_dir, prompts, reference):
    with Deployment(_dep(), ICE, tiny_model_dir) as dep:
        tokens = []
        for token in dep.stream(prompts[2], 16, eos_token_id=EOS):
            tokens.append(token)
            if len(tokens) == 2:
                # the 380-token prompt's decode crosses a page at position 384 (the 5th step): its
                # window page goes to the index then, the first call after the kill (with the device
                # selector no call happens in between); the sleep lets the kill land before it
                ray.kill(dep.replicas[0].stages[1]["index"][0], no_restart=False)
                time.sleep(2)
        assert tokens == reference[2]
        assert dep.stats()["replicas"][0]["stages"][1]["worker"]["index_recoveries"] == 1
    assert not list_leaked_segments(f"icr_{dep.id}")


def test_killing_a_stage_worker_fails_its_replica_quickly_while_the_other_finishes(cluster, tiny_model_dir, prompts, reference):
    with Deployment(_dep(stages=1, replicas=2, max_running=2), ICE, tiny_model_dir) as dep:
        ids = dep.submit(prompts, 16, eos_token_id=EOS)
        dep.step()
        ray.kill(dep.replicas[0].stages[0]["worker"])
        t0 = time.monotonic()
        dep._drive(ids)
        assert time.monotonic() - t0 < 30
        for rid, want in zip(ids, reference):
            seq, replica = dep.requests[rid]
            if replica == 0:
                assert seq.error.startswith("replica 0 failed: ") and "Actor" in seq.error
            else:
                assert seq.output == want
        with pytest.raises(RequestFailed, match="replica 0 failed"):
            dep._collect(ids)
        assert [r.token_ids for r in dep.generate(prompts[:1], 16, eos_token_id=EOS)] == reference[:1]  # the live replica


def test_a_full_pool_makes_requests_wait_and_one_that_never_fits_is_refused(cluster, tiny_model_dir, prompts, reference):
    # stage 1 holds 2 sparse layers, one per index actor; per sequence and actor the worst case is
    # ceil((n + 16) / 16) * 2 heads * 1.25 pages: 45 (260 tokens) + 25 (140) fill 70 pages, so the
    # third (380 tokens, 63 pages) waits until one of them is done.
    engine = EngineConfig(max_running=4, max_step_tokens=1024, max_seq_len=512, pool_pages=70)
    with Deployment(_dep(index_actors_per_stage=2, engine=engine), ICE, tiny_model_dir) as dep:
        ids = dep.submit(prompts[:3], 16, eos_token_id=EOS)
        dep.step()
        sched = dep.replicas[0].engine.scheduler
        assert len(sched.running) == 2 and [s.seq_id for s in sched.waiting] == ids[2:], "the third waits for host pages"
        dep._drive(ids)
        assert [dep.result(i).token_ids for i in ids] == reference[:3]
        with pytest.raises(ValueError, match="prompt 0: needs 78 host pages on index service .* holds 70"):
            dep.submit([prompts[2] + prompts[3][:90]], 16, eos_token_id=EOS)
        with pytest.raises(ValueError, match="prompt 0: .*exceed the 512 tokens a row holds"):
            dep.submit([prompts[2] * 2], 16, eos_token_id=EOS)


def test_bad_deployment_input_fails_before_any_actor(cluster, tiny_model_dir):
    with pytest.raises(ValueError, match="stages=9"):
        Deployment(_dep(stages=9), ICE, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Deployment(_dep(), ICE, "/tmp/no-such-model")
    with pytest.raises(ValueError, match="EngineConfig.max_step_tokens=4"):
        _dep(engine=EngineConfig(max_running=8, max_step_tokens=4))
    with Deployment(_dep(stages=1, index_actors_per_stage=0), ICE, tiny_model_dir) as dep:
        with pytest.raises(ValueError, match="prompt 1: .*empty"):
            dep.generate([[5, 6, 7], []], 4)
        with pytest.raises(ValueError, match="prompt 0: token 1 is 9999"):
            dep.generate([[5, 9999]], 4)


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
