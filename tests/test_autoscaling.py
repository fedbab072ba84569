"""Autoscaling of the node types in ``cluster.yaml``, simulated on this machine.

Ray's fake multi-node provider (``ray.cluster_utils.AutoscalingCluster``) runs the real autoscaler
and starts every "node" as a set of local Ray processes. The worker node types mirror
``cluster.yaml`` (same names, same custom resources, min/max workers capped at 2) with 1 CPU each
and the GPU replaced by the custom resource, so the test needs no GPU:

* no demand -> the head is alone;
* actors asking for ``icecache_worker`` (GPU engine actors) and ``icecache_cpu_worker`` (CPU engine actors)
  -> the autoscaler adds one node of the matching type per actor;
* actors killed -> after ``idle_timeout_minutes`` the worker nodes are removed.

``AutoscalingCluster`` as shipped is not usable here unchanged: its ``start``/``shutdown`` run
``ray stop --force`` (which kills *every* Ray process on the machine, other users' included), it
reads ``fake_multi_node/example.yaml``, which the PyPI wheel does not contain, and it uses fixed
ports (6379, 8265, 10001, 52365). :class:`LoopbackAutoscalingCluster` keeps its interface and
provider but binds everything to 127.0.0.1 on free ports with a private temp dir, and shuts down
only the processes it started (its own process group and their children), by pid. It also
starts the cluster with the driver's token-auth mode (Ray 2.60 ``ray start`` enables token auth
on its own when ``~/.ray/auth_token`` exists, a driver given an explicit address does not).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
import yaml

import ray
import ray._private.services
from ray.cluster_utils import AutoscalingCluster

log = logging.getLogger(__name__)

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
LOOPBACK = "127.0.0.1"
LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # per simulated node; Ray's minimum is ~75 MB
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}

# Keys of upstream's fake_multi_node/example.yaml that are not node types (the wheel lacks the file).
_FAKE_BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class LoopbackAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` on 127.0.0.1 with private ports and temp dir and a scoped shutdown."""

    def __init__(self, head_resources: dict, worker_node_types: dict, **config_kwargs: Any) -> None:
        self.port = _free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="ray_icas_", dir="/tmp")  # short: socket paths
        self._pgid: int | None = None
        super().__init__(head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = json.loads(json.dumps(_FAKE_BASE_CONFIG))
        config["provider"]["gcs_address"] = self.address  # worker nodes join our GCS, not :6379
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {
            "resources": dict(head_resources),
            "node_config": {},
            "max_workers": 0,
        }
        config["head_node_type"] = "ray.head.default"
        config.update(config_kwargs)
        return config

    def start(self, _system_config: dict | None = None, override_env: dict | None = None) -> None:
        """Start the head (``ray start --head``) in a new process group; the autoscaler in it
        launches and removes the worker "nodes" as local processes of that group."""
        config_path = os.path.join(self.temp_dir, "autoscaling_config.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(self._config, f)
        head = dict(self._head_resources)
        cmd = [
            str(Path(sys.executable).with_name("ray")), "start", "--head",
            f"--port={self.port}",
            f"--node-ip-address={LOOPBACK}",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config_path}",
            "--include-dashboard=false",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--disable-usage-stats",
            f"--num-cpus={head.pop('CPU', 0)}",
            f"--num-gpus={head.pop('GPU', 0)}",
            f"--object-store-memory={head.pop('object_store_memory', OBJECT_STORE_BYTES)}",
        ]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = dict(os.environ)
        env.update(
            {
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps 127.0.0.1 (see README)
                "RAY_NODE_IP_ADDRESS": LOOPBACK,
                "RAY_USAGE_STATS_ENABLED": "0",  # no report to the internet
                "RAY_FAKE_CLUSTER": "1",  # required by the fake provider
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                # `ray start` turns token auth on by itself when ~/.ray/auth_token exists (any
                # local ray.init() creates it), but a driver given an explicit address uses a
                # token only when its own RAY_AUTH_MODE says so: give the cluster the driver's mode.
                "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            }
        )
        env.update(override_env or {})
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._pgid = proc.pid  # a new session's leader: its pid is the process group id
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
        ray._private.services.find_gcs_addresses.cache_clear()

    def _our_processes(self) -> list[psutil.Process]:
        """Every live process of our process group, plus all their descendants (Ray workers
        move to process groups of their own but stay children of their raylet)."""
        if self._pgid is None:
            return []
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and os.getpgid(proc.pid) == self._pgid:
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
            except (psutil.Error, ProcessLookupError):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def listening_addresses(self) -> set[str]:
        """Local IPs on which any of our processes listens (TCP) right now."""
        ips = set()
        for proc in self._our_processes():
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.Error:
                continue
            ips.update(c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN)
        return ips

    def shutdown(self, grace_s: float = 3.0) -> None:
        """SIGTERM our processes, SIGKILL what is left after ``grace_s``; remove the temp dir."""
        procs = self._our_processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive + self._our_processes():  # late children of dying raylets too
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace_s)
        ray._private.services.find_gcs_addresses.cache_clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _mirrored_node_types() -> tuple[dict, dict]:
    """Head resources and worker node types shaped like cluster.yaml's, scaled down."""
    config = yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))
    head_name = config["head_node_type"]
    workers = {}
    for name, spec in config["available_node_types"].items():
        if name == head_name:
            continue
        custom = {k: v for k, v in spec["resources"].items() if k not in _BUILTIN_RESOURCES}
        assert custom, f"{name}: a worker type needs a custom resource the actors can request"
        workers[name] = {
            "resources": {"CPU": 1, **custom, "object_store_memory": OBJECT_STORE_BYTES},
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": min(spec["max_workers"], 2),
        }
    head = {"CPU": 1, "GPU": 0, "object_store_memory": OBJECT_STORE_BYTES}
    return head, workers


def _alive_workers(resource: str | None = None) -> list[dict]:
    nodes = [n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]]
    return [n for n in nodes if resource is None or resource in n["Resources"]]


class Timeline:
    """Worker-node counts over time (seconds since the cluster was up), recorded on change."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str, int]] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def record(self, phase: str) -> int:
        n = len(_alive_workers())
        if not self.events or self.events[-1][1:] != (phase, n):
            self.events.append((self.now(), phase, n))
        return n

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, phase: str) -> float:
        """Poll ``predicate`` every 0.25 s, recording the worker count; return the seconds taken."""
        t0 = time.monotonic()
        while True:
            self.record(phase)
            if predicate():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"{phase}: timed out after {timeout_s} s; timeline {self.events}")
            time.sleep(0.25)


@pytest.fixture
def cluster():
    head, workers = _mirrored_node_types()
    assert all(w["min_workers"] == 0 for w in workers.values()), "test assumes no idle minimum"
    c = LoopbackAutoscalingCluster(
        head_resources=head, worker_node_types=workers, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES
    )
    try:
        c.start()
        ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@ray.remote(num_cpus=0, resources={"icecache_worker": 1})
class FakeEngineActor:
    """Stands in for a GPU engine actor: asks for the GPU node type's custom resource."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0, resources={"icecache_cpu_worker": 1})
class FakeCpuEngineActor:
    """Stands in for a CPU engine actor: asks for the CPU node type's custom resource."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@pytest.mark.timeout(300)
def test_scale_up_on_demand_and_down_when_idle(cluster: LoopbackAutoscalingCluster) -> None:
    timeline = Timeline()
    idle_timeout_s = IDLE_TIMEOUT_MINUTES * 60

    # 1. No demand: the head stays alone for several autoscaler rounds (1 s each here).
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        assert timeline.record("no demand") == 0, "a worker node started without demand"
        time.sleep(0.25)
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == [LOOPBACK]

    # 2. Demand: two GPU engine actors and one CPU engine actor -> 2 gpu_worker nodes + 1 cpu_worker node.
    t_demand = time.monotonic()
    engines = [FakeEngineActor.remote() for _ in range(2)]
    index = FakeCpuEngineActor.remote()
    timeline.wait_for(
        lambda: len(_alive_workers("icecache_worker")) == 2 and len(_alive_workers("icecache_cpu_worker")) == 1,
        180, "actors submitted",
    )
    up_s = time.monotonic() - t_demand
    where = ray.get([a.node_id.remote() for a in engines] + [index.node_id.remote()], timeout=60)
    workers = _alive_workers()
    assert len(workers) == 3
    engine_nodes = {n["NodeID"] for n in _alive_workers("icecache_worker")}
    assert set(where[:2]) == engine_nodes, "each engine actor on its own gpu_worker node"
    assert where[2] in {n["NodeID"] for n in _alive_workers("icecache_cpu_worker")}
    assert all(n["NodeManagerAddress"] == LOOPBACK for n in workers)
    assert cluster.listening_addresses() <= LOOPBACK_ADDRESSES, "a Ray process listens off loopback"

    # 3. Demand gone: the nodes stay while idle for less than the timeout, then are removed.
    for actor in engines + [index]:
        ray.kill(actor)
    t_kill = time.monotonic()
    while time.monotonic() - t_kill < 0.4 * idle_timeout_s:
        assert timeline.record("actors killed") == 3, "nodes removed before the idle timeout"
        time.sleep(0.25)
    timeline.wait_for(lambda: _alive_workers() == [], 120, "actors killed")
    down_s = time.monotonic() - t_kill
    assert down_s >= 0.5 * idle_timeout_s
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    log.warning(
        "autoscaling: 3 worker nodes %.1f s after the actors were submitted; all removed %.1f s "
        "after the kill (idle timeout %.0f s); worker nodes over time (s, phase, count): %s",
        up_s, down_s, idle_timeout_s, timeline.events,
    )
