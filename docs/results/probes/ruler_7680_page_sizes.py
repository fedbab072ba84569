"""The 7.5k RULER prompts icecache@256 lost, with 8- and 4-token pages at the same token budget
(experiment record). Run 2026-12-02 from the repository root:
``.venv/bin/python docs/results/probes/ruler_7680_page_sizes.py`` (output: ruler_7680_page_sizes.out).
"""
import sys, time, logging
from icecache_ray.config import IceCacheConfig, IndexConfig, BeamRule, PoolConfig
from icecache_ray.engine.generate import SharedPrefill
from icecache_ray.eval import ruler
from icecache_ray.model import load_model
logging.basicConfig(level=logging.WARNING)
model, tok = load_model()
cases = [("niah_single", 1), ("niah_multikey", 0), ("niah_multivalue", 1)]
variants = {
    "p8": IceCacheConfig(budget=256, page_size=8, sink_tokens=32, window_tokens=32, pool=PoolConfig(capacity_pages=1<<17)),
    "p8_max": IceCacheConfig(budget=256, page_size=8, sink_tokens=32, window_tokens=32, pool=PoolConfig(capacity_pages=1<<17), index=IndexConfig(page_score="max")),
    "p4": IceCacheConfig(budget=256, page_size=4, sink_tokens=32, window_tokens=32, pool=PoolConfig(capacity_pages=1<<18)),
    "oracle": IceCacheConfig(budget=256, policy="oracle"),
    "full": IceCacheConfig(policy="full"),
}
for variant, index in cases:
    s = ruler.build_sample(tok, variant, 7680, ruler.sample_seed(0, variant, 7680, index))
    t0 = time.time()
    shared = SharedPrefill(model, s.ids)
    print(f"== {variant} #{index} answers={s.answers} prefill {time.time()-t0:.0f}s", flush=True)
    for name, cfg in variants.items():
        t0 = time.time()
        r = shared.generate(cfg, ruler.MAX_NEW_TOKENS[variant], tokenizer=tok)
        print(f"  {name:10s} {ruler.score(variant, r.text, s.answers):.2f} {r.text[:50]!r} {time.time()-t0:.1f}s", flush=True)
