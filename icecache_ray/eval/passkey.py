"""Passkey retrieval, the reference protocol: raw prompt (no chat template), repeated filler, the
key sentence at a given depth, then "What is the pass key? The pass key is"; exact match."""

from __future__ import annotations

import re

import numpy as np

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def passkey_text(n_chars: int, depth: float, key: int) -> str:
    """The prompt text with ``n_chars`` characters of filler split at ``depth``."""
    filler = FILLER * (n_chars // len(FILLER) + 2)
    prefix, suffix = filler[: int(n_chars * depth)], filler[: n_chars - int(n_chars * depth)]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return "\n".join([TASK, prefix, needle, suffix]) + QUESTION


def build_prompt(tokenizer, n_tokens: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt of about ``n_tokens`` tokens (never more)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be within [0, 1]")
    chars = 4 * n_tokens
    for _ in range(8):  # shrink the filler until the prompt fits
        ids = tokenizer(passkey_text(chars, depth, key))["input_ids"]
        if len(ids) <= n_tokens:
            return ids
        chars = int(chars * n_tokens / len(ids) * 0.98)
    raise ValueError(f"could not build a passkey prompt of {n_tokens} tokens")


def score(generated: str, key: int) -> float:
    """1.0 when the first number in the generation is the key."""
    match = re.search(r"\d+", generated)
    return float(match is not None and int(match.group()) == key)


def keys_for(seed: int, n: int) -> list[int]:
    return [int(k) for k in np.random.default_rng(seed).integers(1, 50000, n)]
