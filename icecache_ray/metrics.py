"""Retrieval-quality metrics over exact attention (NumPy only)."""

from __future__ import annotations

import numpy as np


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [H, n] logits (float64 for stable sums)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def attention_mass_recall(probs: np.ndarray, attended: np.ndarray) -> float:
    """Fraction of the full softmax mass on the attended tokens, averaged over heads.

    probs: [H, n] exact attention probabilities; attended: [m] token ids (duplicates ignored).
    """
    ids = np.unique(attended)
    return float(probs[:, ids].sum(axis=1).mean())


def topk_hit_rate(group_mass: np.ndarray, candidates: np.ndarray, selected: np.ndarray, k: int) -> float:
    """Fraction of the exact top-k ``candidates`` (by ``group_mass``) that are in ``selected``.

    group_mass: [n] per-token mass (e.g. averaged over a GQA group); candidates: [c] token ids
    eligible for selection; selected: [s] token ids picked by a policy.
    """
    if len(candidates) == 0 or k <= 0:
        return 1.0
    k = min(k, len(candidates))
    top = candidates[np.argsort(-group_mass[candidates], kind="stable")[:k]]
    return float(np.isin(top, selected).mean())


def percentile_ms(samples_s: list[float], q: float) -> float:
    """q-th percentile of samples given in seconds, in milliseconds (NaN when empty)."""
    return float(np.percentile(np.asarray(samples_s) * 1e3, q)) if samples_s else float("nan")
