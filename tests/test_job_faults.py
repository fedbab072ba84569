"""The Ray Data job (``--engine ray``) under faults, on loopback Ray with the tiny model: the
driver killed and re-run, an engine replica killed mid-run, a worker node removed mid-job. In
each, every document ends up exactly once in the output (a summary, or an error saying why)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.summarize import main
from test_jobs import _args, _doc, _jsonl

ray = pytest.importorskip("ray")
pytest.importorskip("pandas")  # ray[data]

NODE = {"num_cpus": 2, "object_store_memory": 80 * 1024**2, "node_ip_address": "127.0.0.1"}
DOCS = 16


def _ray_args(model_dir, src, out, new_tokens=120, *extra):
    args = _args(model_dir, [src], out, "--batch-size", "2", "--part-rows", "1", "--max-running", "4", *extra)
    args[args.index("--engine") + 1] = "ray"
    args[args.index("--max-new-tokens") + 1] = str(new_tokens)
    return args


def _source(tmp_path):
    return _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i, 60)} for i in range(DOCS)])


def _wait_for_parts(out, n=1, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < n:
        time.sleep(0.05)
    assert len(list(out.glob("part-*.parquet"))) >= n, "the job wrote no part in time"


def _accounted(out):
    """(ids with a summary, ids with an error) over every run into ``out``."""
    ok = OutputDir(out).read_all()["id"].to_pylist()
    path = out / "errors.jsonl"
    failed = [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []
    return ok, failed


def _run_in_thread(args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", main(args)), daemon=True)
    thread.start()
    return thread, result


def _engine_actor_pids():
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if "IceCacheEngineStage" in a["ActorClassName"] and a["State"] == "ALIVE" and a.get("Pid")]


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(**NODE) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.mark.timeout(400)
def test_driver_killed_mid_run_then_rerun_completes_each_document_once(never_eos_model_dir, tmp_path):
    src, out = _source(tmp_path), tmp_path / "out"
    args = _ray_args(never_eos_model_dir, src, out, 120, "--replicas", "1")
    # its own local Ray, in its own process group: SIGKILL of that group is "the job's machine died"
    proc = subprocess.Popen([sys.executable, "-m", "icecache_ray.jobs.summarize", *args], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_parts(out)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first, _ = _accounted(out)
    assert 1 <= len(first) < DOCS
    if ray.is_initialized():
        ray.shutdown()
    assert main(args + ["--replicas", "1"]) == 0
    ok, failed = _accounted(out)
    assert sorted(ok) == sorted(f"d{i}" for i in range(DOCS)) and not failed  # each exactly once
    info = json.loads((out / "run.json").read_text())
    assert info["skipped_done"] == len(first) and info["ok"] == DOCS - len(first) and info["data"] == "ray.data"
    ray.shutdown()


@pytest.mark.timeout(400)
def test_replica_killed_mid_run_its_documents_are_retried_and_the_job_finishes(two_node_cluster, never_eos_model_dir, tmp_path):
    src, out = _source(tmp_path), tmp_path / "out"
    thread, result = _run_in_thread(_ray_args(never_eos_model_dir, src, out, 120, "--replicas", "2"))
    _wait_for_parts(out)
    pids = _engine_actor_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    assert len(_accounted(out)[0]) < DOCS  # killed with documents still to do
    thread.join(timeout=300)
    assert result.get("code") == 0
    ok, failed = _accounted(out)
    assert sorted(ok) == sorted(f"d{i}" for i in range(DOCS)) and not failed  # retried once, each exactly once


@pytest.mark.timeout(400)
def test_worker_node_removed_mid_job_every_document_accounted_for_once(two_node_cluster, never_eos_model_dir, tmp_path):
    cluster, workers = two_node_cluster
    src, out = _source(tmp_path), tmp_path / "out"
    thread, result = _run_in_thread(_ray_args(never_eos_model_dir, src, out, 120, "--replicas", "2"))
    _wait_for_parts(out)
    from ray._private import state

    ledgers = [a for a in state.actors().values() if a["ActorClassName"] == "Attempts" and a["State"] == "ALIVE"]
    assert [a["Address"]["NodeID"] for a in ledgers] == [ray.get_runtime_context().get_node_id()]  # on the driver's node
    cluster.remove_node(workers[0])
    assert len(_accounted(out)[0]) < DOCS  # removed with documents still to do
    thread.join(timeout=300)
    assert result.get("code") in (0, 3)  # 3: some documents recorded as errors (after their retry)
    ok, failed = _accounted(out)
    assert sorted(ok + failed) == sorted(f"d{i}" for i in range(DOCS))  # none lost, none duplicated
