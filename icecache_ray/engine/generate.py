"""``icecache_ray.generate`` / ``generate_batch``: greedy generation on the local engine.

Prompts are validated first (every problem names the prompt), then queued on a
:class:`~icecache_ray.engine.local.LocalEngine`: sequences of any lengths decode together in one
forward pass per step (continuous batching, no padding), each in its own row, so a sequence's
tokens do not depend on what runs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.sequence import Sequence
from icecache_ray.serving_config import EngineConfig


@dataclass
class GenerationResult:
    """token_ids: generated ids (prompt excluded, EOS kept); text: decoded when a tokenizer was
    given; prompt_tokens: length after any truncation; truncated: middle-truncated?; stats: the
    sequence's counters (``SeqStats.summary``)."""

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


def prepare_prompts(model_config, prompts, max_new_tokens: int, truncate: bool) -> list[tuple[list[int], bool]]:
    """Validate a non-empty list of prompts (see :func:`prepare_prompt`); errors name the prompt."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    prepared = []
    for i, p in enumerate(prompts):
        try:
            prepared.append(prepare_prompt(model_config, p, max_new_tokens, truncate))
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}") from None
    return prepared


def prepare_prompt(model_config, prompt_ids, max_new_tokens: int, truncate: bool) -> tuple[list[int], bool]:
    """Validate one prompt before any work: non-empty token ids inside the vocabulary, fitting the
    context with ``max_new_tokens`` (or opt-in middle truncation). Returns (ids, truncated)."""
    ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise ValueError(f"prompt_ids: one prompt here, got a batch of {len(ids)} (use generate_batch)")
        ids = ids[0]
    if not ids:
        raise ValueError("prompt_ids: the prompt is empty")
    vocab = model_config.vocab_size
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"token {i} is {t!r}: token ids must be integers in [0, {vocab}) (the model's vocabulary)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    context = model_config.max_position_embeddings
    limit = context - max_new_tokens
    if limit <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in the model's {context}-token context")
    if len(ids) > limit:
        if not truncate:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"{context}-token context; pass truncate=True for middle truncation")
        return middle_truncate(ids, limit), True
    return ids, False


def result_of(seq: Sequence, tokenizer=None) -> GenerationResult:
    text = tokenizer.decode(seq.output, skip_special_tokens=True) if tokenizer is not None else None
    stats = dict(seq.stats.summary(), generated_tokens=len(seq.output))
    return GenerationResult(token_ids=list(seq.output), text=text, prompt_tokens=seq.prompt_len, truncated=seq.truncated, stats=stats)


def _eos(tokenizer, eos_token_id: int | None) -> int | None:
    return eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)


def generate(model, prompt_ids, config: IceCacheConfig | None = None, max_new_tokens: int = 64, tokenizer=None,
             eos_token_id: int | None = None, truncate: bool = False, engine: EngineConfig | None = None) -> GenerationResult:
    """Greedy generation of up to ``max_new_tokens`` after ``prompt_ids`` ([T] or [1, T]) with the
    configured policy and budget; stops after EOS."""
    return generate_batch(model, [prompt_ids], config, max_new_tokens, tokenizer, eos_token_id, truncate, engine)[0]


def generate_batch(model, prompts: list, config: IceCacheConfig | None = None, max_new_tokens: int = 64, tokenizer=None,
                   eos_token_id: int | None = None, truncate: bool = False, engine: EngineConfig | None = None) -> list[GenerationResult]:
    """Greedy generation for several prompts of any lengths, batched continuously on the local
    engine (``engine``: its rows and step budget; by default as many rows as prompts, within what
    memory allows). Every prompt is validated before any work; results come in prompt order."""
    from icecache_ray.engine.local import LocalEngine

    prepared = prepare_prompts(model.config, prompts, max_new_tokens, truncate)
    engine = engine or EngineConfig()
    if engine.max_running is None:
        rows = min(len(prepared), LocalEngine.auto_rows(model, config or IceCacheConfig(), engine))
        engine = EngineConfig(**{**engine.to_dict(), "max_running": rows, "max_step_tokens": max(engine.max_step_tokens, rows + 1)})
    eos = _eos(tokenizer, eos_token_id)
    with LocalEngine(model, config, engine) as runner:
        seqs = [runner.add(Sequence(ids, max_new_tokens, eos, truncated)) for ids, truncated in prepared]
        runner.run()
    for seq in seqs:
        if seq.error:
            raise RuntimeError(f"generation failed: {seq.error}")
    return [result_of(seq, tokenizer) for seq in seqs]


class SharedPrefill:
    """One dense prefill of a prompt [T], reused by several configurations: every policy's
    prefill is dense attention over the same prompt, so its K/V and first logits are shared and
    each configuration costs only its decoding (what the accuracy harness runs)."""

    def __init__(self, model, prompt_ids: list[int]) -> None:
        from transformers import DynamicCache

        self.model, self.prompt = model, list(prompt_ids)
        prepare_prompt(model.config, self.prompt, 1, truncate=False)
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            # logits of the last position only: the whole [T, vocab] matrix is ~1.5 GB at 8k tokens,
            # and a view of its last row would keep all of it alive
            out = model(torch.tensor([self.prompt], device=model.device), cache=cache, use_cache=True, logits_to_keep=1)
            self.logits = out.logits[0, -1].clone()
        self.keys = [layer.keys[0] for layer in cache.layers]  # per layer [H, T, d], post-RoPE
        self.values = [layer.values[0] for layer in cache.layers]

    def _run(self, config: IceCacheConfig, seq: Sequence, on_step=None) -> Sequence:
        from icecache_ray.engine.local import LocalEngine

        cfg = EngineConfig(max_running=1, max_seq_len=seq.max_length)
        with LocalEngine(self.model, config, cfg) as engine:
            engine.want_logits = on_step is not None
            first = seq.forced[0] if seq.forced is not None else int(self.logits.argmax())
            engine.add_prefilled(seq, self.keys, self.values, first)
            while engine.has_work:
                engine.step()
                if on_step is not None and engine.last_logits is not None and len(engine.last_logits):
                    on_step(engine.last_logits[0])
        return seq

    def generate(self, config: IceCacheConfig, max_new_tokens: int, tokenizer=None, eos_token_id: int | None = None) -> GenerationResult:
        """Greedy decoding from the shared prefill with ``config``: the tokens :func:`generate`
        gives on the same prompt."""
        return generate_prefilled([self], config, max_new_tokens, tokenizer, eos_token_id)[0]

    def nll(self, config: IceCacheConfig, target: list[int]) -> list[float]:
        """Teacher-forced negative log-likelihood of each token of ``target`` after the prompt."""
        seq = Sequence(self.prompt, len(target))
        seq.forced = list(target)
        scores = [-float(torch.log_softmax(self.logits.float(), -1)[target[0]])]
        self._run(config, seq, lambda logits: scores.append(-float(torch.log_softmax(logits.float(), -1)[target[len(scores)]])))
        return scores


def generate_prefilled(prefills: list[SharedPrefill], config: IceCacheConfig, max_new_tokens: int, tokenizer=None,
                       eos_token_id: int | None = None) -> list[GenerationResult]:
    """Greedy decoding of several :class:`SharedPrefill` prompts (same model) under one
    configuration, batched in one engine of one row each: every step decodes all of them in one
    forward pass, and each gets the tokens it gets alone (the engine's invariant). Results in order."""
    from icecache_ray.engine.local import LocalEngine

    if not prefills:
        return []
    eos = _eos(tokenizer, eos_token_id)
    seqs = [Sequence(p.prompt, max_new_tokens, eos) for p in prefills]
    rows = len(seqs)
    cfg = EngineConfig(max_running=rows, max_seq_len=max(seq.max_length for seq in seqs),
                       max_step_tokens=max(EngineConfig().max_step_tokens, rows + 1))
    with LocalEngine(prefills[0].model, config, cfg) as engine:
        for prefill, seq in zip(prefills, seqs):
            engine.add_prefilled(seq, prefill.keys, prefill.values, int(prefill.logits.argmax()))
        engine.run()
    return [result_of(seq, tokenizer) for seq in seqs]
