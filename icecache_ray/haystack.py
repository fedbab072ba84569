"""Prompts built from the offline data in ``../shared/data`` (RULER's Paul Graham essays).

The data folder is ``<project root>/../shared/data``, or ``$ICECACHE_DATA_DIR`` when set.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DATA_ENV = "ICECACHE_DATA_DIR"
ESSAYS = Path("ruler") / "PaulGrahamEssays.json"
_CHARS_PER_TOKEN_BOUND = 8  # English BPE averages ~4 chars/token; 8 leaves a 2x margin


def data_dir() -> Path:
    """``$ICECACHE_DATA_DIR`` or ``<project>/../shared/data``; FileNotFoundError if missing."""
    env = os.environ.get(DATA_ENV)
    folder = Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"offline data folder {str(folder)!r} not found (set ${DATA_ENV} to its location)")
    return folder


@lru_cache(maxsize=4)
def _essays_at(path: Path) -> str:
    """Text of the essay file at ``path`` (cached per path)."""
    if not path.is_file():
        raise FileNotFoundError(f"essay haystack {str(path)!r} not found")
    return json.loads(path.read_text(encoding="utf-8"))["text"]


def load_essays() -> str:
    """Text of RULER's Paul Graham essay haystack (``ruler/PaulGrahamEssays.json``, ~3.0M chars)."""
    return _essays_at(data_dir() / ESSAYS)


def essay_prompt_ids(tokenizer: PreTrainedTokenizerBase, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """A raw prompt (no chat template) of exactly ``n_tokens`` token ids from the essays.

    The text starts at a character offset drawn from ``seed`` (deterministic) and is tokenized
    with the tokenizer's default special-token handling (SmolLM2 adds no BOS), then cut to
    ``n_tokens``. Returns a long tensor ``[1, n_tokens]``.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens!r}: must be a positive int")
    text = load_essays()
    start = int(np.random.default_rng(seed).integers(0, len(text) // 2))
    ids = tokenizer(text[start : start + _CHARS_PER_TOKEN_BOUND * n_tokens + 64])["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"n_tokens={n_tokens}: the essay haystack is too short for this length (got {len(ids)} tokens)")
    log.debug("essay prompt: %d tokens from char offset %d (seed %d)", n_tokens, start, seed)
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)
