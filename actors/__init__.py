"""Thin Ray shells around engine pieces: the stage worker (:mod:`.worker`, a
:class:`~icecache_ray.engine.runner.ModelRunner` on its device), the index actor (:mod:`.index`, an
:class:`~icecache_ray.engine.index_service.IndexService`), their transport (:mod:`.handles`,
:mod:`.channel`). ``ray.remote`` is applied when the runtime spawns them
(``icecache_ray.runtime.placement``); algorithms never live here."""
