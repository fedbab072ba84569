"""The index actor: an :class:`~icecache_ray.engine.index_service.IndexService` that can also
answer on a same-node channel (spawned with ``ray.remote`` by ``icecache_ray.runtime.placement``)."""

from __future__ import annotations

from icecache_ray.actors.channel import serve
from icecache_ray.engine.index_service import IndexService


class IndexActor(IndexService):
    """The logic is all in IndexService; this adds the channel."""

    def open_channel(self, name: str) -> tuple[str, str]:
        """Start answering channel ``name`` (FIFO paths on this node) on a thread."""
        return serve(self, name)
