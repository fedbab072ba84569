"""Does decoding a RULER group's prompts together pay? (experiment record, issue 17)

Run from the repository root: ``.venv/bin/python docs/results/probes/ruler_batched_decode.py``
(output: ruler_batched_decode.out). Same 4 niah_single prompts at 4096 tokens, full / icecache@256 /
quest@256, ``run_ruler`` with batch 1 (each prompt decoded alone) and batch 4 (together); the
prefills are timed apart from the decoding; the generated texts must be equal.
"""
import logging
import time

import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine import generate as G
from icecache_ray.eval.tasks import run_ruler
from icecache_ray.model import load_model

logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(2)
model, tok = load_model()
runs = [("full", None, IceCacheConfig(policy="full")), ("icecache", 256, IceCacheConfig(budget=256)),
        ("quest", 256, IceCacheConfig(budget=256, policy="quest"))]
decode_s = {}
original = G.generate_prefilled


def timed(*args, **kwargs):
    t0 = time.perf_counter()
    out = original(*args, **kwargs)
    decode_s[current] = decode_s.get(current, 0.0) + time.perf_counter() - t0
    return out


import icecache_ray.eval.tasks as T

T.generate_prefilled = timed
texts = {}
for current in (1, 4):
    t0 = time.perf_counter()
    rows = run_ruler(model, tok, runs, [4096], 0, ["niah_single"], samples=4, batch=current)
    texts[current] = [(r["policy"], r["sample"], r["generated"]) for r in sorted(rows, key=lambda r: (r["policy"], r["sample"]))]
    print(f"batch {current}: wall {time.perf_counter() - t0:.1f} s, decoding {decode_s[current]:.1f} s", flush=True)
print("same texts:", texts[1] == texts[4])
print(f"decode speedup batch 4 vs 1: {decode_s[1] / decode_s[4]:.2f}")
