"""Why does icecache lose the last digit of niah_single #1 at 7.5k? (experiment record, issue 17)

Run from the repository root: ``.venv/bin/python docs/results/probes/niah_digit_probe.py``
(output: niah_digit_probe.out with the default token slots; niah_digit_probe_pages_only.out is the
same run before token slots existed, i.e. whole pages only). One dense prefill (the harness's SharedPrefill), the full cache's
greedy answer as reference, then teacher-forced runs with every sparse layer's selection recorded:

1. icecache@256 and oracle@256: log-prob of each reference token;
2. at the step that emits the lost digit, per sparse layer: the exact per-head attention mass over
   the middle tokens, what each policy keeps of it, and where the needle's tokens are;
3. swaps: the oracle run with icecache's token set injected in one layer at that step (which
   layer's selection is responsible?).
"""
import logging
import sys
import time

import numpy as np
import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine import sparse_rows
from icecache_ray.engine.generate import SharedPrefill
from icecache_ray.eval import ruler
from icecache_ray.model import load_model

logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(2)
VARIANT, INDEX, LENGTH, BUDGET = "niah_single", 1, 7680, 256
model, tok = load_model()
sample = ruler.build_sample(tok, VARIANT, LENGTH, ruler.sample_seed(0, VARIANT, LENGTH, INDEX))
t0 = time.time()
shared = SharedPrefill(model, sample.ids)
full = shared.generate(IceCacheConfig(policy="full"), 10, tokenizer=tok)
ref = full.token_ids
print(f"answers={sample.answers} prompt={len(sample.ids)} prefill+full {time.time()-t0:.0f}s full={full.text!r}")
print("reference tokens:", [tok.decode([t]) for t in ref])

# needle value tokens in the prompt
value = sample.answers[0]
needle_ids = tok(" " + value, add_special_tokens=False).input_ids
ids = np.asarray(sample.ids)
starts = [i for i in range(len(ids) - len(needle_ids)) if list(ids[i : i + len(needle_ids)]) == needle_ids]
if not starts:
    needle_ids = tok(value, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids) - len(needle_ids)) if list(ids[i : i + len(needle_ids)]) == needle_ids]
pos = starts[0]
needle = list(range(pos - 4, pos + len(needle_ids) + 2))
print("needle positions", needle, [tok.decode([int(ids[i])]) for i in needle])

record: dict = {}  # (policy, step, layer) -> {"q": [Hq, d], "tokens": [H] arrays}
inject: dict = {}  # (step, layer) -> [H] arrays of middle tokens (oracle run only)
state = {"policy": None, "step": 0}
orig_select_pages, orig_select_tokens = sparse_rows.SparseRows._select_pages, None


def patched_decode(self, step, query, scaling):
    key = (state["policy"], state["step"], self.layer_idx)
    record[key] = {"q": query[0].float().numpy().copy()}
    return orig_decode(self, step, query, scaling)


def patched_select_pages(self, rows, seqs, host_q, stats, step):
    saved = self.publish
    self.publish = True  # ask for the tokens of the chosen pages
    try:
        plan = orig_select_pages(self, rows, seqs, host_q, stats, step)
    finally:
        self.publish = saved
    record[(state["policy"], state["step"], self.layer_idx)]["tokens"] = [t.copy() for t in self.selected[0]]
    return plan


orig_decode = sparse_rows.SparseRows._decode
sparse_rows.SparseRows._decode = patched_decode
sparse_rows.SparseRows._select_pages = patched_select_pages


class Stores:
    """Wraps a layer's stores: records (and on request replaces) the oracle's token picks."""

    def __init__(self, inner, layer):
        self.inner, self.layer = inner, layer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def select_tokens(self, seqs, host_q, k):
        tokens = self.inner.select_tokens(seqs, host_q, k)
        forced = inject.get((state["step"], self.layer))
        if forced is not None:
            tokens = [[np.sort(t)[: k * 16] for t in forced]]
        record[(state["policy"], state["step"], self.layer)]["tokens"] = [t.copy() for t in tokens[0]]
        return tokens


def forced_logprobs(policy: str, cfg: IceCacheConfig) -> list[float]:
    """Teacher-forced log-prob of each reference token (index 0 = the prefill's token)."""
    from icecache_ray.engine.local import LocalEngine
    from icecache_ray.engine.sequence import Sequence
    from icecache_ray.serving_config import EngineConfig

    state["policy"], state["step"] = policy, 0
    seq = Sequence(shared.prompt, len(ref))
    seq.forced = list(ref)
    out = [float(torch.log_softmax(shared.logits.float(), -1)[ref[0]])]
    with LocalEngine(shared.model, cfg, EngineConfig(max_running=1, max_seq_len=seq.max_length)) as engine:
        if cfg.policy == "oracle":
            for layer in engine.runner.sparse:
                layer.stores = Stores(layer.stores, layer.layer_idx)
        engine.want_logits = True
        engine.add_prefilled(seq, shared.keys, shared.values, ref[0])
        while engine.has_work:
            state["step"] += 1
            engine.step()
            if engine.last_logits is None or not len(engine.last_logits):
                continue
            logits = engine.last_logits[0].float()
            out.append(float(torch.log_softmax(logits, -1)[ref[len(out)]]))
            out_top = int(logits.argmax())
            record[(policy, "argmax", state["step"])] = out_top
    return out


ice = IceCacheConfig(budget=BUDGET)
orc = IceCacheConfig(budget=BUDGET, policy="oracle")
lp_ice = forced_logprobs("icecache", ice)
lp_orc = forced_logprobs("oracle", orc)
print("token  logp_icecache  logp_oracle  argmax_icecache argmax_oracle")
for i, t in enumerate(ref):
    ai = record.get(("icecache", "argmax", i), None)
    ao = record.get(("oracle", "argmax", i), None)
    print(f"{tok.decode([t])!r:8} {lp_ice[i]:9.3f} {lp_orc[i]:9.3f}  {tok.decode([ai]) if ai is not None else '-':>6} {tok.decode([ao]) if ao is not None else '-':>6}")
# the step whose output is the lost token: the first where icecache's argmax differs from ref
bad = next(i for i in range(1, len(ref)) if record[("icecache", "argmax", i)] != ref[i])
step = bad  # engine step `bad` consumes ref[bad-1] and predicts ref[bad]
print(f"critical step {step}: input {tok.decode([ref[step-1]])!r} -> want {tok.decode([ref[step]])!r}, "
      f"icecache says {tok.decode([record[('icecache', 'argmax', step)]])!r}")

sink = ice.sink_tokens
layers = sorted(l for (p, s, l) in record if p == "icecache" and s == step and isinstance(l, int))
hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
g = hq // hkv
needle_mid = np.asarray(needle) - sink
print("\nper layer at the critical step: mass = exact softmax mass over the middle tokens (mean over the group)")
print("layer kvh  kept_ice kept_orc  needle_mass  needle_kept_ice needle_kept_orc")
gaps = []
for layer in layers:
    q = record[("icecache", step, layer)]["q"]  # [Hq, d]
    k = shared.keys[layer].float().numpy()  # [H, T, d]
    n_mid = len(ids) - sink - 1  # upper bound; use the prompt middle only
    for h in range(hkv):
        keys = k[h, sink : len(ids) - 32]
        logits = (q[h * g : (h + 1) * g] @ keys.T) / np.sqrt(q.shape[1])
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mass = p.mean(0)
        ti = record[("icecache", step, layer)]["tokens"][h]
        to = record[("oracle", step, layer)]["tokens"][h]
        ti, to = ti[ti < len(mass)], to[to < len(mass)]
        nm = mass[needle_mid].sum()
        ni = mass[np.intersect1d(needle_mid, ti)].sum()
        no = mass[np.intersect1d(needle_mid, to)].sum()
        gaps.append((mass[to].sum() - mass[ti].sum(), layer, h))
        print(f"{layer:5d} {h:3d}  {mass[ti].sum():.3f}    {mass[to].sum():.3f}     {nm:.3f}        {ni:.3f}          {no:.3f}")
print("largest kept-mass gaps (oracle - icecache):", sorted(gaps, reverse=True)[:8])

# swaps: oracle run, icecache's token set in one layer at the critical step
print("\nswap: oracle with icecache's tokens in the listed layers at the critical step -> logp of the wanted token")
ice_tokens = {layer: record[("icecache", step, layer)]["tokens"] for layer in layers}
inject.clear()
inject.update({(step, l): ice_tokens[l] for l in layers})
lp = forced_logprobs("oracle+ice_all", orc)
print(f"  all layers: {lp[step]:.3f} (oracle {lp_orc[step]:.3f}, icecache {lp_ice[step]:.3f})", flush=True)
for layer in layers:
    inject.clear()
    inject[(step, layer)] = ice_tokens[layer]
    lp = forced_logprobs(f"oracle+ice_{layer}", orc)
    print(f"  layer {layer:2d}: {lp[step]:.3f}", flush=True)
