"""The fidelity suite's statistics and report: per-configuration scores with bootstrap intervals,
``budget_to_match_full``, NLL ratios, the issue's targets, and the Markdown table (no torch)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

MATCH_POINTS = 0.02  # "within 2 points" of the full cache, scores in [0, 1]


def label(policy: str, budget: int | None) -> str:
    return policy if budget is None else f"{policy}@{budget}"


def bootstrap_ci(scores: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling prompts)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def score_table(rows: list[dict]) -> dict[str, dict]:
    """``policy@budget`` → ``{score, lo, hi, n}`` over ``rows`` (each with policy, budget, score)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[label(r["policy"], r["budget"])].append(r["score"])
    table = {}
    for key, scores in groups.items():
        lo, hi = bootstrap_ci(scores)
        table[key] = {"score": float(np.mean(scores)), "lo": lo, "hi": hi, "n": len(scores)}
    return table


def budget_to_match_full(table: dict[str, dict], points: float = MATCH_POINTS) -> dict[str, int | None]:
    """Per policy, the smallest budget whose score is at least the full cache's minus ``points``
    (None when no budget in the sweep gets there)."""
    full = table["full"]["score"]
    found: dict[str, int | None] = {}
    for key, entry in table.items():
        if "@" not in key:
            continue
        policy, budget = key.split("@")
        found.setdefault(policy, None)
        if entry["score"] >= full - points and (found[policy] is None or int(budget) < found[policy]):
            found[policy] = int(budget)
    return found


def nll_ratios(rows: list[dict]) -> dict[str, float]:
    """``policy@budget`` → mean over texts of (mean NLL / the full cache's mean NLL)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[label(r["policy"], r["budget"])].append(r["nll_ratio"])
    return {key: float(np.mean(v)) for key, v in groups.items()}


def summarize_suite(ruler_rows: list[dict], longgen_rows: list[dict], summary_rows: list[dict]) -> dict:
    """The ``summary`` block of the suite's JSON (see module docstring)."""
    out: dict = {"budget_to_match_full": {}}
    for length in sorted({r["length"] for r in ruler_rows}):
        table = score_table([r for r in ruler_rows if r["length"] == length])
        out[f"ruler_{length}"] = table
        out["budget_to_match_full"][str(length)] = budget_to_match_full(table)
    out["longgen_ratio"] = nll_ratios(longgen_rows)
    out["summary_nll_ratio"] = nll_ratios(summary_rows)
    out["targets"] = targets(out, ruler_rows)
    return out


def paired_difference(rows: list[dict], a: str, b: str) -> dict | None:
    """Mean over prompts of score(a) - score(b) on the prompts both configurations ran, with a 95 %
    bootstrap interval over prompts (paired: far tighter than the two intervals, since most prompts
    score alike under both). None when they share no prompt."""
    by_unit: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        by_unit[(r["length"], r["variant"], r["sample"])][label(r["policy"], r["budget"])] = r["score"]
    diffs = [u[a] - u[b] for u in by_unit.values() if a in u and b in u]
    if not diffs:
        return None
    lo, hi = bootstrap_ci(diffs)
    return {"difference": float(np.mean(diffs)), "lo": lo, "hi": hi, "n": len(diffs)}


def targets(summary: dict, ruler_rows: list[dict]) -> dict[str, dict]:
    """The issue's targets, each ``{value, limit, met}`` (``met`` None while its data is missing);
    RULER comparisons are paired differences (``lo``/``hi``: their 95 % interval)."""
    out: dict[str, dict] = {}
    for length in sorted({r["length"] for r in ruler_rows}):
        rows = [r for r in ruler_rows if r["length"] == length]
        for a, b, limit in (("icecache@256", "oracle@256", -MATCH_POINTS), ("icecache@128", "quest@256", 0.0)):
            diff = paired_difference(rows, a, b)
            out[f"ruler_{length}: {a} - {b} >= {limit:g}"] = (
                {"value": None, "limit": limit, "met": None} if diff is None
                else {"value": diff["difference"], "lo": diff["lo"], "hi": diff["hi"], "n": diff["n"], "limit": limit,
                      "met": diff["difference"] >= limit})
        found = summary["budget_to_match_full"][str(length)]
        ice, quest = found.get("icecache"), found.get("quest")
        # quest None: it never came within 2 points in its sweep (up to 2048), so any icecache budget up to 1024 is under half
        met = None if "icecache" not in found else ice is not None and (quest is None or 2 * ice <= quest)
        out[f"budget_to_match_full_{length}: icecache <= quest / 2"] = {"value": {"icecache": ice, "quest": quest}, "met": met}
    for part, key, limit in (("longgen_ratio", "icecache@256", 1.03), ("longgen_ratio", "icecache@512", 1.01),
                             ("summary_nll_ratio", "icecache@256", 1.03)):
        value = summary[part].get(key)
        out[f"{part}: {key} <= {limit:g}"] = {"value": value, "limit": limit, "met": None if value is None else value <= limit}
    return out


def markdown(summary: dict) -> str:
    """The suite's tables: RULER score [95 % interval] per configuration and length, NLL ratios."""
    keys = list(dict.fromkeys(k for name, t in summary.items() if name.startswith("ruler_") for k in t))
    keys += [k for k in {**summary["longgen_ratio"], **summary["summary_nll_ratio"]} if k not in keys]
    lengths = [name for name in summary if name.startswith("ruler_")]
    columns = ["config", *lengths, "longgen NLL ratio", "summary NLL ratio"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for key in keys:
        cells = []
        for name in lengths:
            e = summary[name].get(key)
            cells.append(f"{e['score']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}] (n={e['n']})" if e else "-")
        for name in ("longgen_ratio", "summary_nll_ratio"):
            cells.append(f"{summary[name][key]:.4f}" if key in summary[name] else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "budget_to_match_full (within 2 points of full): " + repr(summary["budget_to_match_full"]), "",
              "| target | value | met |", "|---|---|---|"]
    for name, t in summary.get("targets", {}).items():
        value = t["value"]
        if isinstance(value, float):
            value = f"{value:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}] (n={t['n']})" if "lo" in t else f"{value:.4f}"
        lines.append(f"| {name} | {value if value is not None else '-'} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


