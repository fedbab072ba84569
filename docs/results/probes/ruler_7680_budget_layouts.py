"""RULER 7680 on the 20 prompts of ``eval-ruler-7680-n20`` (``--samples 4 --seed 0``) with the
256-token budget split as sink 16 + 13 retrieved pages + window 32 instead of the default
sink 32 + 12 pages + window 32, and the default split on this machine for comparison (experiment
record). Run 2026-12-02 from the repository root:
``.venv/bin/python docs/results/probes/ruler_7680_budget_layouts.py`` (output: ruler_7680_budget_layouts.out).
"""
import logging
from collections import defaultdict

from icecache_ray.config import IceCacheConfig
from icecache_ray.eval import ruler
from icecache_ray.eval.tasks import run_ruler
from icecache_ray.model import load_model

logging.basicConfig(level=logging.INFO, format="%(message)s")
model, tok = load_model()
runs = [
    ("icecache sink32 win32 (default)", 256, IceCacheConfig(budget=256)),
    ("icecache sink16 win32", 256, IceCacheConfig(budget=256, sink_tokens=16, window_tokens=32)),
]
rows = run_ruler(model, tok, runs, [7680], seed=0, variants=list(ruler.VARIANTS), samples=4)
scores = defaultdict(list)
for r in rows:
    scores[r["policy"]].append(r["score"])
    scores[(r["policy"], r["variant"])].append(r["score"])
for key, values in scores.items():
    print(key, round(sum(values) / len(values), 3), len(values), flush=True)
