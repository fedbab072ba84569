"""Teacher-forced NLL of the full cache's 512-token continuation for other splits of the 256-token
budget (sink / retrieved / window) and for larger budgets, in the setup of ``python -m
icecache_ray.eval longgen --lengths 4096 --new-tokens 512 --seed 0`` (experiment record). Run
2026-12-02 from the repository root: ``.venv/bin/python docs/results/probes/longgen_budget_layouts.py``
(output: longgen_budget_layouts.out).
"""
import time


from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.generate import SharedPrefill
from icecache_ray.haystack import essay_prompt_ids
from icecache_ray.model import load_model

model, tok = load_model()
prompt = essay_prompt_ids(tok, 4096, seed=0)
shared = SharedPrefill(model, prompt[0].tolist())  # one dense prefill for every variant
ref = shared.generate(IceCacheConfig(policy="full"), 512).token_ids
full = shared.nll(IceCacheConfig(policy="full"), ref)
full_mean = sum(full) / len(full)
print("full", full_mean, flush=True)
variants = {
    "icecache@256 sink32 win32 (default, 12 pages)": IceCacheConfig(budget=256),
    "icecache@256 sink16 win32 (13 pages)": IceCacheConfig(budget=256, sink_tokens=16, window_tokens=32),
    "icecache@256 sink16 win16 (14 pages)": IceCacheConfig(budget=256, sink_tokens=16, window_tokens=16),
    "oracle@256 sink16 win16 (224 tokens)": IceCacheConfig(budget=256, sink_tokens=16, window_tokens=16, policy="oracle"),
    "icecache@384 (20 pages)": IceCacheConfig(budget=384),
    "icecache@512 (28 pages)": IceCacheConfig(budget=512),
}
for name, cfg in variants.items():
    t0 = time.time()
    nll = shared.nll(cfg, ref)
    mean = sum(nll) / len(nll)
    print(f"{name}: nll {mean:.4f} ratio {mean / full_mean:.4f} ({time.time() - t0:.0f} s)", flush=True)
