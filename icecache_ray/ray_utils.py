"""Starting or joining Ray the way this project needs it (loopback only when local)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def loopback_env() -> None:
    """Environment every local Ray start needs here: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    Ray swaps 127.0.0.1 for the machine's routable address."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_NODE_IP_ADDRESS", LOOPBACK)


def connect(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None):
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``), else
    start a local Ray on loopback. Idempotent. Returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        loopback_env()
        log.info("starting a local Ray on %s", LOOPBACK)
        ray.init(  # "local": always a new instance, never a cluster some other process left running
            address="local", _node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus,
            object_store_memory=object_store_memory, log_to_driver=True,
        )
    return ray
