"""Which index settings recover the 7.5k RULER prompts icecache@256 lost? (experiment record)

Run 2026-12-02 from the repository root: ``.venv/bin/python docs/results/probes/ruler_7680_index_variants.py``
(output: ruler_7680_index_variants.out). One dense prefill per prompt, then greedy decoding under
each configuration at budget 256 (the eval harness's SharedPrefill); prompts are the harness's own
(``ruler.build_sample`` with seed 0), scored by ``ruler.score``.
"""
import sys, time, logging
from icecache_ray.config import IceCacheConfig, IndexConfig, BeamRule
from icecache_ray.engine.generate import SharedPrefill
from icecache_ray.eval import ruler
from icecache_ray.model import load_model
logging.basicConfig(level=logging.WARNING)
model, tok = load_model()
cases = [("niah_single", 1)]
variants = {
    "default": IceCacheConfig(budget=256),
    "max_score": IceCacheConfig(budget=256, index=IndexConfig(page_score="max")),
    "gqa_max": IceCacheConfig(budget=256, index=IndexConfig(gqa="max")),
    "gqa_max_maxscore": IceCacheConfig(budget=256, index=IndexConfig(gqa="max", page_score="max")),
    "interleave_max": IceCacheConfig(budget=256, index=IndexConfig(gqa="interleave", page_score="max")),
    "beam_all": IceCacheConfig(budget=256, index=IndexConfig(beam=BeamRule(width=100000))),
    "oracle": IceCacheConfig(budget=256, policy="oracle"),
    "full": IceCacheConfig(policy="full"),
}
for variant, index in cases:
    s = ruler.build_sample(tok, variant, 7680, ruler.sample_seed(0, variant, 7680, index))
    t0 = time.time()
    shared = SharedPrefill(model, s.ids)
    print(f"== {variant} #{index} answers={s.answers} prefill {time.time()-t0:.0f}s", flush=True)
    for name, cfg in variants.items():
        r = shared.generate(cfg, ruler.MAX_NEW_TOKENS[variant], tokenizer=tok)
        print(f"  {name:18s} {ruler.score(variant, r.text, s.answers):.2f} {r.text[:50]!r}", flush=True)
