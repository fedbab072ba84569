"""Resuming the fidelity suite (``--resume``): what an earlier run in the same JSON already finished,
and saves that never leave a half-written file (the full-size suite runs for hours)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

PARTS = ("ruler", "longgen", "summary")
# The arguments that decide what a finished row holds: a resumed run must not mix other values in.
ROW_DEFINING_ARGS = ("seed", "longgen_length", "longgen_tokens", "summary_tokens", "corpus", "model", "selector", "shortlist")
# What identifies one unit of work in each part (one prompt, one text, one document).
UNIT_KEYS = {"ruler": ("length", "variant", "sample"), "longgen": ("text",), "summary": ("document",)}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: a reader (or a run killed
    mid-write) sees the old file or the new one, never part of one."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def read_suite(path: Path, option: str) -> dict:
    """The suite JSON in ``path`` as written (``summary``, ``rows`` per part, ``argv``, ``args``,
    ``wall_s``); SystemExit naming ``option`` and the file when it is not one."""
    try:
        previous = json.loads(path.read_text())
        previous["args"], rows = dict(previous["args"]), previous["rows"]
        previous["rows"] = {part: list(rows.get(part, [])) for part in PARTS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{option}: {path} is not a fidelity-suite JSON ({type(exc).__name__}: {exc})") from None
    return previous


def load_previous(path: Path, args: dict, configs: set[tuple]) -> tuple[dict[str, list[dict]], float]:
    """(rows per part, wall seconds spent so far) of the earlier run in ``path``, keeping only
    units that every one of ``configs`` ((policy, budget) pairs) finished; nothing when ``path``
    does not exist.

    Raises SystemExit naming the argument when the earlier run used a different value of one of
    ``ROW_DEFINING_ARGS``, naming the configurations when a unit lacks some of ``configs`` (a run
    with other ``--configs``), or naming the file when it is not a suite JSON."""
    if not path.exists():
        return {part: [] for part in PARTS}, 0.0
    previous = read_suite(path, "--resume")
    old_args, rows = previous["args"], previous["rows"]
    for name in ROW_DEFINING_ARGS:
        if _plain(old_args.get(name)) != _plain(args.get(name)):
            raise SystemExit(f"--resume: {path} was run with {name}={old_args.get(name)!r}, this run has {args.get(name)!r}; "
                             "use another --json or the same value")
    kept = {}
    for part in PARTS:
        done = finished(rows[part], UNIT_KEYS[part], configs)
        kept[part] = [r for r in rows[part] if unit_of(r, part) in done]
        _refuse_dropping(path, part, rows[part], kept[part], configs)
    return kept, float(previous.get("wall_s", 0.0))


def _refuse_dropping(path: Path, part: str, rows: list[dict], kept: list[dict], configs: set[tuple]) -> None:
    """A run saves whole units (every configuration of a prompt at once), so a unit that lacks one of
    ``configs`` comes from a run with other ``--configs``; resuming would rerun it and replace its
    rows, losing them if the new run stops early. Refuse, naming what is missing."""
    if len(kept) == len(rows):
        return
    from icecache_ray.eval.suite_report import label

    present = {(r["policy"], r["budget"]) for r in rows}
    missing = sorted(label(p, b) for p, b in configs - present) or ["some configurations in some units"]
    ran = sorted({label(p, b) for p, b in present})
    raise SystemExit(f"--resume: {path} has {len(rows) - len(kept)} {part} rows without {', '.join(missing)} "
                     f"(it holds {', '.join(ran)}); resuming would rerun and replace them. Resume with "
                     "--configs naming only what it holds, or write to another --json")


def unit_of(row: dict, part: str) -> tuple:
    """The unit (prompt, text or document) a row belongs to."""
    return tuple(row[k] for k in UNIT_KEYS[part])


def finished(rows: list[dict], key_fields: tuple[str, ...], configs: set[tuple]) -> set[tuple]:
    """Units (values of ``key_fields``) whose rows cover every one of ``configs`` ((policy, budget))."""
    seen: dict[tuple, set] = defaultdict(set)
    for r in rows:
        seen[tuple(r[k] for k in key_fields)].add((r["policy"], r["budget"]))
    return {unit for unit, got in seen.items() if configs <= got}
