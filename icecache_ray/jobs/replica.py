"""One serving replica of a batch job: a model and its tokenizer, summarizing prepared prompts.

A plain class: the job runs it in-process, or as a Ray actor (``ray.remote`` applied at spawn).
Errors of one document are returned as that document's error, never raised for the batch.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


class Summarizer:
    """Loads the model once; :meth:`summarize` runs greedy generation with the IceCache."""

    def __init__(self, model_path: str | None, config, max_new_tokens: int, threads: int | None = None) -> None:
        import torch

        from icecache_ray.model import load_model

        if threads:
            torch.set_num_threads(threads)
            os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
        self.config = config  # an IceCacheConfig (validated by the driver)
        self.max_new_tokens = max_new_tokens
        self.model, self.tokenizer = load_model(model_path)

    def ready(self) -> bool:
        return True

    def summarize(self, items: list[dict]) -> list[dict]:
        """items: ``{"id", "ids" (prompt token ids)}``. Returns one row per item: the summary and
        its numbers, or ``{"id", "error"}``."""
        from icecache_ray.engine.generate import generate_batch

        t0 = time.perf_counter()
        try:
            results = generate_batch(self.model, [it["ids"] for it in items], self.config, self.max_new_tokens, self.tokenizer)
        except Exception as exc:  # noqa: BLE001 - reported per document, the job goes on
            if len(items) == 1:
                log.warning("document %s failed: %s", items[0]["id"], exc)
                return [{"id": items[0]["id"], "error": f"{type(exc).__name__}: {exc}"}]
            return [row for it in items for row in self.summarize([it])]
        wall = time.perf_counter() - t0
        return [self._row(it, r, wall) for it, r in zip(items, results)]

    def _row(self, item: dict, result, wall: float) -> dict:
        stats = result.stats
        return {
            "id": item["id"],
            "summary": result.text.strip(),
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": len(result.token_ids),
            "wall_s": wall,
            "decode_steps": int(stats.get("steps", 0)),
            "select_ms_per_step": float(stats.get("select_ms_per_step", 0.0)),
            "load_ms_per_step": float(stats.get("load_ms_per_step", 0.0)),
            "attend_ms_per_step": float(stats.get("attend_ms_per_step", 0.0)),
            "pages_loaded": int(stats.get("pages_loaded", 0)),
            "bytes_loaded": int(stats.get("bytes_loaded", 0)),
            "hit_rate": float(stats.get("hit_rate", 1.0)),
        }
