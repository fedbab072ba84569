"""The index actor: an :class:`IndexService` that can also answer on a same-node channel."""

from __future__ import annotations

from icecache_ray.actors.channel import serve
from icecache_ray.runtime.index_service import IndexService


class IndexActor(IndexService):
    """Spawned with ``ray.remote`` (see ``actors.spawn``); the logic is all in IndexService."""

    def open_channel(self, name: str) -> tuple[str, str]:
        """Start answering channel ``name`` (FIFO paths on this node) on a thread."""
        return serve(self, name)
