"""The local job's engine (``--engine local``): the continuous-batching engine in this process.

The adapter only turns job items (``{"id", "ids", ...}``) into sequences and ended sequences back
into result rows, and says how much work it can take in (``capacity``) so the job feeds documents
as rows free up instead of queueing all of them. (``--engine ray`` runs the same engine inside
Ray Data actors: :mod:`icecache_ray.jobs.pipeline`.)
"""

from __future__ import annotations

import logging

from icecache_ray.data.inflight import TokenMeter
from icecache_ray.engine.sequence import Sequence

log = logging.getLogger(__name__)


def result_row(item: dict, seq: Sequence, tokenizer) -> dict:
    """The output row of a finished document, or ``{"id", "error"}``."""
    if seq.error:
        return {"id": item["id"], "error": seq.error}
    return {
        "id": item["id"],
        "summary": tokenizer.decode(seq.output, skip_special_tokens=True).strip(),
        "prompt_tokens": seq.prompt_len,
        "generated_tokens": len(seq.output),
        **seq.stats.columns(),
    }


class LocalJobEngine:
    """The local engine in the driver process (no Ray)."""

    name = "local"

    def __init__(self, model_path, ice, engine_cfg, max_new_tokens: int, threads: int | None) -> None:
        import torch

        from icecache_ray.engine.local import LocalEngine
        from icecache_ray.model import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(model_path)
        self.engine = LocalEngine(self.model, ice, engine_cfg)
        self.max_new_tokens = max_new_tokens
        self.items: dict[str, tuple[dict, Sequence]] = {}
        self.meter = TokenMeter()

    @property
    def capacity(self) -> int:
        """Documents worth having queued: the rows, twice (one waiting behind each running)."""
        return 2 * self.engine.rows

    def submit(self, item: dict) -> None:
        seq = Sequence(item["ids"], self.max_new_tokens, self.tokenizer.eos_token_id)
        self.engine.add(seq)
        self.items[seq.seq_id] = (item, seq)
        self.meter.add(seq)

    @property
    def in_flight(self) -> int:
        return len(self.items)

    def step(self) -> list[dict]:
        """One engine step; the rows of the documents that ended in it."""
        ended = self.engine.step()
        for seq in ended:
            self.meter.ended(seq)
        return [result_row(*self.items.pop(s.seq_id), self.tokenizer) for s in ended]

    def work(self) -> tuple[int, int]:
        """(prompt tokens prefilled, tokens generated) so far, for the job's progress."""
        return self.meter.totals()

    def runtime_shape(self) -> dict:
        return {"engine": "local", "replicas": 1, "stages": 1, "index_mode": "in_process", "stage_workers": 0, "index_actors": 0,
                "max_running": self.engine.rows}

    def shutdown(self) -> None:
        self.engine.close()
