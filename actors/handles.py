"""Transport handles from a stage worker to an index actor (the remote twin of
``icecache_ray.engine.stores.InProcessTransport``)."""

from __future__ import annotations

from icecache_ray.engine.index_service import LostStores


class _RayResult:
    def __init__(self, ray, ref) -> None:
        self.ray, self.ref = ray, ref

    def result(self):
        return self.ray.get(self.ref)


class RayHandle:
    """Calls an actor (an ``IndexActor``); calls from one caller run in order."""

    remote = True

    def __init__(self, ray, actor) -> None:
        self.ray, self.actor = ray, actor
        # LostStores: the call reached a restarted incarnation before anyone saw the old one fail
        self.failures = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, LostStores)

    def submit(self, method: str, *args) -> _RayResult:
        return _RayResult(self.ray, getattr(self.actor, method).remote(*args))
