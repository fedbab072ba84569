"""Retrieval benchmark: ``python -m icecache_ray.bench.retrieval --json OUT [--quick]``.

Two workloads (see README "Benchmarks"): **real** (SmolLM2-135M keys/queries of an essay prompt,
replayed decode-style per (layer, KV head)) and **synthetic** (clustered head_dim-128 keys at
N = 64k, 256k, 1M). Prints the JSON summary and writes everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from icecache_ray.bench.device_policy import DeviceSelectPolicy
from icecache_ray.bench.harness import HeadResult, replay_head
from icecache_ray.bench.workloads import RealWorkload, SyntheticWorkload, capture_real, make_synthetic
from icecache_ray.config import BeamRule, IceCacheConfig, IndexConfig
from icecache_ray.metrics import percentile_ms, softmax_rows, topk_hit_rate
from icecache_ray.policies import make_policy
from icecache_ray.pool import PagePool, PoolLayout
from icecache_ray.report import json_path, positive_ints

log = logging.getLogger("icecache_ray.bench.retrieval")

REAL_POLICIES = ("icecache", "icecache_device", "icecache_pages", "quest", "oracle_token", "oracle_seqpage", "streaming")
SYNTH_POLICIES = ("icecache", "icecache_pages", "quest", "oracle_token", "oracle_seqpage")


def _make(name: str, head_dim: int, cfg: IceCacheConfig, pool, index: IndexConfig):
    """``icecache`` with the config's token slots; ``icecache_pages``: whole pages only (the paper)."""
    token_pages = cfg.token_pages if name in ("icecache", "icecache_device") else 0
    base = "icecache" if name.startswith("icecache") else name.replace("oracle_token", "oracle")
    policy = make_policy(base, head_dim, cfg.page_size, pool=pool, index=index, token_pages=token_pages)
    return DeviceSelectPolicy(policy, cfg.shortlist) if name == "icecache_device" else policy


def _pool_for(n_tokens: int, head_dim: int, page_size: int) -> PagePool:
    """A pool big enough for one index over n_tokens (pages can be as small as half full)."""
    return PagePool.create(PoolLayout(capacity_pages=2 * n_tokens // page_size + 1024, page_size=page_size, head_dim=head_dim, dtype="float32"))


# ---------------------------------------------------------------------------------------- real
def run_real(work: RealWorkload, budgets: list[int], policies: list[str], index: IndexConfig, shortlist: float = IceCacheConfig.shortlist) -> list[dict]:
    rows = []
    head_dim = next(iter(work.keys.values())).shape[-1]
    for budget in budgets:
        cfg = IceCacheConfig(budget=budget, index=index, shortlist=shortlist)
        for name in policies:
            results = []
            with _pool_for(work.seq_len, head_dim, cfg.page_size) as pool:
                policy = _make(name, head_dim, cfg, pool, index)
                for layer in sorted(work.keys):
                    for kv in range(work.n_kv_heads):
                        keys, queries = work.group(layer, kv)
                        results.append(replay_head(policy, keys, queries, work.positions, cfg))
            rows.append(_row("real", work.seq_len, name, cfg, results))
            log.info("real budget=%d %-15s recall=%.4f", budget, name, rows[-1]["recall"])
    return rows


def _row(workload: str, n: int, name: str, cfg: IceCacheConfig, results: list[HeadResult]) -> dict:
    query_s = [s for r in results for s in r.query_s]
    indexed = sum(r.indexed_tokens for r in results)
    return {
        "workload": workload,
        "n_tokens": n,
        "policy": name,
        "budget": cfg.budget,
        "sink_tokens": cfg.sink_tokens,
        "window_tokens": cfg.window_tokens,
        "retrieved_pages": cfg.retrieved_pages,
        "recall": float(np.mean([x for r in results for x in r.recall])),
        "topk_hit_rate": float(np.mean([x for r in results for x in r.hit])),
        "attended_tokens_mean": float(np.mean([x for r in results for x in r.attended_tokens])),
        "query_ms_p50": percentile_ms(query_s, 50),
        "query_ms_p95": percentile_ms(query_s, 95),
        "build_us_per_token": 1e6 * sum(r.build_s for r in results) / max(1, sum(r.built_tokens for r in results)),
        "insert_us_per_token": 1e6 * sum(r.insert_s for r in results) / max(1, sum(r.inserted_tokens for r in results)),
        "index_bytes_per_token": sum(r.metadata_bytes for r in results) / max(1, indexed),
        "n_heads_evaluated": len(results),
    }


def bruteforce_ms(keys: np.ndarray, queries: np.ndarray, k: int) -> list[float]:
    """Exact scoring of every key + top-k, per query (seconds)."""
    out = []
    for q in queries:
        t0 = time.perf_counter()
        scores = keys @ q
        np.argpartition(-scores, k)[:k]
        out.append(time.perf_counter() - t0)
    return out


def real_build_vs_prefill(work: RealWorkload, index: IndexConfig, layer: int) -> dict:
    """Index build time of one layer (all KV heads, whole prompt) vs that layer's dense prefill."""
    keys = work.keys[layer]
    head_dim = keys.shape[-1]
    with _pool_for(work.seq_len * work.n_kv_heads, head_dim, 16) as pool:
        policy = make_policy("icecache", head_dim, 16, pool=pool, index=index)
        t0 = time.perf_counter()
        stores = [policy.build(keys[h], np.zeros_like(keys[h])) for h in range(work.n_kv_heads)]
        build_s = time.perf_counter() - t0
        for store in stores:
            store.release()
    prefill_s = work.layer_prefill_s[layer]
    return {"layer": layer, "build_s": build_s, "layer_prefill_s": prefill_s, "ratio": build_s / prefill_s}


def real_select_ab(work: RealWorkload, index: IndexConfig, budget: int = 256, repeats: int = 5) -> dict:
    """The decode hot path (``IndexStore.select_pages``, what an index service runs per item) with
    token slots vs whole pages only, timed alternately on the same indexes and queries (each
    layer's and KV head's whole prompt indexed), so machine noise hits both alike. Returns the
    median time of each and their ratio."""
    cfg = IceCacheConfig(budget=budget, index=index)
    head_dim = next(iter(work.keys.values())).shape[-1]
    ab = {"tokens": [], "pages": []}
    with _pool_for(work.seq_len, head_dim, cfg.page_size) as pool:
        with_tokens = _make("icecache", head_dim, cfg, pool, index)
        pages_only = _make("icecache_pages", head_dim, cfg, pool, index)
        for layer in sorted(work.keys):
            for kv in range(work.n_kv_heads):
                keys, queries = work.group(layer, kv)
                store = with_tokens.build(keys, np.zeros_like(keys))
                qs = [np.ascontiguousarray(queries[:, i], dtype=np.float32) for i in range(queries.shape[1])]
                for _ in range(repeats):
                    for name, policy in (("tokens", with_tokens), ("pages", pages_only)):
                        split = policy.split(cfg.retrieved_pages)
                        t0 = time.perf_counter()
                        for q in qs:
                            store.select_pages(q, *split)
                        ab[name].append((time.perf_counter() - t0) / len(qs))
                store.release()
    tokens_ms, pages_ms = 1e3 * float(np.median(ab["tokens"])), 1e3 * float(np.median(ab["pages"]))
    return {"budget": budget, "token_pages": cfg.token_pages, "select_ms_tokens": tokens_ms, "select_ms_pages": pages_ms,
            "slowdown": tokens_ms / pages_ms}


# Index variants measured against the default (GQA rule, page score, packing, routing, beam).
ABLATIONS: dict[str, dict] = {
    "gqa=interleave,page_score=max (paper)": dict(gqa="interleave", page_score="max"),
    "gqa=max,page_score=max": dict(gqa="max", page_score="max"),
    "gqa=sum,page_score=max": dict(gqa="sum", page_score="max"),
    "gqa=interleave,page_score=mass": dict(gqa="interleave"),
    "gqa=max,page_score=mass": dict(gqa="max"),
    "packing=projection": dict(packing="projection"),
    "paper-like (projection, interleave, max, no radius)": dict(packing="projection", gqa="interleave", page_score="max", radius_weight=0.0),
    "radius_weight=0": dict(radius_weight=0.0),
    "beam width 4": dict(beam=BeamRule(width=4)),
    "beam width 8": dict(beam=BeamRule(width=8)),
    "beam width 32": dict(beam=BeamRule(width=32)),
    "beam log2 x2": dict(beam=BeamRule(kind="log", width=2)),
}


def run_ablation(work: RealWorkload, budget: int) -> list[dict]:
    rows = []
    for name, changes in ABLATIONS.items():
        for row in run_real(work, [budget], ["icecache"], IndexConfig(**changes)):
            row["policy"] = f"icecache[{name}]"
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- synthetic
def run_synthetic(sizes: list[int], budgets: list[int], policies: list[str], index: IndexConfig, n_queries: int, insert_n: int) -> tuple[list[dict], dict]:
    rows, brute = [], {}
    for n in sizes:
        work = make_synthetic(n, n_queries=n_queries, seed=n)
        brute[n] = percentile_ms(bruteforce_ms(work.keys, work.queries, 16), 50)
        for name in policies:
            rows.extend(_synthetic_policy(work, name, budgets, index, insert_n))
            log.info("synthetic N=%d %-15s done (bruteforce p50 %.2f ms)", n, name, brute[n])
        del work
    return rows, brute


def _synthetic_policy(work: SyntheticWorkload, name: str, budgets: list[int], index: IndexConfig, insert_n: int) -> list[dict]:
    n, dim = work.keys.shape
    rows = []
    zeros = np.zeros((n, dim), np.float32)
    with _pool_for(n, dim, 16) as pool:
        policy = _make(name, dim, IceCacheConfig(index=index), pool, index)
        res = HeadResult()
        t0 = time.perf_counter()
        store = policy.build(work.keys[: n - insert_n], zeros[: n - insert_n])
        res.build_s, res.built_tokens = time.perf_counter() - t0, n - insert_n
        t0 = time.perf_counter()
        for start in range(n - insert_n, n, 16):  # pages leave the window 16 tokens at a time
            store.insert(work.keys[start : start + 16], zeros[start : start + 16])
        res.insert_s, res.inserted_tokens = time.perf_counter() - t0, insert_n
        res.metadata_bytes, res.indexed_tokens = store.metadata_bytes(), store.n_tokens
        probs = softmax_rows((work.queries @ work.keys.T) / math.sqrt(dim))
        for budget in budgets:
            cfg = IceCacheConfig(budget=budget, index=index)
            if name == "icecache":
                policy = _make(name, dim, cfg, pool, index)
            r = HeadResult(build_s=res.build_s, built_tokens=res.built_tokens, insert_s=res.insert_s,
                           inserted_tokens=res.inserted_tokens, metadata_bytes=res.metadata_bytes, indexed_tokens=res.indexed_tokens)
            selections = []
            for q in work.queries:  # back to back: latency of the selection alone
                t0 = time.perf_counter()
                selections.append(policy.select(store, q[None], cfg.retrieved_pages))
                r.query_s.append(time.perf_counter() - t0)
            for i, sel in enumerate(selections):
                r.recall.append(float(probs[i, sel.tokens].sum()))
                r.hit.append(topk_hit_rate(probs[i], np.arange(n), sel.tokens, 16))
                r.attended_tokens.append(len(sel.tokens))
            rows.append(_row("synthetic", n, name, cfg, [r]))
        store.release()
    return rows


# ---------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict], brute: dict, build: dict | None, sizes: list[int], notes: list[str]) -> dict:
    def get(workload, policy, budget, n=None, key="recall"):
        for r in rows:
            if r["workload"] == workload and r["policy"] == policy and r["budget"] == budget and (n is None or r["n_tokens"] == n):
                return r[key]
        return float("nan")

    big, small = max(sizes) if sizes else None, min(sizes) if sizes else None
    ice_big = get("synthetic", "icecache", 256, big, "query_ms_p50")
    summary = {
        "real_recall_icecache_256": get("real", "icecache", 256),
        "real_recall_icecache_128": get("real", "icecache", 128),
        "real_recall_icecache_device_256": get("real", "icecache_device", 256),
        "real_recall_icecache_device_128": get("real", "icecache_device", 128),
        "real_recall_quest_256": get("real", "quest", 256),
        "real_recall_oracle_token_256": get("real", "oracle_token", 256),
        "real_recall_oracle_seqpage_256": get("real", "oracle_seqpage", 256),
        "real_recall_streaming_256": get("real", "streaming", 256),
        "synthetic_1m_speedup_vs_bruteforce": brute.get(big, float("nan")) / ice_big if big else float("nan"),
        "synthetic_1m_hit_rate": get("synthetic", "icecache", 256, big, "topk_hit_rate"),
        "synthetic_1m_query_ms_p50": ice_big,
        "synthetic_1m_bruteforce_ms_p50": brute.get(big, float("nan")),
        "query_growth_64k_to_1m": ice_big / get("synthetic", "icecache", 256, small, "query_ms_p50") if sizes else float("nan"),
        "build_vs_prefill_ratio": build["ratio"] if build else float("nan"),
        "index_bytes_per_token_head": get("real", "icecache", 256, key="index_bytes_per_token"),
        "synthetic_sizes": sizes,
        "notes": notes,
    }
    gap = summary["real_recall_oracle_token_256"] - summary["real_recall_oracle_seqpage_256"]
    summary["real_gap_closed_256"] = (summary["real_recall_icecache_256"] - summary["real_recall_oracle_seqpage_256"]) / gap if gap else float("nan")
    # token slots (IceCacheConfig.token_pages) against whole pages only, same run, same hot path
    summary["real_recall_icecache_pages_256"] = get("real", "icecache_pages", 256)
    summary["real_gap_closed_pages_256"] = (summary["real_recall_icecache_pages_256"] - summary["real_recall_oracle_seqpage_256"]) / gap if gap else float("nan")
    return summary


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.retrieval", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, type=json_path, help="output file")
    p.add_argument("--quick", action="store_true", help="<= 5 minutes: 4k-token prompt, 3 layers, N up to 256k")
    p.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--length", type=int, default=None, help="real prompt tokens (default 8192; quick 4096)")
    p.add_argument("--layers", default=None, help="comma list of layers >= 2 (default 2,6,10,14,18,22,26,29)")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--policies", default=",".join(REAL_POLICIES))
    p.add_argument("--sizes", default=None, help="synthetic N list (default 65536,262144,1048576)")
    p.add_argument("--ablation", action="store_true", help="also run index variants on the real workload at budget 256")
    p.add_argument("--shortlist", type=float, default=IceCacheConfig.shortlist,
                   help="icecache_device: shortlisted pages per retrieved slot (default: IceCacheConfig's)")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _ints(text: str, name: str) -> list[int]:
    try:
        return positive_ints(text, name)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse(argv)
    out_path = Path(args.json)
    budgets = _ints(args.budgets, "budgets")
    policies = [p for p in args.policies.split(",") if p]
    for b in budgets:
        try:
            IceCacheConfig(budget=b)  # validate before any heavy work
        except ValueError as exc:
            raise SystemExit(f"--budgets: {exc}") from None
    unknown = [p for p in policies if p not in REAL_POLICIES + ("full",)]
    if unknown:
        raise SystemExit(f"--policies: unknown {unknown}; choose from {list(REAL_POLICIES)}")
    length = args.length or (4096 if args.quick else 8192)
    layers = _ints(args.layers, "layers") if args.layers else ([2, 15, 29] if args.quick else [2, 6, 10, 14, 18, 22, 26, 29])
    sizes = _ints(args.sizes, "sizes") if args.sizes else ([16384, 65536, 262144] if args.quick else [65536, 262144, 1048576])
    index = IndexConfig(seed=args.seed)
    notes = [] if args.skip_real else [f"real: {length}-token essay prompt, layers {layers}, last 64 query positions, all KV heads"]
    if args.quick:
        notes.append(f"quick mode: synthetic sizes {sizes} (the synthetic_1m_* keys refer to N={max(sizes)})")
    rows: list[dict] = []
    build = select_ab = None
    t0 = time.perf_counter()
    if not args.skip_real:
        work = capture_real(length, layers, 64, args.model, args.seed)
        rows += run_real(work, budgets, policies, index, args.shortlist)
        if any(p in policies for p in ("icecache", "quest")):  # the build and select probes measure the host index
            build = real_build_vs_prefill(work, index, layers[0])
            select_ab = real_select_ab(work, index)
        if args.ablation:
            rows += run_ablation(work, 256)
        del work
    brute: dict = {}
    if not args.skip_synthetic:
        synth_policies = [p for p in policies if p in SYNTH_POLICIES]
        synth_rows, brute = run_synthetic(sizes, budgets, synth_policies, index, n_queries=64, insert_n=1024)
        rows += synth_rows
    summary = summarize(rows, brute, build, sizes if not args.skip_synthetic else [], notes)
    if select_ab is not None:
        summary["real_select_ab_256"] = select_ab
    summary["wall_s"] = time.perf_counter() - t0
    result = {"summary": summary, "rows": rows, "build_vs_prefill": build, "bruteforce_ms_p50": {str(k): v for k, v in brute.items()},
              "config": {"index": IceCacheConfig(index=index).to_dict()["index"], "numba_threads": os.environ.get("NUMBA_NUM_THREADS")}}
    result = _nan_to_none(result)  # strict JSON: a metric that was not measured is null
    out_path.write_text(json.dumps(result, indent=2, default=float, allow_nan=False))
    json.dump(result["summary"], sys.stdout, indent=2, default=float, allow_nan=False)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
