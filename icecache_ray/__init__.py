"""icecache_ray: KV-cache offloading with semantic (M-DCI) pages for long-context inference.

Importing the package changes nothing in transformers; heavy modules load on first use.
"""

from __future__ import annotations

import os

# NumPy's OpenBLAS otherwise starts one thread per core for every matmul and competes with torch's
# own threads on the same cores: on a busy small machine every call then waits for spinning threads
# (docs/design.md "Threads"). Set before NumPy loads; a user's own value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__all__ = ["generate", "generate_batch", "LocalEngine", "IceCacheConfig", "IndexConfig", "EngineConfig", "Deployment",
           "DeploymentConfig", "RequestFailed"]

_WHERE = {
    "generate": "icecache_ray.engine.generate",
    "generate_batch": "icecache_ray.engine.generate",
    "LocalEngine": "icecache_ray.engine.local",
    "IceCacheConfig": "icecache_ray.config",
    "IndexConfig": "icecache_ray.config",
    "EngineConfig": "icecache_ray.serving_config",
    "DeploymentConfig": "icecache_ray.serving_config",
    "Deployment": "icecache_ray.runtime.deployment",
    "RequestFailed": "icecache_ray.runtime.deployment",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'icecache_ray' has no attribute {name!r}")
