"""Teacher-forced NLL of the full cache's 512-token continuation under index variants, in the
setup of ``python -m icecache_ray.eval longgen --lengths 4096 --new-tokens 512 --seed 0``
(experiment record). Run 2026-12-02 from the repository root:
``.venv/bin/python docs/results/probes/longgen_index_variants.py`` (output: longgen_index_variants.out).
"""
import time, logging, json
from transformers import DynamicCache
from icecache_ray.config import IceCacheConfig, IndexConfig, BeamRule, PoolConfig
from icecache_ray.engine.cache import IceCache
from icecache_ray.engine.generate import generate
from icecache_ray.eval.tasks import _teacher_forced_nll
from icecache_ray.haystack import essay_prompt_ids
from icecache_ray.model import load_model
model, tok = load_model()
prompt = essay_prompt_ids(tok, 4096, seed=0)
ref = generate(model, prompt, IceCacheConfig(policy="full"), max_new_tokens=512).token_ids
full = _teacher_forced_nll(model, prompt, ref, DynamicCache(config=model.config))
fm = sum(full) / len(full)
print("full", fm, flush=True)
variants = {
    "default": IceCacheConfig(budget=256),
    "p8": IceCacheConfig(budget=256, page_size=8, sink_tokens=32, window_tokens=32, pool=PoolConfig(capacity_pages=1 << 17)),
    "beam_all": IceCacheConfig(budget=256, index=IndexConfig(beam=BeamRule(width=100000))),
    "max_score": IceCacheConfig(budget=256, index=IndexConfig(page_score="max")),
}
for name, cfg in variants.items():
    t0 = time.time()
    cache = IceCache(model, cfg)
    try:
        nll = _teacher_forced_nll(model, prompt, ref, cache)
    finally:
        cache.close(); model.set_attn_implementation("sdpa")
    m = sum(nll) / len(nll)
    print(f"{name:10s} nll {m:.4f} ratio {m/fm:.4f} first128 {sum(nll[:128])/128:.4f} last128 {sum(nll[-128:])/128:.4f} {time.time()-t0:.0f}s", flush=True)
