"""The shipped example corpus ``examples/corpus.jsonl`` (built by ``examples/make_corpus.py``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus.jsonl"
SCRIPT = ROOT / "examples" / "make_corpus.py"
FIELDS = {"id", "title", "source", "license", "text"}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    assert CORPUS.is_file(), f"{CORPUS} missing: run `python examples/make_corpus.py`"
    raw = CORPUS.read_bytes()
    text = raw.decode("utf-8")  # strict: the file must be valid UTF-8
    assert text.endswith("\n") and "\r" not in text
    return [json.loads(line) for line in text.splitlines()]


def test_count_and_size(records: list[dict]) -> None:
    assert 10 <= len(records) <= 14
    size = CORPUS.stat().st_size
    assert 100_000 <= size <= 500_000, f"corpus is {size} bytes"


def test_fields_ids_and_texts(records: list[dict]) -> None:
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids), "duplicate ids"
    for r in records:
        assert set(r) == FIELDS, r.get("id")
        assert all(isinstance(r[k], str) and r[k].strip() for k in FIELDS), r["id"]
        assert r["id"].replace("-", "").isalnum() and r["id"] == r["id"].lower(), r["id"]
        assert "public domain" in r["license"].lower(), r["id"]
        assert r["text"] == r["text"].strip("\n") and "\ufffd" not in r["text"], r["id"]
        r["text"].encode("utf-8")  # no lone surrogates


def test_lengths_spread_over_1k_to_7k_tokens(records: list[dict]) -> None:
    """SmolLM2 averages 3.1-4.0 chars/token on these texts (examples/README.md): bound by chars."""
    chars = sorted(len(r["text"]) for r in records)
    assert chars[0] >= 3_500 and chars[-1] <= 30_000, chars
    assert chars[0] <= 6_000 and chars[-1] >= 22_000, "sizes should span the whole 1k-7k range"
    sources = {r["id"].split("-")[0] for r in records}
    assert sources == {"kjv", "shakespeare", "jargon"}


def test_regenerates_identically() -> None:
    """The script rebuilds the committed file byte for byte from ../shared/data."""
    spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_corpus"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    try:
        folder = module.longdocs_dir()
    except FileNotFoundError:
        pytest.skip("offline data ../shared/data not available")
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    built = module.build(folder)
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in built).encode("utf-8")
    assert expected == CORPUS.read_bytes(), "examples/corpus.jsonl is stale: rerun examples/make_corpus.py"
