"""Page selection on the device for every decode row and KV head of a layer at once (pure torch).

Two stages, both batched over rows x KV heads, GQA-aware (the query heads of a KV head choose
together, summing their softmax mass: ``IndexConfig.gqa="sum"``, ``page_score="mass"``):

1. :func:`shortlist`: every page's mean key is scored (``q . mean`` per query head, plus the log of
   its valid rows; the best over the group's heads) and the best ``S`` pages kept.
2. :func:`pick`: the shortlist's keys are scored exactly; each query head's softmax runs over all
   shortlisted tokens; a page's value is its tokens' mass summed over the heads. The best
   ``n_pages`` pages are taken whole; the ``n_tokens`` tokens of largest mass outside them fill the
   token slots. With a shortlist holding every page this is exactly the host selector's rule over
   all pages (``MDCIIndex.select_fast`` when its beam covers every cluster).

Why a shortlist of 12 pages per slot (``IceCacheConfig.shortlist``): on bench.retrieval's 8k
workload 8 already keeps the host search's attention-mass recall (docs/benchmarks.md "Device
selection", measured 2026-12-06: 4x 0.902 / 0.843 at budget 256 / 128, 8x 0.907 / 0.851, 12x
0.908 / 0.853; host 0.907 / 0.809), but on RULER at 7.5k tokens 8 scored 3.4 points under 12,
which is within 2 points of the exact-token oracle at both lengths (docs/accuracy.md, 2026-12-07):
pages whose centroid ranks low carry some needles' tokens.
Centroid + radius bounds reward spread pages and lose recall, so they are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = float("-inf")


def shortlist(q: torch.Tensor, mean: torch.Tensor, log_count: torch.Tensor, size: int, scale: float) -> torch.Tensor:
    """q [n, H, g, d]; mean [n, H, C, d]; log_count [n, H, C] (-inf = no page). Returns the
    positions [n, H, min(size, C)] of the pages of best centroid logit ``q . mean * scale +
    log_count`` for any query head of the group (empty positions only when fewer pages exist)."""
    logits = torch.matmul(q, mean.transpose(-1, -2)) * scale + log_count[:, :, None, :]  # [n, H, g, C]
    return logits.amax(2).topk(min(size, mean.shape[2]), dim=-1, sorted=False).indices


@dataclass(frozen=True)
class Picks:
    """A selection over a shortlist of S pages of P rows, per (row, KV head): ``pages`` [n, H, k]
    shortlist positions taken whole (``page_ok`` [n, H, k]: a real page), ``tokens`` [n, H, t] flat
    shortlist positions ``s * P + r`` of single tokens (``token_ok`` [n, H, t])."""

    pages: torch.Tensor
    page_ok: torch.Tensor
    tokens: torch.Tensor
    token_ok: torch.Tensor


def pick(q: torch.Tensor, keys: torch.Tensor, count: torch.Tensor, n_pages: int, n_tokens: int, scale: float) -> Picks:
    """q [n, H, g, d]; keys [n, H, S, P, d] of the shortlisted pages; count [n, H, S] their valid
    rows. Returns :class:`Picks` (``n_pages`` whole pages, ``n_tokens`` single tokens)."""
    n, heads, s, p, d = keys.shape
    valid = torch.arange(p, device=keys.device) < count[..., None]  # [n, H, S, P]
    logits = torch.matmul(q.to(keys.dtype), keys.reshape(n, heads, s * p, d).transpose(-1, -2)).float() * scale
    logits = logits.masked_fill(~valid.reshape(n, heads, 1, s * p), NEG)
    mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2).reshape(n, heads, s, p)  # [n, H, S, P]
    page_mass = mass.sum(-1).masked_fill(count == 0, -1.0)
    k = min(n_pages, s)
    top = page_mass.topk(k, dim=-1).indices  # [n, H, k]
    page_ok = count.gather(-1, top) > 0
    token_mass = mass.masked_fill(~valid, -1.0)
    token_mass.scatter_(2, top[..., None].expand(-1, -1, -1, p), -1.0)  # pages taken whole
    t = min(n_tokens, s * p)
    if t == 0:
        empty = torch.zeros((n, heads, 0), dtype=torch.long, device=keys.device)
        return Picks(top, page_ok, empty, empty.bool())
    best = token_mass.reshape(n, heads, s * p).topk(t, dim=-1)
    return Picks(top, page_ok, best.indices, best.values >= 0)


def pick_reference(q, keys, count, n_pages: int, n_tokens: int, scale: float) -> tuple[list, list]:
    """Slow reference of :func:`pick` for one (row, KV head) at a time, in float64 Python loops
    over the heads: returns per item (sets of whole-page positions, sets of token positions)."""
    n, heads, s, p, _ = keys.shape
    pages_out, tokens_out = [], []
    for i in range(n):
        for h in range(heads):
            c = count[i, h].tolist()
            cand = [(j, r) for j in range(s) for r in range(c[j])]
            mass = {jr: 0.0 for jr in cand}
            for g in range(q.shape[2]):
                scores = {jr: float(q[i, h, g].double() @ keys[i, h, jr[0], jr[1]].double()) * scale for jr in cand}
                top = max(scores.values()) if scores else 0.0
                z = sum(torch.tensor(v - top).exp().item() for v in scores.values())
                for jr, v in scores.items():
                    mass[jr] += torch.tensor(v - top).exp().item() / z
            page_mass = {j: sum(mass[(j, r)] for r in range(c[j])) for j in range(s) if c[j] > 0}
            whole = set(sorted(page_mass, key=lambda j: -page_mass[j])[:n_pages])
            rest = sorted((jr for jr in cand if jr[0] not in whole), key=lambda jr: -mass[jr])[:n_tokens]
            pages_out.append(whole)
            tokens_out.append({j * p + r for j, r in rest})
    return pages_out, tokens_out
