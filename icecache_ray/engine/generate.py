"""``icecache_ray.generate``: greedy generation with the IceCache on a stock transformers model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.cache import IceCache


@dataclass
class GenerationResult:
    """token_ids: generated ids (prompt excluded); text: decoded when a tokenizer was given;
    prompt_tokens: length after any truncation; truncated: middle-truncated?; stats: per-request
    StepStats summary plus wall times."""

    token_ids: list[int]
    text: str | None
    prompt_tokens: int
    truncated: bool
    stats: dict = field(default_factory=dict)


def middle_truncate(ids: list[int], limit: int) -> list[int]:
    """Keep the first and last ``limit // 2`` tokens (LongBench-style middle truncation)."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


def prepare_prompt(model, prompt_ids, max_new_tokens: int, truncate: bool) -> tuple[list[int], bool]:
    """Validate the prompt before any work: non-empty, fits the context (or opt-in truncation)."""
    ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise ValueError(f"prompt_ids: one prompt at a time here, got a batch of {len(ids)}")
        ids = ids[0]
    if not ids:
        raise ValueError("prompt_ids: the prompt is empty")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    context = model.config.max_position_embeddings
    limit = context - max_new_tokens
    if limit <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in the model's {context}-token context")
    if len(ids) > limit:
        if not truncate:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                f"{context}-token context; pass truncate=True for middle truncation"
            )
        return middle_truncate(ids, limit), True
    return ids, False


def generate(
    model,
    prompt_ids,
    config: IceCacheConfig | None = None,
    max_new_tokens: int = 64,
    tokenizer=None,
    eos_token_id: int | None = None,
    truncate: bool = False,
) -> GenerationResult:
    """Greedy generation of ``max_new_tokens`` after ``prompt_ids`` ([T] or [1, T]) with the
    configured policy and budget. The model's attention implementation is restored afterwards."""
    config = config or IceCacheConfig()
    ids, truncated = prepare_prompt(model, prompt_ids, max_new_tokens, truncate)
    previous = model.config._attn_implementation
    cache = IceCache(model, config)
    input_ids = torch.tensor([ids], device=model.device)
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
            )
        wall = time.perf_counter() - t0
        stats = cache.stats.summary() if cache.stats is not None else {}
    finally:
        cache.close()
        model.set_attn_implementation(previous)
    new = out[0, len(ids) :].tolist()
    stats.update({"wall_s": wall, "generated_tokens": len(new)})
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return GenerationResult(token_ids=new, text=text, prompt_tokens=len(ids), truncated=truncated, stats=stats)
