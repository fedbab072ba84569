"""Resources shared by the sparse layers of one IceCache: policy, host pool, worker thread, stats."""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.stats import RequestStats, StepStats
from icecache_ray.policies import make_policy
from icecache_ray.pool import PagePool, PoolLayout

log = logging.getLogger(__name__)


class SparseRuntime:
    """Owns the host page pool (shared memory) and the single background thread that builds and
    updates the stores, so index work overlaps the model's compute but never races a query."""

    def __init__(self, config: IceCacheConfig, head_dim: int) -> None:
        self.config = config
        self.pool = None
        if config.policy == "icecache":
            layout = PoolLayout(config.pool.capacity_pages, config.page_size, head_dim, "float32")
            self.pool = PagePool.create(layout)
            self._finalizer = weakref.finalize(self, _release_pool, self.pool)
        self.policy = make_policy(config.policy, head_dim, config.page_size, pool=self.pool, index=config.index)
        self.uses_slots = config.policy == "icecache"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icecache-index")
        self.stats = RequestStats()
        self._step: StepStats | None = None

    def submit(self, fn, *args) -> Future:
        return self._executor.submit(fn, *args)

    def drain(self) -> None:
        """Block until every background job submitted so far has run (the thread is FIFO)."""
        self._executor.submit(lambda: None).result()

    def begin_step(self) -> None:
        """Start a new decode step's counters (called at the first sparse layer of a step)."""
        self._step = StepStats()
        self.stats.steps.append(self._step)

    def record(self, stats: StepStats) -> None:
        if self._step is None:
            self.begin_step()
        self._step.add(stats)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self.pool is not None:
            self._finalizer()


def _release_pool(pool: PagePool) -> None:
    pool.close()
    pool.unlink()
