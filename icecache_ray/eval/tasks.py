"""Task runners of the accuracy harness (each returns one row per trial)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.generate import SharedPrefill, generate_prefilled
from icecache_ray.eval import passkey, ruler

log = logging.getLogger(__name__)


def run_passkey(model, tokenizer, runs, lengths, depths, seed) -> list[dict]:
    rows = []
    for length in lengths:
        keys = passkey.keys_for(seed * 7919 + length, len(depths))
        for depth, key in zip(depths, keys):
            ids = passkey.build_prompt(tokenizer, length, depth, key)
            shared = SharedPrefill(model, ids)  # one dense prefill for every policy
            for policy, budget, cfg in runs:
                result = shared.generate(cfg, 8, tokenizer=tokenizer)
                row = {"task": "passkey", "policy": policy, "budget": budget, "length": length, "prompt_tokens": len(ids), "seed": seed,
                       "score": passkey.score(result.text, key), "depth": depth, "key": key,
                       "generated": result.text, "decode": result.stats}
                rows.append(row)
                log.info("passkey len=%d depth=%.2f %s@%s -> %r (%s)", len(ids), depth, policy, budget, result.text, row["score"])
    return rows


def run_ruler(model, tokenizer, runs, lengths, seed, variants=ruler.VARIANTS, samples=2, batch: int = 8,
              skip: Collection[tuple[int, str, int]] = (), on_group: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """RULER-style trials: ``samples`` prompts per variant and length, each decoded under every run.
    Up to ``batch`` prompts of a variant are prefilled once each and decoded together under each
    configuration (one engine step for all of them; a prompt's tokens do not depend on its batch).

    Prompts go in rounds of ``batch`` per (length, variant), so a run cut short has every variant
    and length about equally far. ``skip``: (length, variant, sample) already done (a resumed
    run); ``on_group``: called with each finished group's rows (the suite saves there)."""
    rows = []
    for first in range(0, samples, batch):
        for length in lengths:
            for variant in variants:
                indices = [i for i in range(first, min(samples, first + batch)) if (length, variant, i) not in skip]
                if indices:
                    group = _ruler_group(model, tokenizer, runs, length, variant, seed, indices)
                    rows += group
                    if on_group is not None:
                        on_group(group)
    return rows


def _ruler_group(model, tokenizer, runs, length: int, variant: str, seed: int, indices: list[int]) -> list[dict]:
    """Rows of the prompts ``indices`` of one (length, variant), prefilled once, decoded together."""
    group = [ruler.build_sample(tokenizer, variant, length, ruler.sample_seed(seed, variant, length, i)) for i in indices]
    prefills = [SharedPrefill(model, sample.ids) for sample in group]  # one dense prefill for every policy
    rows = []
    for policy, budget, cfg in runs:
        results = generate_prefilled(prefills, cfg, ruler.MAX_NEW_TOKENS[variant], tokenizer=tokenizer)
        rows += [_ruler_row(sample, index, variant, length, seed, policy, budget, result)
                 for sample, index, result in zip(group, indices, results)]
    return rows


def _ruler_row(sample, index: int, variant: str, length: int, seed: int, policy: str, budget, result) -> dict:
    row = {"task": "ruler", "policy": policy, "budget": budget, "length": length, "prompt_tokens": len(sample.ids), "seed": seed,
           "score": ruler.score(variant, result.text, sample.answers), "variant": variant, "sample": index,
           "depth": sample.depth, "needle_depths": sample.needle_depths, "query": sample.query,
           "answers": sample.answers, "chat_template": sample.chat_template, "generated": result.text,
           "decode": result.stats}
    log.info("ruler %s len=%d #%d %s@%s -> %r (%.2f)", variant, len(sample.ids), index, policy, budget, result.text, row["score"])
    return row


def run_longgen(model, tokenizer, runs, lengths, new_tokens, seed) -> list[dict]:
    """Greedy agreement with the full cache and teacher-forced NLL of the full continuation."""
    from icecache_ray.haystack import essay_prompt_ids

    rows = []
    for length in lengths:
        prompt = essay_prompt_ids(tokenizer, length, seed=seed)
        shared = SharedPrefill(model, prompt[0].tolist())  # one dense prefill for every policy
        full = IceCacheConfig(policy="full")
        reference = shared.generate(full, new_tokens).token_ids
        full_nll = shared.nll(full, reference)
        for policy, budget, cfg in runs:
            t0 = time.perf_counter()
            ours = shared.generate(cfg, new_tokens).token_ids
            agree = sum(a == b for a, b in zip(ours, reference)) / len(reference)
            nll = shared.nll(cfg, reference)
            q = min(128, len(nll))
            row = {"task": "longgen", "policy": policy, "budget": budget, "length": length, "prompt_tokens": int(prompt.shape[1]), "seed": seed,
                   "score": agree, "new_tokens": len(reference), "nll": sum(nll) / len(nll),
                   "nll_full": sum(full_nll) / len(full_nll), "nll_ratio": (sum(nll) / len(nll)) / (sum(full_nll) / len(full_nll)),
                   "nll_first128": sum(nll[:q]) / q, "nll_last128": sum(nll[-q:]) / q,
                   "nll_full_first128": sum(full_nll[:q]) / q, "nll_full_last128": sum(full_nll[-q:]) / q,
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            log.info("longgen len=%d %s@%s agreement=%.3f nll ratio=%.4f", length, policy, budget, agree, row["nll_ratio"])
    return rows

