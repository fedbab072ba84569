"""The series the figures plot, read from the committed result JSON (no matplotlib, torch or ray).

RULER intervals come from :func:`icecache_ray.eval.suite_report.score_table` (the suite's own
percentile bootstrap over prompts), so a figure shows exactly what ``suite.json``'s summary says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from icecache_ray.eval.suite_report import score_table

# Retrieval rows whose policy is one of these are plotted; ablation variants ("icecache[...]") are not.
RECALL_POLICIES = ("icecache", "icecache_pages", "quest", "oracle_seqpage", "oracle_token", "streaming")


@dataclass(frozen=True)
class Curve:
    """One line of a figure: ``x`` and ``y`` with an optional interval (``lo``/``hi``) and ``n``."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    lo: tuple[float, ...] | None = None
    hi: tuple[float, ...] | None = None
    n: tuple[int, ...] | None = None


def read_json(path: Path) -> dict:
    """The JSON object in ``path``."""
    return json.loads(Path(path).read_text())


def split_label(key: str) -> tuple[str, int | None]:
    """``"icecache@256"`` → ``("icecache", 256)``; ``"full"`` → ``("full", None)``."""
    policy, _, budget = key.partition("@")
    return policy, int(budget) if budget else None


def label_of(policy: str, x: float) -> str:
    """The ``policy@budget`` key of a curve's point (inverse of :func:`split_label`; x 0 = no budget)."""
    return f"{policy}@{int(x)}" if x else policy


def ruler_lengths(suite: dict) -> list[int]:
    """The RULER prompt lengths a suite JSON has rows for, ascending."""
    return sorted({row["length"] for row in suite["rows"].get("ruler", [])})


def ruler_table(suite: dict, length: int) -> dict[str, dict]:
    """``policy@budget`` → ``{score, lo, hi, n}`` for the RULER rows of ``length`` (suite_report's statistics)."""
    return score_table([row for row in suite["rows"]["ruler"] if row["length"] == length])


def ruler_curves(table: dict[str, dict]) -> dict[str, Curve]:
    """Per policy, its scores against budget (ascending) with their intervals; ``full`` (no budget)
    is one point at x = 0, which callers draw as a reference line, not a curve."""
    by_policy: dict[str, list[tuple[int, dict]]] = {}
    for key, entry in table.items():
        policy, budget = split_label(key)
        by_policy.setdefault(policy, []).append((budget or 0, entry))
    curves = {}
    for policy, points in by_policy.items():
        points.sort(key=lambda point: point[0])
        curves[policy] = Curve(
            label=policy, x=tuple(float(b) for b, _ in points), y=tuple(e["score"] for _, e in points),
            lo=tuple(e["lo"] for _, e in points), hi=tuple(e["hi"] for _, e in points),
            n=tuple(e["n"] for _, e in points))
    return curves


def throughput_curves(result: dict, phase: str = "steady") -> dict[str, Curve]:
    """Per configuration (``engine`` added when not local), decode tokens/s against running rows
    for the rows of ``phase`` in a ``bench.throughput`` JSON."""
    points: dict[str, list[tuple[int, float]]] = {}
    for row in result["rows"]:
        if row["phase"] != phase:
            continue
        name = row["config"] if row["engine"] in ("local", "transformers") else f"{row['config']} ({row['engine']})"
        points.setdefault(name, []).append((row["max_running"], row["decode_tok_s"]))
    return {name: Curve(label=name, x=tuple(float(b) for b, _ in sorted(pts)), y=tuple(v for _, v in sorted(pts)))
            for name, pts in points.items()}


def recall_curves(result: dict, workload: str = "real") -> dict[str, Curve]:
    """Per policy of :data:`RECALL_POLICIES`, attention-mass recall against budget for the rows of
    ``workload`` in a ``bench.retrieval`` JSON.

    Since token slots, the benchmark reports ``icecache`` (with them) beside ``icecache_pages``
    (whole pages only); a JSON without ``icecache_pages`` predates token slots, so its
    ``icecache`` rows are whole pages and are returned as ``icecache_pages``."""
    policies = {row["policy"] for row in result["rows"]}
    rename = {} if "icecache_pages" in policies else {"icecache": "icecache_pages"}
    points: dict[str, list[tuple[int, float]]] = {}
    for row in result["rows"]:
        if row["workload"] == workload and row["policy"] in RECALL_POLICIES:
            name = rename.get(row["policy"], row["policy"])
            points.setdefault(name, []).append((row["budget"], row["recall"]))
    return {policy: Curve(label=policy, x=tuple(float(b) for b, _ in sorted(pts)), y=tuple(r for _, r in sorted(pts)))
            for policy, pts in points.items()}


def gpu_throughput_files(results: Path) -> list[Path]:
    """Every ``gpu/<date>-<device>/throughput.json`` under ``results``, oldest first."""
    return sorted(Path(results).glob("gpu/*/throughput.json"))


def run_caption(result: dict) -> str:
    """``"<date>, <device>, <model>, B <rows>"`` of a benchmark JSON (the fields it has; the batch
    sizes tell apart two runs of one day)."""
    parts = [str(result[key]) for key in ("date", "device", "model") if result.get(key)]
    batches = sorted({r["max_running"] for r in result.get("rows", []) if isinstance(r.get("max_running"), int)})
    if batches:
        parts.append("B " + "/".join(map(str, batches)))
    return ", ".join(parts)
