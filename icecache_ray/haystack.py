"""Prompts built from the offline data in ``../shared/data`` (RULER essays)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np


def data_dir() -> Path:
    """``$ICECACHE_DATA_DIR`` or ``<project>/../shared/data``."""
    env = os.environ.get("ICECACHE_DATA_DIR")
    folder = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"offline data folder {folder} not found (set ICECACHE_DATA_DIR)")
    return folder


@lru_cache(maxsize=1)
def load_essays() -> str:
    """Text of RULER's Paul Graham essay haystack."""
    path = data_dir() / "ruler" / "PaulGrahamEssays.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())["text"]


def essay_prompt_ids(tokenizer, n_tokens: int, seed: int = 0):
    """A raw (no chat template) prompt of exactly ``n_tokens`` token ids from the essays, starting
    at a seed-chosen offset. Returns a torch tensor [1, n_tokens]."""
    import torch

    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens}: must be positive")
    text = load_essays()
    start = int(np.random.default_rng(seed).integers(0, len(text) // 2))
    ids = tokenizer(text[start : start + 8 * n_tokens + 64], add_special_tokens=True)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"n_tokens={n_tokens}: the essay haystack is too short for this length")
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)
