"""Can a (row, KV head) keep its previous selection while its query barely moves? (experiment
record, issue 32: TokenSelect's "selection cache" as a way to skip the device selector's exact
re-scoring, which is ~27 % of a B8 decode step on the 2-core CPU)

Run from the repository root: ``.venv/bin/python docs/results/probes/selection_reuse.py``
(output: selection_reuse.out). The real workload of ``bench.retrieval`` (SmolLM2, 8192-token
essay prompt, layers 2, 6, ..., 29, last 64 query positions, every KV head, 1,536 queries),
replayed decode-style by ``bench.harness.replay_head`` with the device selector
(``icecache_device``, shortlist 8), at budgets 128 and 256. The rule tried: reuse the selection
made for an earlier query of the same head while the store is unchanged (no page was inserted
since) and every query head of the group has cosine similarity >= tau to the query that made
it; any insert forces a new selection. Prints, per tau, the share of queries answered by reuse
and the attention-mass recall at each budget.
"""
import json
import logging

import numpy as np

from icecache_ray.bench.device_policy import DeviceSelectPolicy
from icecache_ray.bench.retrieval import run_real
from icecache_ray.bench.workloads import capture_real
from icecache_ray.config import IndexConfig

logging.basicConfig(level=logging.WARNING)
TAUS = [None, 0.95, 0.9, 0.85, 0.8]
_select = DeviceSelectPolicy.select


class Reuse:
    """Per store: the query [g, d] that made the held selection, the store size then, the selection."""

    def __init__(self, tau):
        self.tau, self.held, self.reused, self.total = tau, {}, 0, 0

    def select(self, policy, store, queries, n_pages, context_logits=None):
        q = np.asarray(queries, np.float32)
        self.total += 1
        held = self.held.get(id(store))
        if self.tau is not None and held is not None and held[0] is store and held[1] == store.n_tokens:
            cos = (q * held[2]).sum(-1) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(held[2], axis=-1))
            if cos.min() >= self.tau:
                self.reused += 1
                return held[3]
        selection = _select(policy, store, queries, n_pages, context_logits)
        self.held[id(store)] = (store, store.n_tokens, q, selection)  # the store is kept: its id is not reused
        return selection


work = capture_real(8192, [2, 6, 10, 14, 18, 22, 26, 29], 64, None, 0)
for tau in TAUS:
    reuse = Reuse(tau)
    DeviceSelectPolicy.select = lambda self, *a, _r=reuse, **k: _r.select(self, *a, **k)
    rows = run_real(work, [128, 256], ["icecache_device"], IndexConfig())
    print(json.dumps({"tau": tau, "queries": reuse.total, "reused_share": round(reuse.reused / reuse.total, 4),
                      "recall": {r["budget"]: round(r["recall"], 4) for r in rows}}), flush=True)
DeviceSelectPolicy.select = _select
