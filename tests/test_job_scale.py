"""Scale of the Ray Data job (slow; run once and record in docs/operations.md "Scale"): 200 and then 2,000 small
documents through ``--engine ray`` on a simulated 2-node cluster (``ray.cluster_utils.Cluster``,
loopback). Every document is accounted for exactly once, and the driver's peak RSS (its own
``run.json``, measured in the driver process) stays flat: the 2,000-document run within 20 % of
the 200-document one. Prints one JSON line with both runs (``pytest -s``)."""

import json
import os
import subprocess
import sys
import time

import pytest

from icecache_ray.jobs.outputs import OutputDir
from test_jobs import _doc

ray = pytest.importorskip("ray")
pytest.importorskip("pandas")  # ray[data]

FILES = 4


def _inputs(folder, n):
    folder.mkdir()
    for f in range(FILES):
        with (folder / f"docs-{f}.jsonl").open("w") as fh:
            for i in range(f, n, FILES):
                fh.write(json.dumps({"id": f"d{i}", "text": _doc(i, 40)}) + "\n")
    return folder


def _job(model_dir, src, out, address):
    args = ["--input", str(src), "--output", str(out), "--model", str(model_dir), "--engine", "ray", "--address", address,
            "--budget", "64", "--max-new-tokens", "8", "--threads", "1", "--replicas", "2", "--max-running", "16",
            "--batch-size", "8"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "icecache_ray.jobs.summarize", *args], capture_output=True, text=True,
                          timeout=1500, env=dict(os.environ, RAY_ADDRESS=address))
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    return info, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_2000_documents_on_two_nodes_all_accounted_for_with_flat_driver_memory(never_eos_model_dir, tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    node = {"num_cpus": 2, "object_store_memory": 200 * 1024**2, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        runs = {}
        for n in (200, 2000):
            out = tmp_path / f"out-{n}"
            info, wall = _job(never_eos_model_dir, _inputs(tmp_path / f"in-{n}", n), out, cluster.address)
            ids = OutputDir(out).read_all()["id"].to_pylist()
            assert sorted(ids) == sorted(f"d{i}" for i in range(n)) and info["ok"] == n and info["failed"] == 0
            runs[n] = {"documents": n, "driver_peak_rss_mib": round(info["driver_peak_rss_mib"], 1), "job_wall_s": round(wall, 1),
                       "generated_tokens": info["generated_tokens"], "parts": len(list(out.glob("part-*.parquet")))}
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "nodes": 3, "runs": list(runs.values()),
                          "rss_ratio_2000_vs_200": round(runs[2000]["driver_peak_rss_mib"] / runs[200]["driver_peak_rss_mib"], 3)}))
        assert runs[2000]["driver_peak_rss_mib"] <= 1.2 * runs[200]["driver_peak_rss_mib"]
    finally:
        cluster.shutdown()
