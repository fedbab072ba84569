"""Teacher-forced NLL of the full cache's 512-token continuation under index variants, in the
setup of ``python -m icecache_ray.eval longgen --lengths 4096 --new-tokens 512 --seed 0``
(experiment record; ported to the engine API on 2026-12-03, the numbers in the .out are from the run of 2026-12-02). Run 2026-12-02 from the repository root:
``.venv/bin/python docs/results/probes/longgen_index_variants.py`` (output: longgen_index_variants.out).
"""
import time, logging, json
from icecache_ray.config import IceCacheConfig, IndexConfig, BeamRule
from icecache_ray.engine.generate import SharedPrefill
from icecache_ray.haystack import essay_prompt_ids
from icecache_ray.model import load_model
model, tok = load_model()
prompt = essay_prompt_ids(tok, 4096, seed=0)
shared = SharedPrefill(model, prompt[0].tolist())  # one dense prefill for every variant
ref = shared.generate(IceCacheConfig(policy="full"), 512).token_ids
full = shared.nll(IceCacheConfig(policy="full"), ref)
fm = sum(full) / len(full)
print("full", fm, flush=True)
variants = {
    "default": IceCacheConfig(budget=256),
    "p8": IceCacheConfig(budget=256, page_size=8, sink_tokens=32, window_tokens=32),
    "beam_all": IceCacheConfig(budget=256, index=IndexConfig(beam=BeamRule(width=100000))),
    "max_score": IceCacheConfig(budget=256, index=IndexConfig(page_score="max")),
}
for name, cfg in variants.items():
    t0 = time.time()
    nll = shared.nll(cfg, ref)
    m = sum(nll) / len(nll)
    print(f"{name:10s} nll {m:.4f} ratio {m/fm:.4f} first128 {sum(nll[:128])/128:.4f} last128 {sum(nll[-128:])/128:.4f} {time.time()-t0:.0f}s", flush=True)
