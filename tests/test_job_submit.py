"""`ray job submit` of the summarization job against a local head (loopback). Slow: starts a Ray
head with its dashboard (the job server) and uploads the working directory; its teardown runs
`ray stop --force`, which stops every Ray process of this user, so run it alone (`make test-slow`)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _ray(*args, env, timeout=120):
    return subprocess.run([RAY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_job(tiny_model_dir, tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_NODE_IP_ADDRESS="127.0.0.1",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    # Ray's socket paths must fit in 107 bytes; pytest's tmp_path plus Ray's session name can exceed it
    temp = Path(tempfile.mkdtemp(prefix="icr-ray-"))
    start = _ray("start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--port=0",
                 "--dashboard-port=8299", "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true",
                 "--disable-usage-stats", env=env)
    assert start.returncode == 0, start.stderr
    try:
        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps({"id": f"d{i}", "text": "the quick brown fox " * 30}) + "\n" for i in range(2)))
        out = tmp_path / "out"
        job = _ray("job", "submit", "--address", "http://127.0.0.1:8299", "--working-dir", ".", "--",
                   sys.executable, "-m", "icecache_ray.jobs.summarize", "--input", str(docs), "--output", str(out),
                   "--model", str(tiny_model_dir), "--budget", "64", "--max-new-tokens", "4", "--threads", "1",
                   env=env, timeout=480)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "2 of 2 documents done, 0 failed" in job.stdout + job.stderr  # progress in the job log
        info = json.loads((out / "run.json").read_text())
        assert info["engine"] == "ray" and info["ok"] == 2
    finally:
        _ray("stop", "--force", env=env)
        time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)
