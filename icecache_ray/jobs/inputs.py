"""Documents for batch jobs: Parquet, JSONL and ``.txt`` files, or folders of them, on local paths
or any pyarrow filesystem URI (``s3://…``, ``gs://…``, ``file://…``).

Two steps, so that the Ray Data job can read files in parallel with the same code as the local
job: :func:`list_sources` expands the inputs into files (metadata only, on the driver), and
:func:`read_source` streams one file's documents (on a worker). Every problem with one file or one
row becomes an :class:`InputError` with a clear reason and the rest is still read: a missing path,
an empty folder, an unsupported file type, a missing column, a row whose text is empty or not
valid UTF-8, a duplicate id. Only "nothing readable at all" stops a job.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".jsonl", ".txt")
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: a worker holds one such batch of texts, not the file


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


def read_documents(files: list[str], id_column: str = "id", text_column: str = "text") -> tuple[list[Document], list[InputError]]:
    """All documents of ``files`` (from :func:`list_sources`) in order, first occurrence of an id
    wins. Returns (documents, row and file errors)."""
    errors: list[InputError] = []
    docs: list[Document] = []
    seen: set[str] = set()
    for source in files:
        for got in unique(read_source(source, id_column, text_column), seen):
            (errors if isinstance(got, InputError) else docs).append(got)
    return docs, errors


def list_sources(paths: Iterable[str]) -> tuple[list[str], list[InputError]]:
    """The files named by ``paths`` (a folder: its files in name order, hidden ones skipped), as
    strings :func:`read_source` opens. Returns (files, errors for missing paths / empty folders)."""
    files: list[str] = []
    errors: list[InputError] = []
    for raw in paths:
        try:
            fs, path, prefix = _resolve(str(raw))
            info = fs.get_file_info(path)
        except (OSError, ValueError) as exc:  # unknown scheme, no credentials, unreachable store
            errors.append(InputError(str(raw), None, f"cannot open: {exc}"))
            continue
        if info.type == pafs.FileType.NotFound:
            errors.append(InputError(str(raw), None, "path does not exist"))
        elif info.type == pafs.FileType.Directory:
            found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                           if i.type == pafs.FileType.File and not i.base_name.startswith("."))
            if not found:
                errors.append(InputError(str(raw), None, "folder holds no files"))
            files += [prefix + p for p in found]
        else:
            files.append(prefix + path)
    return files, errors


def unique(items: Iterable[Document | InputError], seen: set[str]) -> Iterator[Document | InputError]:
    """``items`` with every repeat of an id in ``seen`` (updated) turned into an error."""
    for got in items:
        if isinstance(got, Document):
            if got.id in seen:
                got = InputError(got.source, got.id, f"duplicate id {got.id!r}: only its first occurrence is used")
            else:
                seen.add(got.id)
        yield got


def read_source(source: str, id_column: str = "id", text_column: str = "text") -> Iterator[Document | InputError]:
    """One file's documents and row errors, streamed (a file that cannot be read: one error)."""
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in SUFFIXES:
        yield InputError(source, None, f"unsupported file type {suffix or '(none)'!r}: expected one of {list(SUFFIXES)}")
        return
    try:
        fs, path, _ = _resolve(source)
        if suffix == ".txt":
            with fs.open_input_stream(path) as fh:
                yield _checked(source, os.path.splitext(os.path.basename(path))[0], fh.read())
        elif suffix == ".jsonl":
            yield from _read_jsonl(fs, path, source, id_column, text_column)
        else:
            yield from _read_parquet(fs, path, source, id_column, text_column)
    except (OSError, pa.ArrowException) as exc:  # vanished, unreadable, corrupt mid-file, a store failing
        yield InputError(source, None, f"cannot read: {exc}")


def _resolve(raw: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns such a path back into ``raw``'s form)."""
    if "://" in raw:
        fs, path = pafs.FileSystem.from_uri(raw)
        scheme = raw.split("://", 1)[0]
        return fs, path, f"{scheme}://"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(raw)), ""


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


def _read_jsonl(fs, path: str, source: str, id_column: str, text_column: str) -> Iterator[Document | InputError]:
    with fs.open_input_stream(path) as raw:
        for number, line in enumerate(io.BufferedReader(raw), start=1):
            where = f"{source}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield InputError(where, None, f"line is not valid UTF-8 (byte {exc.start})")
                continue
            except json.JSONDecodeError as exc:
                yield InputError(where, None, f"not valid JSON: {exc.msg}")
                continue
            if not isinstance(row, dict):
                yield InputError(where, None, "a JSONL row must be an object")
            elif text_column not in row or id_column not in row:
                missing = [c for c in (id_column, text_column) if c not in row]
                yield InputError(where, None, f"missing column(s) {missing}; present: {sorted(row)}")
            else:
                yield _checked(where, row[id_column], row[text_column])


def _read_parquet(fs, path: str, source: str, id_column: str, text_column: str) -> Iterator[Document | InputError]:
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except Exception as exc:  # pyarrow raises several types for corrupt or non-Parquet files
        yield InputError(source, None, f"cannot read as Parquet: {exc}")
        return
    names = parquet.schema_arrow.names
    missing = [c for c in (id_column, text_column) if c not in names]
    if missing:
        yield InputError(source, None, f"missing column(s) {missing}; present: {names}")
        return
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[id_column, text_column]):
        for doc_id, text in zip(batch.column(id_column).to_pylist(), batch.column(text_column).to_pylist()):
            yield _checked(f"{source}[{number}]", doc_id, text)
            number += 1
