"""``make demo``: the bundled model on a bundled long prompt, decoded with the IceCache.

Until the summarization job lands (issue 5), the demo shows what exists end to end:
SmolLM2-135M-Instruct answers a passkey question hidden in ~3k tokens (the reference passkey
protocol), once with the full cache and once with IceCache at a 256-token budget (sparse
decoding from host pages), and the post-RoPE queries/keys of that prompt are replayed through the
page-selection policies to show how much attention mass each keeps at that budget.
Writes ``demo.json`` into the output folder it prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("icecache_ray.demo")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m icecache_ray.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/demo", help="output folder (created)")
    parser.add_argument("--tokens", type=int, default=3072, help="prompt length in tokens (<= 8192)")
    args = parser.parse_args(argv)
    if not 256 <= args.tokens <= 8192:
        raise SystemExit(f"--tokens={args.tokens}: must be within [256, 8192] (the model's context is 8k)")
    import torch

    import icecache_ray
    from icecache_ray.bench.harness import replay_head
    from icecache_ray.eval.passkey import build_prompt, score
    from icecache_ray.capture import capture_qk
    from icecache_ray.config import IceCacheConfig
    from icecache_ray.model import load_model
    from icecache_ray.policies import make_policy
    from icecache_ray.pool import PagePool, PoolLayout

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model()
    passkey = 48213
    ids = build_prompt(tokenizer, args.tokens, depth=0.4, key=passkey)
    answers = {}
    for name, cfg in (("full", IceCacheConfig(policy="full")), ("icecache@256", IceCacheConfig(budget=256))):
        t0 = time.perf_counter()
        result = icecache_ray.generate(model, ids, cfg, max_new_tokens=8, tokenizer=tokenizer)
        answers[name] = {"answer": result.text, "correct": bool(score(result.text, passkey)),
                         "seconds": round(time.perf_counter() - t0, 2), "decode": result.stats}
        log.info("%-13s answer %r (%s) in %.1f s", name, result.text, "correct" if answers[name]["correct"] else "wrong", answers[name]["seconds"])
    ids = torch.tensor([ids])
    layers = [2, 10, 20, 29]
    captured = capture_qk(model, ids, layers=layers, query_positions=[ids.shape[1] - 1])
    cfg = IceCacheConfig(budget=256)
    recall = {}
    with PagePool.create(PoolLayout(capacity_pages=4 * args.tokens // 16, page_size=16, head_dim=captured.head_dim)) as pool:
        g = captured.n_q_heads // captured.n_kv_heads
        for name in ("icecache", "quest", "streaming"):
            policy = make_policy(name, captured.head_dim, 16, pool=pool)
            values = [
                np.mean(replay_head(policy, captured.keys[l][h], captured.queries[l][h * g : (h + 1) * g], captured.query_positions, cfg).recall)
                for l in layers
                for h in range(captured.n_kv_heads)
            ]
            recall[name] = float(np.mean(values))
            log.info("attention mass kept at budget 256 by %-9s: %.3f", name, recall[name])
    result = {"prompt_tokens": int(ids.shape[1]), "passkey": passkey, "generation": answers,
              "recall_layers": layers, "recall_at_256": recall}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"results written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
