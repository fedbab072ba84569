"""niah_single #5 at 7.5k (issue 17): which selections answer 8075319? (experiment record)

Run from the repository root: ``.venv/bin/python docs/results/probes/niah5_digit_configs.py``
(output: niah5_digit_configs.out). In the final suite icecache answered " 807531." at 256, 512
and 1024 while oracle@256 kept " 8075319.". One shared dense prefill; per configuration the greedy
answer and, teacher-forced on the full cache's answer, the probabilities of the right last digit
and of '.' at the step that emits it.
"""
import logging
import sys

import torch

from icecache_ray.config import BeamRule, IceCacheConfig, IndexConfig
from icecache_ray.engine.generate import SharedPrefill
from icecache_ray.engine.sequence import Sequence
from icecache_ray.eval import ruler
from icecache_ray.model import load_model

logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(2)
INDEX = int(sys.argv[1]) if len(sys.argv) > 1 else 5
model, tok = load_model()
s = ruler.build_sample(tok, "niah_single", 7680, ruler.sample_seed(0, "niah_single", 7680, INDEX))
shared = SharedPrefill(model, s.ids)
ref = shared.generate(IceCacheConfig(policy="full"), 10, tokenizer=tok).token_ids
print("reference tokens:", [tok.decode([t]) for t in ref])
dot = tok(".", add_special_tokens=False).input_ids[0]
STEP = next(k for k in range(1, len(ref)) if ref[k] == dot) - 1  # the step whose logits emit the last digit
beam_all = IndexConfig(beam=BeamRule(width=1e6))
configs = {
    "full": IceCacheConfig(policy="full"),
    "oracle@128": IceCacheConfig(budget=128, policy="oracle"),
    "oracle@256": IceCacheConfig(budget=256, policy="oracle"),
    "oracle@1024": IceCacheConfig(budget=1024, policy="oracle"),
    "quest@2048": IceCacheConfig(budget=2048, policy="quest"),
    "icecache@256": IceCacheConfig(budget=256),
    "icecache@1024": IceCacheConfig(budget=1024),
    "icecache@1024 pages only": IceCacheConfig(budget=1024, token_pages=0),
    "icecache@1024 beam all": IceCacheConfig(budget=1024, index=beam_all),
    "icecache@2048": IceCacheConfig(budget=2048),
    "icecache@4096": IceCacheConfig(budget=4096),
    "icecache@8192 (every page)": IceCacheConfig(budget=8192),
    "icecache@1024 n_full_layers=0": IceCacheConfig(budget=1024, n_full_layers=0),
}
print(f"answers={s.answers} step={STEP}")
for name, cfg in configs.items():
    text = shared.generate(cfg, 12, tokenizer=tok).text
    probs = []
    seq = Sequence(shared.prompt, len(ref))
    seq.forced = list(ref)
    shared._run(cfg, seq, lambda logits: probs.append(torch.softmax(logits.float(), -1)))
    p = probs[STEP - 1]  # step k's logits predict ref[k + 1]
    print(f"{name:32s} {ruler.score('niah_single', text, s.answers):.0f} {text[:24]!r:28} "
          f"p(digit)={float(p[ref[STEP]]):.3f} p('.')={float(p[dot]):.3f}", flush=True)
