"""Documents for batch jobs: Parquet, JSONL and ``.txt`` files, or folders of them (pyarrow only).

Every problem with one file or one row becomes an :class:`InputError` with a clear reason and the
rest is still read: a missing path, an unsupported file type, a missing column, a row whose text is
empty or not valid UTF-8, a duplicate id. Only "nothing readable at all" stops a job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".jsonl", ".txt")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class InputError:
    source: str
    id: str | None
    reason: str


def read_documents(paths: list[str], id_column: str = "id", text_column: str = "text") -> tuple[list[Document], list[InputError]]:
    """All documents under ``paths`` (files or folders, folders read in name order), first
    occurrence of an id wins. Returns (documents, errors)."""
    docs: list[Document] = []
    errors: list[InputError] = []
    seen: set[str] = set()
    for item in _expand(paths, errors):
        for got in _read_file(item, id_column, text_column):
            if isinstance(got, InputError):
                errors.append(got)
            elif got.id in seen:
                errors.append(InputError(got.source, got.id, f"duplicate id {got.id!r}: only its first occurrence is used"))
            else:
                seen.add(got.id)
                docs.append(got)
    return docs, errors


def _expand(paths: list[str], errors: list[InputError]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            errors.append(InputError(str(path), None, "path does not exist"))
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                errors.append(InputError(str(path), None, "folder holds no files"))
            yield from files
        else:
            yield path


def _read_file(path: Path, id_column: str, text_column: str) -> Iterator[Document | InputError]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        yield InputError(str(path), None, f"unsupported file type {suffix or '(none)'!r}: expected one of {list(SUFFIXES)}")
    elif suffix == ".txt":
        yield _read_txt(path)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, id_column, text_column)
    else:
        yield from _read_parquet(path, id_column, text_column)


def _checked(source: str, doc_id, text) -> Document | InputError:
    if doc_id is None or str(doc_id).strip() == "":
        return InputError(source, None, "missing id")
    doc_id = str(doc_id)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return InputError(source, doc_id, f"text is not valid UTF-8 (byte {exc.start})")
    if not isinstance(text, str):
        return InputError(source, doc_id, f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        return InputError(source, doc_id, "empty text")
    return Document(doc_id, text, source)


def _read_txt(path: Path) -> Document | InputError:
    return _checked(str(path), path.stem, path.read_bytes())


def _read_jsonl(path: Path, id_column: str, text_column: str) -> Iterator[Document | InputError]:
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        source = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield InputError(source, None, f"line is not valid UTF-8 (byte {exc.start})")
            continue
        except json.JSONDecodeError as exc:
            yield InputError(source, None, f"not valid JSON: {exc.msg}")
            continue
        if not isinstance(row, dict):
            yield InputError(source, None, "a JSONL row must be an object")
        elif text_column not in row or id_column not in row:
            missing = [c for c in (id_column, text_column) if c not in row]
            yield InputError(source, None, f"missing column(s) {missing}; present: {sorted(row)}")
        else:
            yield _checked(source, row[id_column], row[text_column])


def _read_parquet(path: Path, id_column: str, text_column: str) -> Iterator[Document | InputError]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt or non-Parquet files
        yield InputError(str(path), None, f"cannot read as Parquet: {exc}")
        return
    missing = [c for c in (id_column, text_column) if c not in table.column_names]
    if missing:
        yield InputError(str(path), None, f"missing column(s) {missing}; present: {table.column_names}")
        return
    for number, (doc_id, text) in enumerate(zip(table[id_column].to_pylist(), table[text_column].to_pylist())):
        yield _checked(f"{path}[{number}]", doc_id, text)
