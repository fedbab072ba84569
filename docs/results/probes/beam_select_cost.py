"""Select-step cost of BeamRule.pages_per_slot (issue 17): MDCIIndex.select_fast at 7680 clustered
keys (d 64, 3 query heads per KV head), per budget's (pages, token-slot tokens), beam fixed
(pages_per_slot 0) against the default (4); interleaved repeats, median microseconds per call.
Run from the repository root: ``.venv/bin/python docs/results/probes/beam_select_cost.py``
(output: beam_select_cost.out). Synthetic keys: the cost depends on how many pages are scored.
"""
import json
import time
from contextlib import ExitStack

import numpy as np

from icecache_ray.config import BeamRule, IndexConfig
from icecache_ray.index.mdci import MDCIIndex
from icecache_ray.pool import PagePool, PoolLayout

D, N = 64, 7680
rng = np.random.default_rng(0)
centres = rng.standard_normal((24, D)).astype(np.float32) * 2
keys = (centres[rng.integers(0, 24, N)] + rng.standard_normal((N, D))).astype(np.float32)
values = rng.standard_normal((N, D)).astype(np.float32)
queries = [(centres[rng.integers(0, 24)] + rng.standard_normal((3, D))).astype(np.float32) for _ in range(64)]
indexes, pools = {}, ExitStack()
for per_slot in (0.0, 4.0):
    pool = pools.enter_context(PagePool.create(PoolLayout(capacity_pages=2048, page_size=16, head_dim=D, dtype="float32")))
    index = MDCIIndex(pool, IndexConfig(beam=BeamRule(pages_per_slot=per_slot)), D)
    index.build(keys, values)
    indexes[per_slot] = index
# (pages, token-slot tokens) as IceCacheConfig splits budgets 256 and 1024 (a third of the slots are tokens)
for budget, (k, n_tokens) in {256: (8, 64), 1024: (40, 320)}.items():
    times = {0.0: [], 4.0: []}
    for _ in range(5):
        for per_slot, index in indexes.items():
            for q in queries[:4]:
                index.select_fast(q, k, n_tokens)  # warm (numba compile, caches)
            t0 = time.perf_counter()
            for q in queries:
                index.select_fast(q, k, n_tokens)
            times[per_slot].append((time.perf_counter() - t0) / len(queries) * 1e6)
    fixed, scaled = np.median(times[0.0]), np.median(times[4.0])
    print(json.dumps({"budget": budget, "pages": k, "token_slot_tokens": n_tokens, "clusters": indexes[4.0].n_clusters,
                      "index_pages": indexes[4.0].n_pages, "fixed_us": round(fixed, 1), "pages_per_slot_4_us": round(scaled, 1),
                      "ratio": round(scaled / fixed, 3)}))
for index in indexes.values():
    index.release()
pools.close()
