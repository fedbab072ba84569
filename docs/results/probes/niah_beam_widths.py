"""niah_single #5 and #1 at 7.5k (issue 17): does the beam's candidate set decide the last digit?

Run from the repository root:
``.venv/bin/python docs/results/probes/niah_beam_widths.py [INDEX [BUDGETS [WIDTHS [PAGES_PER_SLOT]]]]``
(comma lists; output: niah_beam_widths_<INDEX>*.out). Per budget, level-1 beam width and
``BeamRule.pages_per_slot`` (0: the fixed beam before the fix), the greedy answer and,
teacher-forced on the full cache's answer, p(right last digit) and p('.') at the step that emits it.
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
BUDGETS = [int(b) for b in sys.argv[2].split(",")] if len(sys.argv) > 2 else [256, 1024]
WIDTHS = [float(w) for w in sys.argv[3].split(",")] if len(sys.argv) > 3 else [16, 32, 64, 1e6]
PER_SLOT = [float(w) for w in sys.argv[4].split(",")] if len(sys.argv) > 4 else [0.0]
model, tok = load_model()
s = ruler.build_sample(tok, "niah_single", 7680, ruler.sample_seed(0, "niah_single", 7680, INDEX))
shared = SharedPrefill(model, s.ids)
ref = shared.generate(IceCacheConfig(policy="full"), 10, tokenizer=tok).token_ids
dot = tok(".", add_special_tokens=False).input_ids[0]
STEP = next(k for k in range(1, len(ref)) if ref[k] == dot) - 1
print(f"#{INDEX} answers={s.answers} reference={tok.decode(ref)!r} step={STEP}", flush=True)
for budget in BUDGETS:
    for width, per_slot in [(w, r) for w in WIDTHS for r in PER_SLOT]:
        cfg = IceCacheConfig(budget=budget, index=IndexConfig(beam=BeamRule(width=width, pages_per_slot=per_slot)))
        text = shared.generate(cfg, 12, tokenizer=tok).text
        probs = []
        seq = Sequence(shared.prompt, len(ref))
        seq.forced = list(ref)
        shared._run(cfg, seq, lambda logits: probs.append(torch.softmax(logits.float(), -1)))
        p = probs[STEP - 1]
        print(f"icecache@{budget:<5d} beam width {width:<9g} pages/slot {per_slot:<3g} {ruler.score('niah_single', text, s.answers):.0f} "
              f"{text[:24]!r:28} p(digit)={float(p[ref[STEP]]):.3f} p('.')={float(p[dot]):.3f}", flush=True)
