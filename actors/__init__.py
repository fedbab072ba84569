"""Thin Ray actors: each applies ``ray.remote`` at spawn to a plain class that holds the logic
(:class:`icecache_ray.runtime.worker.StageWorker`, :class:`icecache_ray.runtime.index_service.IndexService`)
and only decides resources, placement and restart policy."""
