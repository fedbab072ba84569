"""icecache_ray: KV-cache offloading with semantic (M-DCI) pages for long-context inference.

Importing the package changes nothing in transformers; heavy modules load on first use.
"""

from __future__ import annotations

__all__ = ["generate", "generate_batch", "IceCache", "IceCacheConfig", "IndexConfig", "Deployment", "DeploymentConfig", "RequestFailed"]


def __getattr__(name: str):
    if name in ("generate", "generate_batch"):
        from icecache_ray.engine import generate

        return getattr(generate, name)
    if name == "IceCache":
        from icecache_ray.engine.cache import IceCache

        return IceCache
    if name in ("IceCacheConfig", "IndexConfig"):
        from icecache_ray import config

        return getattr(config, name)
    if name in ("Deployment", "RequestFailed"):
        from icecache_ray.runtime import deployment

        return getattr(deployment, name)
    if name == "DeploymentConfig":
        from icecache_ray.runtime.admission import DeploymentConfig

        return DeploymentConfig
    raise AttributeError(f"module 'icecache_ray' has no attribute {name!r}")
