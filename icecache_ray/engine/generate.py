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


def prepare_prompts(model, prompts, max_new_tokens: int, truncate: bool) -> list[tuple[list[int], bool]]:
    """Validate a non-empty list of prompts (see :func:`prepare_prompt`); errors name the prompt."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    prepared = []
    for i, p in enumerate(prompts):
        try:
            prepared.append(prepare_prompt(model, p, max_new_tokens, truncate))
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}") from None
    return prepared


def prepare_prompt(model, prompt_ids, max_new_tokens: int, truncate: bool) -> tuple[list[int], bool]:
    """Validate one prompt before any work: non-empty, fits the context (or opt-in truncation)."""
    ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise ValueError(f"prompt_ids: one prompt here, got a batch of {len(ids)} (use generate_batch)")
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


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


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
    return generate_batch(model, [prompt_ids], config, max_new_tokens, tokenizer, eos_token_id, truncate)[0]


def generate_batch(
    model,
    prompts: list,
    config: IceCacheConfig | None = None,
    max_new_tokens: int = 64,
    tokenizer=None,
    eos_token_id: int | None = None,
    truncate: bool = False,
) -> list[GenerationResult]:
    """Greedy generation for several prompts of any lengths in one batch (left padding; each
    sequence has its own sink, window, stores and slots, so results equal one-by-one runs).
    Every prompt is validated before any work. ``stats`` are the batch's (shared by its results)."""
    prepared = prepare_prompts(model, prompts, max_new_tokens, truncate)
    config = config or IceCacheConfig()
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    pad = eos if eos is not None else 0
    input_ids, mask = left_padded([ids for ids, _ in prepared], pad)
    previous = model.config._attn_implementation
    cache = IceCache(model, config)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids.to(model.device), attention_mask=mask.to(model.device), cache=cache,
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
        wall = time.perf_counter() - t0
        stats = cache.stats.summary() if cache.stats is not None else {}
    finally:
        cache.close()
        model.set_attn_implementation(previous)
    results = []
    for b, (ids, truncated) in enumerate(prepared):
        new = _until_eos(out[b, input_ids.shape[1] :].tolist(), eos)
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
        row_stats = dict(stats, wall_s=wall, generated_tokens=len(new), batch_size=len(prepared))
        results.append(GenerationResult(token_ids=new, text=text, prompt_tokens=len(ids), truncated=truncated, stats=row_stats))
    return results


class SharedPrefill:
    """One dense prefill of a prompt [T], reused by several configurations (every policy's prefill
    is dense attention over the same prompt, so the K/V and the first logits are the same)."""

    def __init__(self, model, prompt_ids: list[int]) -> None:
        from transformers import DynamicCache

        self.model = model
        self.prompt_tokens = len(prompt_ids)
        cache = DynamicCache()
        with torch.inference_mode():
            self.logits = model(torch.tensor([prompt_ids], device=model.device), cache=cache, use_cache=True).logits[:, -1]
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]

    def generate(self, config: IceCacheConfig, max_new_tokens: int, tokenizer=None, eos_token_id: int | None = None) -> GenerationResult:
        """Greedy decoding from the shared prefill with ``config``: the same tokens as
        :func:`generate` on the same prompt."""
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        previous = self.model.config._attn_implementation
        cache = IceCache(self.model, config)
        t0 = time.perf_counter()
        try:
            cache.load_prefill(self.keys, self.values)
            new = _greedy(self.model, cache, self.logits, max_new_tokens, eos)
            stats = cache.stats.summary() if cache.stats is not None else {}
        finally:
            cache.close()
            self.model.set_attn_implementation(previous)
        stats.update({"wall_s": time.perf_counter() - t0, "generated_tokens": len(new)})
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
        return GenerationResult(token_ids=new, text=text, prompt_tokens=self.prompt_tokens, truncated=False, stats=stats)


def _greedy(model, cache, logits: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy tokens from the last prompt logits [1, V], one model call per token."""
    out: list[int] = []
    with torch.inference_mode():
        for step in range(max_new_tokens):
            token = int(logits.argmax(-1))
            out.append(token)
            if token == eos or step == max_new_tokens - 1:
                break
            logits = model(torch.tensor([[token]], device=model.device), cache=cache, use_cache=True).logits[:, -1]
    return out
