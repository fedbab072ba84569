"""Checks of the cluster-launcher config ``cluster.yaml`` (no network, no cloud credentials).

It must pass Ray's own schema validation, keep worker counts consistent, bind the dashboard to
loopback, enlarge /dev/shm on every node type, and carry a comment for every key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"

# A YAML mapping key at the start of a line, optionally as the first key of a list item:
# `name:` / `- name:` / `"quoted name":` followed by a space or the end of the line.
_KEY_LINE = re.compile(r"""^\s*(?:-\s+)?(?:"[^"]*"|'[^']*'|[\w.\-/~]+)\s*:(?:\s|$)""")
_SHM = re.compile(r"--shm-size[= ]'?(\d+)([kmgKMG]?)")


@pytest.fixture(scope="module")
def raw_text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def config(raw_text: str) -> dict:
    cfg = yaml.safe_load(raw_text)
    assert isinstance(cfg, dict)
    return cfg


def _worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: spec for name, spec in config["available_node_types"].items() if name != head}


def test_validates_with_rays_schema(config: dict) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(config))


def test_validates_after_rays_default_filling(config: dict) -> None:
    """What `ray up` does before validating: merge the AWS defaults, then validate again."""
    from ray.autoscaler._private.util import fillout_defaults, merge_setup_commands, validate_config

    merged = merge_setup_commands(fillout_defaults(copy.deepcopy(config)))
    validate_config(merged)
    assert merged["available_node_types"].keys() == config["available_node_types"].keys()


def test_provider_is_a_real_cloud(config: dict) -> None:
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]
    for name, spec in config["available_node_types"].items():
        assert spec["node_config"].get("InstanceType"), name


def test_node_types_and_worker_counts(config: dict) -> None:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not advertise GPUs"
    assert head.get("max_workers", 0) == 0 and head.get("min_workers", 0) == 0

    workers = _worker_types(config)
    assert len(workers) >= 2
    for name, spec in workers.items():
        lo, hi = spec.get("min_workers", 0), spec["max_workers"]
        assert isinstance(lo, int) and isinstance(hi, int), name
        assert 0 <= lo <= hi, f"{name}: min_workers={lo} max_workers={hi}"
        assert hi <= config["max_workers"], f"{name}: max_workers above the global max_workers"
    assert sum(s.get("min_workers", 0) for s in workers.values()) <= config["max_workers"]
    assert sum(s["max_workers"] for s in workers.values()) >= config["max_workers"] > 0

    gpu = [s for s in workers.values() if s["resources"].get("GPU", 0) >= 1]
    assert gpu and all(s["resources"].get("icecache_worker", 0) >= 1 for s in gpu)
    cpu = [s for s in workers.values() if s["resources"].get("icecache_cpu_worker", 0) >= 1]
    assert cpu and all(s["resources"].get("GPU", 0) == 0 for s in cpu)
    # page pools are node-local shared memory: every engine node type has index slots beside it
    assert all(s["resources"].get("icecache_index", 0) >= 1 for s in gpu + cpu)
    assert 0 < config["idle_timeout_minutes"]


def test_dashboard_bound_to_loopback(config: dict) -> None:
    head_cmds = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert head_cmds, "no `ray start` among head_start_ray_commands"
    for cmd in head_cmds:
        assert "--head" in cmd
        assert "--dashboard-host=127.0.0.1" in cmd, cmd
    all_cmds = " ".join(str(c) for key, v in config.items() if key.endswith("commands") for c in v)
    assert "0.0.0.0" not in all_cmds


def _shm_gib(options: list[str]) -> float:
    sizes = []
    for opt in options:
        for num, unit in _SHM.findall(opt):
            scale = {"": 1 / 2**30, "k": 1 / 2**20, "m": 1 / 2**10, "g": 1.0}[unit.lower()]
            sizes.append(int(num) * scale)
    return sizes[-1] if sizes else 0.0


def test_shared_memory_enlarged_on_every_node_type(config: dict) -> None:
    docker = config.get("docker") or {}
    assert docker.get("image"), "expected a docker image (shm is sized with --shm-size)"
    base = list(docker.get("run_options", []))
    assert _shm_gib(base + docker.get("head_run_options", [])) >= 4, "head /dev/shm too small"
    for name, spec in _worker_types(config).items():
        # Ray replaces the global worker_run_options with the node type's own, when given.
        own = (spec.get("docker") or {}).get("worker_run_options", docker.get("worker_run_options", []))
        assert _shm_gib(base + own) >= 8, f"{name}: /dev/shm too small for the page pools"


def test_project_is_synced_and_installed(config: dict) -> None:
    assert "." in config["file_mounts"].values()
    gpu_cmds = " ".join(_worker_types(config)["gpu_worker"]["worker_setup_commands"])
    assert "pip install" in gpu_cmds and "-e" in gpu_cmds and "[gpu]" in gpu_cmds
    assert "download.pytorch.org/whl/cpu" not in gpu_cmds, "GPU nodes need the CUDA torch"
    cpu_cmds = " ".join(_worker_types(config)["cpu_worker"]["worker_setup_commands"])
    assert "download.pytorch.org/whl/cpu" in cpu_cmds
    assert "download.pytorch.org/whl/cpu" in " ".join(config["head_setup_commands"])


def test_every_key_is_commented(raw_text: str) -> None:
    """Each line holding a `key:` has a `#` comment on it or on the line just above."""
    lines = raw_text.splitlines()
    missing = []
    n_keys = 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or not _KEY_LINE.match(line):
            continue
        n_keys += 1
        has_inline = " #" in line
        has_above = i > 0 and lines[i - 1].strip().startswith("#")
        if not (has_inline or has_above):
            missing.append(f"{i + 1}: {stripped}")
    assert n_keys > 40, "key detection found suspiciously few keys"
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_key_detection_on_samples() -> None:
    assert _KEY_LINE.match("  head:")
    assert _KEY_LINE.match("    - DeviceName: /dev/sda1")
    assert _KEY_LINE.match('file_mounts: {"~/x": "."}')
    assert not _KEY_LINE.match("    - ray stop")
    assert not _KEY_LINE.match("    - pip install -q torch --index-url https://download.pytorch.org/whl/cpu")
