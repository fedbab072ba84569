"""Decode speed and device memory at long context, single process, one run for every policy.

``python -m icecache_ray.bench.speed --length 8192 --steps 32 --json OUT``

For each configuration (the full cache and icecache at each ``--budget``) the same essay prompt is
prefilled, then ``--steps`` greedy tokens are decoded one model call at a time. Reported per
configuration: median / mean time per decoded token (the first ``--warmup`` steps excluded), the
breakdown select / load / attend / rest from :class:`StepStats`, pages and bytes moved, hit rate,
the peak device-resident KV bytes during prefill and during decode (see
:func:`icecache_ray.engine.memory.device_kv_bytes`), host pool bytes and index bytes per token.
A short-context reference (``--short``) measures the full cache's per-token time at a few tokens
of context, the floor no cache can beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.cache import IceCache
from icecache_ray.engine.memory import KVMeter
from icecache_ray.haystack import essay_prompt_ids
from icecache_ray.model import load_model

log = logging.getLogger("icecache_ray.bench.speed")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.speed", description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192, help="prompt tokens (default 8192)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per configuration")
    p.add_argument("--warmup", type=int, default=4, help="first decode steps left out of the timings")
    p.add_argument("--budgets", default="256", help="icecache budgets, comma separated")
    p.add_argument("--layer-reuse", default="1", help="IceCache(r) reuse factors to measure, comma separated")
    p.add_argument("--short", type=int, default=16, help="context of the short full-cache reference (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M's architecture with random weights and random prompt tokens (for machines "
                        "without the bundled model; timings are valid, tokens are not)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p.parse_args(argv)


# SmolLM2-135M-Instruct's shape (its config.json), for --random-weights.
SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
)


def _model_and_prompt(args):
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval().to(args.device, dtype)
        model.set_attn_implementation("sdpa")
        ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (1, args.length), generator=torch.Generator().manual_seed(0))
        return model, ids.to(args.device)
    model, tok = load_model(args.model, dtype=dtype)
    model.to(args.device)
    return model, essay_prompt_ids(tok, args.length, seed=0).to(args.device)


def _decode(model, ids: torch.Tensor, cache, steps: int) -> tuple[list[float], list[int], int]:
    """Prefill ``ids`` [1, T], then greedy-decode ``steps`` tokens one call at a time.

    Returns (per-step seconds, generated ids, peak device KV bytes during prefill)."""
    meter = KVMeter(cache)
    with torch.inference_mode():
        with meter.tracking():
            logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill_peak = meter.peak
        token = logits.argmax(-1, keepdim=True)
        times, out = [], [int(token)]
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            out.append(int(token))  # .item() synchronises the device: the step is really done
            times.append(time.perf_counter() - t0)
    return times, out, prefill_peak


def _measure(model, ids, name: str, cache, args) -> dict:
    times, tokens, prefill_peak = _decode(model, ids, cache, args.steps + args.warmup)
    kept = times[args.warmup :]
    row = {
        "config": name,
        "context": int(ids.shape[1]),
        "ms_per_token_median": 1e3 * statistics.median(kept),
        "ms_per_token_mean": 1e3 * statistics.fmean(kept),
        "steps": len(kept),
        "peak_device_kv_bytes_prefill": prefill_peak,
        "device_kv_bytes_decode": KVMeter(cache).current(),
        "device_kv_bytes_decode_sparse_layers": KVMeter(cache).current(sparse_only=True),
        "tokens": tokens,
    }
    if isinstance(cache, IceCache) and cache.stats is not None:
        steps = cache.stats.steps[-len(kept) :]
        n = max(1, len(steps))
        for field in ("select_ms", "load_ms", "attend_ms"):
            row[field] = sum(getattr(s, field) for s in steps) / n
        row["rest_ms"] = row["ms_per_token_mean"] - row["select_ms"] - row["load_ms"] - row["attend_ms"]
        row["pages_loaded_per_step"] = sum(s.pages_loaded for s in steps) / n
        row["bytes_loaded_per_step"] = sum(s.bytes_loaded for s in steps) / n
        row["hit_rate"] = sum(s.pages_hit for s in steps) / max(1, sum(s.pages_selected for s in steps))
        row.update(cache.host_memory())
    return row


def _configs(args) -> list[tuple[str, IceCacheConfig | None]]:
    out: list[tuple[str, IceCacheConfig | None]] = [("full", None)]
    for budget in [int(b) for b in args.budgets.split(",") if b]:
        for reuse in [int(r) for r in args.layer_reuse.split(",") if r]:
            name = f"icecache@{budget}" + (f" r={reuse}" if reuse > 1 else "")
            out.append((name, IceCacheConfig(budget=budget, layer_reuse=reuse)))
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ids = _model_and_prompt(args)
    rows = []
    for name, cfg in _configs(args):
        cache = DynamicCache() if cfg is None else IceCache(model, cfg)
        try:
            rows.append(_measure(model, ids, name, cache, args))
        finally:
            if isinstance(cache, IceCache):
                cache.close()
        log.info("%s: %.1f ms/token", name, rows[-1]["ms_per_token_median"])
    if args.short:
        rows.append(_measure(model, ids[:, : args.short], f"full@{args.short}", DynamicCache(), args))
    full = rows[0]["ms_per_token_median"]
    summary = {r["config"]: {"ms_per_token": r["ms_per_token_median"], "ratio_to_full": r["ms_per_token_median"] / full} for r in rows}
    for r in rows[1:]:
        if r["config"].startswith("icecache"):
            summary[r["config"]]["tokens_equal_full"] = r["tokens"] == rows[0]["tokens"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} torch threads)"
    return {"length": args.length, "device": device, "dtype": args.dtype, "random_weights": args.random_weights,
            "date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.write(json.dumps(result["summary"], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
