"""niah_single #1 at 7.5k (issue 17): which selections answer 1382631? (experiment record)

Run from the repository root: ``.venv/bin/python docs/results/probes/niah_digit_configs.py``
(output: niah_digit_configs.out). One shared dense prefill; per configuration the greedy answer and,
teacher-forced on the full cache's answer, the probabilities of '1' (right) and '.' (what icecache
said) at the step that emits the last digit.
"""
import logging

import torch

from icecache_ray.config import BeamRule, IceCacheConfig, IndexConfig
from icecache_ray.engine.generate import SharedPrefill
from icecache_ray.eval import ruler
from icecache_ray.model import load_model

logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(2)
model, tok = load_model()
s = ruler.build_sample(tok, "niah_single", 7680, ruler.sample_seed(0, "niah_single", 7680, 1))
shared = SharedPrefill(model, s.ids)
ref = shared.generate(IceCacheConfig(policy="full"), 10, tokenizer=tok).token_ids
dot = tok(".", add_special_tokens=False).input_ids[0]
STEP = 7  # ref[7] is the last digit '1'
beam_all = IndexConfig(beam=BeamRule(width=1e6))
configs = {
    "full": IceCacheConfig(policy="full"),
    "oracle@256": IceCacheConfig(budget=256, policy="oracle"),
    "icecache@256 pages only (paper)": IceCacheConfig(budget=256, token_pages=0),
    "icecache@256 token_pages=4 (default)": IceCacheConfig(budget=256),
    "icecache@256 token_pages=8": IceCacheConfig(budget=256, token_pages=8),
    "icecache@256 token_pages=11": IceCacheConfig(budget=256, token_pages=11),
    "icecache@256 token_pages=11, beam all": IceCacheConfig(budget=256, token_pages=11, index=beam_all),
    "icecache@384 default": IceCacheConfig(budget=384),
    "icecache@512 default": IceCacheConfig(budget=512),
    "icecache@512 pages only": IceCacheConfig(budget=512, token_pages=0),
}
print(f"answers={s.answers}")
for name, cfg in configs.items():
    text = shared.generate(cfg, 16, tokenizer=tok).text
    probs = {}

    def grab(logits, _probs=probs):
        _probs[len(_probs) + 1] = torch.softmax(logits.float(), -1)

    # teacher forcing with a logits hook: SharedPrefill.nll's callback sees each step's logits
    from icecache_ray.engine.sequence import Sequence

    seq = Sequence(shared.prompt, len(ref))
    seq.forced = list(ref)
    shared._run(cfg, seq, grab)
    p = probs[STEP]
    print(f"{name:40s} {ruler.score('niah_single', text, s.answers):.0f} {text[:24]!r:28} "
          f"p('1')={float(p[ref[STEP]]):.3f} p('.')={float(p[dot]):.3f}", flush=True)
