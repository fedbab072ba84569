"""Inputs of the retrieval benchmark: real SmolLM2 keys/queries and synthetic clustered keys."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from icecache_ray.capture import CapturedQK

log = logging.getLogger(__name__)


@dataclass
class RealWorkload:
    """A :class:`CapturedQK` (keys [layer][n_kv, T, d], queries [layer][n_q, n_pos, d]) plus the
    prefill timings of the run that produced it."""

    captured: "CapturedQK"
    prefill_s: float  # wall time of the whole chunked prefill
    layer_prefill_s: dict[int, float]  # wall time spent inside each captured decoder layer

    @property
    def keys(self) -> dict[int, np.ndarray]:
        return self.captured.keys

    @property
    def positions(self) -> np.ndarray:
        return self.captured.query_positions

    @property
    def n_kv_heads(self) -> int:
        return self.captured.n_kv_heads

    @property
    def seq_len(self) -> int:
        return self.captured.seq_len

    def group(self, layer: int, kv_head: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys [T, d], queries [H_group, n_pos, d]) of one KV head."""
        g = self.captured.n_q_heads // self.captured.n_kv_heads
        return self.captured.keys[layer][kv_head], self.captured.queries[layer][kv_head * g : (kv_head + 1) * g]


def capture_real(length: int, layers: list[int], n_queries: int, model_path: str | None, seed: int) -> RealWorkload:
    """Run SmolLM2 over an essay prompt of ``length`` tokens and capture keys/queries."""
    import torch

    from icecache_ray.capture import capture_qk
    from icecache_ray.haystack import essay_prompt_ids
    from icecache_ray.model import load_model

    torch.manual_seed(seed)
    model, tokenizer = load_model(model_path)
    ids = essay_prompt_ids(tokenizer, length, seed=seed)
    timers = _layer_timers(model, layers)
    positions = list(range(length - n_queries, length))
    t0 = time.perf_counter()
    try:
        captured = capture_qk(model, ids, layers=layers, query_positions=positions)
    finally:
        for handle in timers.pop("_handles"):
            handle.remove()
    prefill_s = time.perf_counter() - t0
    log.info("captured %d layers of a %d-token prompt in %.1f s", len(layers), length, prefill_s)
    return RealWorkload(captured=captured, prefill_s=prefill_s, layer_prefill_s={layer: timers[layer][0] for layer in layers})


def _layer_timers(model, layers: list[int]) -> dict:
    """Forward hooks that add up the wall time spent inside each listed decoder layer."""
    timers: dict = {layer: [0.0, 0.0] for layer in layers}
    handles = []
    for layer in layers:
        module = model.model.layers[layer]

        def pre(_m, _a, _kw=None, layer=layer):
            timers[layer][1] = time.perf_counter()

        def post(_m, _a, _o, layer=layer):
            timers[layer][0] += time.perf_counter() - timers[layer][1]

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    timers["_handles"] = handles
    return timers


@dataclass
class SyntheticWorkload:
    """Clustered keys [N, d] and queries [n_q, d] aimed at random clusters."""

    keys: np.ndarray
    queries: np.ndarray


def make_synthetic(
    n: int, dim: int = 128, n_queries: int = 64, mean_cluster: int = 256, mean_sub: int = 24, seed: int = 0
) -> SyntheticWorkload:
    """Two-level cluster structure, like real keys (topics, and phrases within a topic).

    ~n/mean_cluster centres (random directions, norms 4-8, sizes geometric around
    ``mean_cluster``); inside each, sub-clusters of ~``mean_sub`` tokens offset by norm ~1.5, plus
    isotropic noise of norm ~0.5. A query points (norm 8, noise ~0.5) at one random token's
    sub-cluster direction, so its exact top tokens sit in a few sub-clusters of one cluster.
    """
    rng = np.random.default_rng(seed)
    n_centres = max(1, n // mean_cluster)
    centres = _unit_rows(rng, n_centres, dim) * rng.uniform(4.0, 8.0, (n_centres, 1)).astype(np.float32)
    weights = rng.geometric(1.0 / 3.0, n_centres).astype(np.float64)
    owner = rng.choice(n_centres, size=n, p=weights / weights.sum())
    n_subs = max(1, n // mean_sub)
    sub_owner = np.sort(owner[rng.integers(0, n, n_subs)])  # sub-clusters spread like tokens
    sub_centres = centres[sub_owner] + _unit_rows(rng, n_subs, dim) * 1.5
    # each token joins a random sub-cluster of its own cluster (or its centre if it has none)
    first = np.searchsorted(sub_owner, owner, "left")
    count = np.searchsorted(sub_owner, owner, "right") - first
    pick = np.where(count > 0, first + (rng.random(n) * np.maximum(count, 1)).astype(np.int64), -1)
    keys = np.empty((n, dim), np.float32)
    for start in range(0, n, 1 << 16):  # chunked to keep temporaries small at N = 1M
        sl = slice(start, start + (1 << 16))
        base = np.where(pick[sl, None] >= 0, sub_centres[np.maximum(pick[sl], 0)], centres[owner[sl]])
        keys[sl] = base + rng.standard_normal((len(base), dim)).astype(np.float32) * (0.5 / np.sqrt(dim))
    target = keys[rng.integers(0, n, n_queries)]
    queries = 8.0 * target / np.linalg.norm(target, axis=1, keepdims=True)
    queries += rng.standard_normal(queries.shape).astype(np.float32) * (0.5 / np.sqrt(dim))
    return SyntheticWorkload(keys=keys, queries=queries.astype(np.float32))


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


LONGDOCS = ("kjv_bible.txt", "jargon_file_4.4.7.txt", "tinyshakespeare.txt")


def long_documents(tokenizer, n: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` summarization prompts (the job's chat prompt) of ``min_tokens``..``max_tokens`` tokens,
    each around a different slice of the public-domain texts in ``../shared/data/longdocs``
    (documents taken round-robin from the three texts, at spread-out offsets)."""
    from icecache_ray.haystack import data_dir
    from icecache_ray.jobs.prompts import DEFAULT_INSTRUCTION, chat_prompt

    rng = np.random.default_rng(seed)
    texts = [(data_dir() / "longdocs" / name).read_text(encoding="utf-8", errors="replace") for name in LONGDOCS]
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        target = int(rng.integers(min_tokens, max_tokens + 1))
        chars = target * 6  # more than enough characters; the prompt is cut to ``target`` tokens
        start = (i // len(texts)) * len(text) // max(1, -(-n // len(texts)))
        piece = text[start : start + chars]
        out.append(chat_prompt(tokenizer, piece, DEFAULT_INSTRUCTION, target).ids)
    return out


def random_documents(n: int, min_tokens: int, max_tokens: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of uniformly random token ids, ``min_tokens``..``max_tokens`` long (the same
    lengths as :func:`long_documents` would draw with ``seed``), for random-weight timing runs."""
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(min_tokens, max_tokens + 1)) for _ in range(n)]
    ids = np.random.default_rng(seed + 1)
    return [ids.integers(0, vocab_size, size=length).tolist() for length in lengths]

