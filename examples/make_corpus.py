"""Build ``examples/corpus.jsonl``: 12 public-domain documents of about 1k-7k tokens.

Run from anywhere:  ``python examples/make_corpus.py``  (options: ``--out PATH``,
``--no-tokenizer`` to skip the token count with the bundled SmolLM2 tokenizer).

The documents are cut from the offline texts in ``../shared/data/longdocs`` (or
``$ICECACHE_DATA_DIR/longdocs``) at natural boundaries only:

* King James Bible (``kjv_bible.txt``): whole books, or a run of whole chapters;
* Shakespeare (``tinyshakespeare.txt``): whole scenes. The file has no act/scene headings, so a
  scene is located by the first line of its first speech and ends just before the first speech
  of the next scene (both anchors must occur exactly once);
* The Jargon File 4.4.7 (``jargon_file_4.4.7.txt``): all lexicon entries under one letter
  (from the first ``:entry:`` after the letter's heading to the next letter's heading).

Every cut is an exact run of whole lines of the source (edge blank lines stripped), so the output
is deterministic: the same sources give a byte-identical ``corpus.jsonl``. Each line of the
output is a JSON object with ``id``, ``title``, ``source``, ``license`` and ``text``.
The script prints one row per document with its size and token count (SmolLM2 tokenizer when the
bundled model is available, else the estimate chars/4, marked ``~``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES / "corpus.jsonl"
MIN_TOKENS, MAX_TOKENS = 1_000, 7_200

KJV_FILE = "kjv_bible.txt"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
JARGON_FILE = "jargon_file_4.4.7.txt"

KJV_SOURCE = (
    "King James Version of the Bible (1611), {where}. Text: Debian package bible-kjv-text 4.38, "
    "decoded with the `bible` program of bible-kjv 4.38 (shared/data/longdocs/kjv_bible.txt)"
)
KJV_LICENSE = (
    "Public domain: the copyright of the 1611 translation has expired "
    "(Debian copyright file; in the United Kingdom the KJV remains under Crown letters patent)"
)
SHAKESPEARE_SOURCE = (
    "William Shakespeare, {where}. Text: tinyshakespeare, GitHub karpathy/char-rnn "
    "@ 6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e, data/tinyshakespeare/input.txt"
)
SHAKESPEARE_LICENSE = "Public domain (Shakespeare's plays; the repository adds no licence)"
JARGON_SOURCE = (
    "The Jargon File 4.4.7 (29 Dec 2003, ed. Eric S. Raymond), {where}. Text: Debian package "
    "jargon-text 4.4.7-4.1 (jargon.txt)"
)
JARGON_LICENSE = "Public domain (\"to be freely used, shared, and modified\"; please cite as Jargon File 4.4.7)"


@dataclass(frozen=True)
class Doc:
    """One corpus document: where it is cut from and how to describe it."""

    id: str
    title: str
    cut: Callable[[Path], str]
    source: str
    license: str


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def _join(lines: list[str]) -> str:
    text = "\n".join(line.rstrip() for line in lines).strip("\n")
    if not text.strip():
        raise ValueError("empty cut")
    return text


def _unique_index(lines: list[str], predicate: Callable[[str], bool], what: str) -> int:
    hits = [i for i, line in enumerate(lines) if predicate(line)]
    if len(hits) != 1:
        raise ValueError(f"{what}: expected exactly one match, found {len(hits)}")
    return hits[0]


# --- King James Bible: "Ruth 1" style chapter headings, verses below --------------------------

_KJV_HEADING = re.compile(r"^([1-3]? ?[A-Z][A-Za-z ]*?) (\d+)$")


def _kjv_chapters(lines: list[str]) -> list[tuple[str, int, int]]:
    """(book, chapter, line index of its heading) in file order."""
    out = []
    for i, line in enumerate(lines):
        m = _KJV_HEADING.match(line)
        if m:
            out.append((m.group(1), int(m.group(2)), i))
    return out


def kjv(book: str, first: int | None = None, last: int | None = None) -> Callable[[Path], str]:
    """Cutter for chapters ``first..last`` of ``book`` (the whole book when both are None)."""

    def cut(folder: Path) -> str:
        lines = _lines(folder / KJV_FILE)
        chapters = _kjv_chapters(lines)
        own = [c for c in chapters if c[0] == book]
        if not own:
            raise ValueError(f"KJV book {book!r} not found")
        lo = first if first is not None else own[0][1]
        hi = last if last is not None else own[-1][1]
        wanted = [c for c in own if lo <= c[1] <= hi]
        if [c[1] for c in wanted] != list(range(lo, hi + 1)):
            raise ValueError(f"KJV {book} {lo}-{hi}: chapters missing")
        start = wanted[0][2]
        after = chapters.index(wanted[-1]) + 1
        end = chapters[after][2] if after < len(chapters) else len(lines)
        return _join(lines[start:end])

    return cut


# --- Shakespeare: a scene between two anchor lines ---------------------------------------------


def scene(first_line: str | None, next_scene_line: str) -> Callable[[Path], str]:
    """Cutter for the scene whose first speech begins with ``first_line`` (None: the file's
    first scene) up to the speaker line of the next scene's first speech, ``next_scene_line``."""

    def cut(folder: Path) -> str:
        lines = _lines(folder / SHAKESPEARE_FILE)
        start = 0
        if first_line is not None:
            start = _unique_index(lines, lambda s: s.startswith(first_line), repr(first_line)) - 1
        end = _unique_index(lines, lambda s: s.startswith(next_scene_line), repr(next_scene_line)) - 1
        for i in (start, end):  # both must be speaker lines ("ROMEO:")
            if not lines[i].endswith(":") or (i > 0 and lines[i - 1].strip()):
                raise ValueError(f"line {i + 1} {lines[i]!r} is not the speaker line of a new speech")
        return _join(lines[start:end])

    return cut


# --- Jargon File: the lexicon entries under one letter -----------------------------------------

_JARGON_LETTER = re.compile(r"^  ([A-Z])$")


def jargon_letter(letter: str) -> Callable[[Path], str]:
    """Cutter for every lexicon entry under ``letter`` (without the letter's headword list)."""

    def cut(folder: Path) -> str:
        lines = _lines(folder / JARGON_FILE)
        heads = [(m.group(1), i) for i, line in enumerate(lines) if (m := _JARGON_LETTER.match(line))]
        letters = [h[0] for h in heads]
        if letters != sorted(set(letters)) or letter not in letters:
            raise ValueError(f"Jargon File letter headings unexpected: {letters}")
        k = letters.index(letter)
        start = heads[k][1]
        if k + 1 < len(heads):
            end = heads[k + 1][1]
        else:  # Z runs up to "Part III. Appendices"
            end = _unique_index(lines, lambda s: "Appendices" in s and s.lstrip().startswith("Part"), "Part III")
        first_entry = next(i for i in range(start, end) if lines[i].startswith("   :"))
        return _join(lines[first_entry:end])

    return cut


# --- The corpus: 12 documents, ~1.2k to ~7k SmolLM2 tokens, 4 per source -----------------------

DOCS: tuple[Doc, ...] = (
    Doc("jargon-x", "The Jargon File: entries under X", jargon_letter("X"),
        JARGON_SOURCE.format(where="lexicon entries under X"), JARGON_LICENSE),
    Doc("kjv-jonah", "The Book of Jonah (KJV)", kjv("Jonah"),
        KJV_SOURCE.format(where="the Book of Jonah, chapters 1-4"), KJV_LICENSE),
    Doc("shakespeare-romeo-and-juliet-2-2", "Romeo and Juliet, Act 2 Scene 2 (the balcony scene)",
        scene("He jests at scars that never felt a wound.", "The grey-eyed morn smiles on the frowning night,"),
        SHAKESPEARE_SOURCE.format(where="Romeo and Juliet, Act 2 Scene 2"), SHAKESPEARE_LICENSE),
    Doc("jargon-j", "The Jargon File: entries under J", jargon_letter("J"),
        JARGON_SOURCE.format(where="lexicon entries under J"), JARGON_LICENSE),
    Doc("shakespeare-coriolanus-1-1", "Coriolanus, Act 1 Scene 1",
        scene(None, "So, your opinion is, Aufidius,"),
        SHAKESPEARE_SOURCE.format(where="Coriolanus, Act 1 Scene 1"), SHAKESPEARE_LICENSE),
    Doc("shakespeare-richard-ii-2-1", "Richard II, Act 2 Scene 1 (John of Gaunt's death)",
        scene("Will the king come, that I may breathe my last", "Madam, your majesty is too much sad:"),
        SHAKESPEARE_SOURCE.format(where="Richard II, Act 2 Scene 1"), SHAKESPEARE_LICENSE),
    Doc("kjv-galatians", "The Epistle to the Galatians (KJV)", kjv("Galatians"),
        KJV_SOURCE.format(where="the Epistle of Paul to the Galatians, chapters 1-6"), KJV_LICENSE),
    Doc("kjv-lamentations", "The Lamentations of Jeremiah (KJV)", kjv("Lamentations"),
        KJV_SOURCE.format(where="the Lamentations of Jeremiah, chapters 1-5"), KJV_LICENSE),
    Doc("jargon-k", "The Jargon File: entries under K", jargon_letter("K"),
        JARGON_SOURCE.format(where="lexicon entries under K"), JARGON_LICENSE),
    Doc("shakespeare-taming-of-the-shrew-2-1", "The Taming of the Shrew, Act 2 Scene 1 (the wooing)",
        scene("Good sister, wrong me not, nor wrong yourself,", "Fiddler, forbear; you grow too forward, sir:"),
        SHAKESPEARE_SOURCE.format(where="The Taming of the Shrew, Act 2 Scene 1"), SHAKESPEARE_LICENSE),
    Doc("kjv-1samuel-17-20", "1 Samuel 17-20: David and Goliath to David and Jonathan (KJV)",
        kjv("1 Samuel", 17, 20),
        KJV_SOURCE.format(where="the First Book of Samuel, chapters 17-20"), KJV_LICENSE),
    Doc("jargon-o", "The Jargon File: entries under O", jargon_letter("O"),
        JARGON_SOURCE.format(where="lexicon entries under O"), JARGON_LICENSE),
)


def longdocs_dir() -> Path:
    """``$ICECACHE_DATA_DIR/longdocs`` or ``<project>/../shared/data/longdocs``."""
    from icecache_ray.haystack import data_dir

    return data_dir() / "longdocs"


def build(folder: Path) -> list[dict[str, str]]:
    """The corpus records, in DOCS order."""
    records = []
    for doc in DOCS:
        records.append(
            {"id": doc.id, "title": doc.title, "source": doc.source, "license": doc.license, "text": doc.cut(folder)}
        )
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate ids: {ids}")
    return records


def write_jsonl(records: list[dict[str, str]], out: Path) -> int:
    """Write one JSON object per line (UTF-8, LF); return the number of bytes written."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return len(data)


def token_counter(use_tokenizer: bool) -> tuple[Callable[[str], int], bool]:
    """(count function, exact?): the SmolLM2 tokenizer if it loads, else chars/4."""
    if use_tokenizer:
        try:
            from transformers import AutoTokenizer

            from icecache_ray.model import ensure_local_model

            tok = AutoTokenizer.from_pretrained(ensure_local_model())
            return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), True
        except Exception as exc:  # noqa: BLE001 - any failure just means "estimate instead"
            print(f"note: SmolLM2 tokenizer unavailable ({exc}); estimating tokens as chars/4", file=sys.stderr)
    return (lambda text: round(len(text) / 4)), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    parser.add_argument("--no-tokenizer", action="store_true", help="estimate tokens as chars/4")
    args = parser.parse_args(argv)

    records = build(longdocs_dir())
    size = write_jsonl(records, args.out)
    count, exact = token_counter(not args.no_tokenizer)
    mark = "" if exact else "~"
    out_of_range = []
    print(f"{'id':38} {'chars':>7} {'tokens':>7}")
    for r in records:
        n = count(r["text"])
        if not MIN_TOKENS <= n <= MAX_TOKENS:
            out_of_range.append(r["id"])
        print(f"{r['id']:38} {len(r['text']):7d} {mark}{n:6d}")
    print(f"wrote {len(records)} documents, {size} bytes, to {args.out}")
    if out_of_range:
        print(f"warning: outside {MIN_TOKENS}-{MAX_TOKENS} tokens: {out_of_range}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
