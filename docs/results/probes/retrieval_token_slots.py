"""Does filling some page slots with the best single tokens of the candidate pages raise recall?
(experiment record, issue 17)

Run from the repository root: ``.venv/bin/python docs/results/probes/retrieval_token_slots.py``
(output: retrieval_token_slots.out). The real workload of ``bench.retrieval`` (SmolLM2, 8192-token
essay prompt, layers 2..29, last 64 query positions, every KV head), replayed decode-style exactly
as ``bench.harness.replay_head`` does, budget 256 (12 retrieved pages of 16). Per query:

- ``pages``: the index's own selection (``MDCIIndex.query``);
- ``tokens_T``: the best R - T pages of the same candidates, then the T * 16 single tokens of
  largest group mass among the candidates' other tokens (per-head softmax over the candidates,
  summed over the group, as the page score);
- ``oracle``: the exact top-192 tokens (upper bound).
"""
import logging
import math

import numpy as np

from icecache_ray.bench.harness import window_start
from icecache_ray.bench.retrieval import _pool_for
from icecache_ray.bench.workloads import capture_real
from icecache_ray.config import IceCacheConfig
from icecache_ray.metrics import attention_mass_recall, softmax_rows
from icecache_ray.policies import make_policy

logging.basicConfig(level=logging.WARNING)
LAYERS = [2, 6, 10, 14, 18, 22, 26, 29]
work = capture_real(8192, LAYERS, 64, None, 0)
cfg = IceCacheConfig(budget=256)
R, P = cfg.retrieved_pages, cfg.page_size
VARIANTS = [0, 1, 2, 3, 4, 6, 8, 12]
recall = {f"tokens_{t}": [] for t in VARIANTS} | {"pages": [], "oracle": []}


def hybrid(index, qs: np.ndarray, t: int) -> np.ndarray:
    """Middle tokens: best R - t candidate pages + the t * P best other candidate tokens."""
    cand = index._candidate_pages(qs, R)
    tab = index.table
    tokens = tab.page_tokens[cand]  # [m, P]
    keys = tab.pool.pages[tab.page_pool[cand], 0]  # [m, P, d]
    logits = np.einsum("hd,mpd->hmp", qs, keys) / math.sqrt(qs.shape[1])
    logits[:, tokens < 0] = -np.inf
    flat = logits.reshape(len(qs), -1)
    prob = np.exp(flat - flat.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).sum(0).reshape(tokens.shape)  # group mass [m, P]
    order = np.argsort(-prob.sum(1), kind="stable")
    keep = order[: R - t]
    chosen = [tokens[keep][tokens[keep] >= 0]]
    if t:
        rest = order[R - t :]
        rt, rp = tokens[rest].reshape(-1), prob[rest].reshape(-1)
        ok = rt >= 0
        rt, rp = rt[ok], rp[ok]
        chosen.append(rt[np.argsort(-rp, kind="stable")[: t * P]])
    return np.concatenate(chosen)


head_dim = next(iter(work.keys.values())).shape[-1]
for layer in LAYERS:
    for kv in range(work.n_kv_heads):
        keys, queries = work.group(layer, kv)
        with _pool_for(work.seq_len, head_dim, P) as pool:
            policy = make_policy("icecache", head_dim, P, pool=pool)
            sink = cfg.sink_tokens
            end = window_start(int(work.positions[0]), cfg)
            zeros = np.zeros_like(keys)
            store = policy.build(keys[sink:end], zeros[sink:end])
            for i, pos in enumerate(work.positions):
                start = window_start(int(pos), cfg)
                if start > end:
                    store.insert(keys[end:start], zeros[end:start])
                    end = start
                qs = np.ascontiguousarray(queries[:, i])
                probs = softmax_rows((qs @ keys[: pos + 1].T) / math.sqrt(head_dim))
                context = np.concatenate([np.arange(sink), np.arange(end, pos + 1)])
                sel = policy.select(store, qs, R)
                recall["pages"].append(attention_mass_recall(probs, np.concatenate([context, sink + sel.tokens])))
                for t in VARIANTS:
                    chosen = hybrid(store.index, qs, t)
                    recall[f"tokens_{t}"].append(attention_mass_recall(probs, np.concatenate([context, sink + chosen])))
                mid = probs[:, sink:end].mean(0)
                top = sink + np.argsort(-mid)[: R * P]
                recall["oracle"].append(attention_mass_recall(probs, np.concatenate([context, top])))
            store.release()
    print(f"layer {layer}: " + " ".join(f"{k}={np.mean(v):.4f}" for k, v in recall.items()), flush=True)
print("ALL: " + " ".join(f"{k}={np.mean(v):.4f}" for k, v in recall.items()))
