"""Is the long-generation target at 512 (NLL ratio <= 1.01) reachable by selection? The suite's
long-generation part (4 essay texts, 7168-token prompts, the full cache's greedy 512-token
continuation, teacher-forced) under icecache@512 with the fixed beam (the suite's row, run before
``pages_per_slot``), with the default beam, and the exact-token oracle at 512 (not in the suite's
sweep). Run 2026-12-06 from the repository root: ``.venv/bin/python
docs/results/probes/longgen_512_reach.py`` (output: longgen_512_reach.out).
"""
import json
import logging
import time

from icecache_ray.config import BeamRule, IceCacheConfig, IndexConfig
from icecache_ray.eval.suite import run_longgen_texts
from icecache_ray.eval.suite_report import label

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from icecache_ray.model import load_model  # noqa: E402

model, tok = load_model()
runs = [
    ("full", None, IceCacheConfig(policy="full")),
    ("icecache", 512, IceCacheConfig(budget=512)),
    ("icecache-fixed-beam", 512, IceCacheConfig(budget=512, index=IndexConfig(beam=BeamRule(pages_per_slot=0.0)))),
    ("oracle", 512, IceCacheConfig(policy="oracle", budget=512)),
]
t0 = time.time()
rows = run_longgen_texts(model, tok, runs, 7168, 512, 4)
ratios = {}
for policy, budget, _ in runs:
    mine = [r["nll_ratio"] for r in rows if r["policy"] == policy]
    ratios[label(policy, budget)] = {"mean": sum(mine) / len(mine), "per_text": mine}
print(json.dumps({"longgen_ratio": ratios, "wall_s": time.time() - t0}, indent=1))
