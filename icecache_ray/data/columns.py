"""Batch columns of the Ray Data stages: tokenizing rows (CPU tasks) and the helpers every stage
uses to read a row's earlier error and to build object columns."""

from __future__ import annotations

import numpy as np

_TOKENIZERS: dict = {}


def cached_tokenizer(model_source):
    """The tokenizer of ``model_source`` (default: the bundled model), loaded once per worker process."""
    if model_source not in _TOKENIZERS:
        from icecache_ray.model import load_tokenizer, model_folder

        _TOKENIZERS[model_source] = load_tokenizer(model_folder(model_source))
    return _TOKENIZERS[model_source]


def tokenize_batch(batch: dict, model_source=None) -> dict:
    """Add ``prompt_ids`` (and ``error`` where a row cannot be tokenized) to a batch."""
    tokenizer = cached_tokenizer(model_source)
    ids, errors = [], []
    for i in range(batch_len(batch)):
        try:
            ids.append(_row_ids(tokenizer, {k: v[i] for k, v in batch.items()}))
            errors.append(None)
        except (ValueError, TypeError, KeyError) as exc:
            ids.append([])
            errors.append(f"could not tokenize: {exc}")
    errors = [error_of(batch, i) or e for i, e in enumerate(errors)]
    return {**batch, "prompt_ids": object_column(ids), "error": object_column(errors)}


def _row_ids(tokenizer, row: dict) -> list[int]:
    if row.get("prompt_ids") is not None and len(row["prompt_ids"]):
        return [int(t) for t in row["prompt_ids"]]
    if row.get("messages") is not None and len(row["messages"]):
        messages = [dict(m) for m in row["messages"]]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    raise ValueError("the row has no non-empty 'prompt_ids', 'messages' or 'prompt'")


def batch_len(batch: dict) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def error_of(batch: dict, i: int) -> str | None:
    """Row ``i``'s earlier error, if any (Ray Data turns a column of ``None`` into NaN)."""
    value = batch["error"][i] if "error" in batch else None
    return value if isinstance(value, str) and value else None


def object_column(values: list) -> np.ndarray:
    """A 1-D object array (lists and ``None`` kept as they are, not broadcast by numpy)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
