"""Chat prompts for long documents, middle-truncated to fit the model's context."""

from __future__ import annotations

from dataclasses import dataclass

from icecache_ray.engine.generate import middle_truncate

DEFAULT_INSTRUCTION = "Summarize the following document in a few sentences."


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    document_tokens: int  # before truncation
    truncated: bool


def chat_prompt(tokenizer, document: str, instruction: str, max_prompt_tokens: int) -> Prompt:
    """Token ids of ``instruction`` + ``document`` in the model's chat template (with the
    assistant turn opened), the document middle-truncated (LongBench style) so the whole prompt
    is at most ``max_prompt_tokens``. ValueError if even an empty document does not fit."""
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    overhead = len(_render(tokenizer, instruction, ""))
    room = max_prompt_tokens - overhead
    if room <= 0:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for the document (template uses {overhead})")
    kept = doc_ids
    for _ in range(4):  # decoding then re-encoding may shift the count by a few tokens
        if len(kept) > room:
            kept = middle_truncate(kept, room)
        ids = _render(tokenizer, instruction, tokenizer.decode(kept))
        if len(ids) <= max_prompt_tokens:
            return Prompt(ids, len(doc_ids), len(kept) < len(doc_ids))
        room -= len(ids) - max_prompt_tokens
    raise ValueError("could not fit the document into the prompt")


def _render(tokenizer, instruction: str, document: str) -> list[int]:
    messages = [{"role": "user", "content": f"{instruction}\n\n{document}"}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model without a template: plain text with an answer cue
        text = f"{messages[0]['content']}\n\nSummary:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def document_prompt(tokenizer, document: str, instruction: str, max_prompt_tokens: int) -> tuple[Prompt | None, str | None]:
    """:func:`chat_prompt` for one job document: (prompt, None), or (None, the reason) when it
    cannot be built (that document's problem: the job goes on)."""
    try:
        return chat_prompt(tokenizer, document, instruction, max_prompt_tokens), None
    except Exception as exc:  # noqa: BLE001 - tokenizer and template errors of one document
        return None, f"could not build the prompt: {exc}"
