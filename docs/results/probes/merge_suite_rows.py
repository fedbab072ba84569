"""Replace some configurations' rows of a fidelity-suite JSON by those of a later run.

``python docs/results/probes/merge_suite_rows.py BASE RERUN`` takes every row of RERUN whose
(policy, budget) is not ``full`` and replaces BASE's rows of the same configurations and units
(part, prompt/text/document), marking each with ``"rerun": <RERUN's file name>``. The full cache
runs in both files, so its rows are the check that both runs saw the same prompts and the same
dense decoding: the script refuses (exit 1) when any full row of RERUN differs from BASE's in its
output or score. Prints JSON of what it did; afterwards ``python -m icecache_ray.eval suite --json
BASE --report-only`` recomputes the summary and the table. Used twice, on 2026-12-06, to bring the
icecache@512/@1024 rows of docs/results/suite.json to the ``pages_per_slot`` beam: RULER
(suite-beam-2026-12-06.json), then long generation and summaries (suite-beam-gen-2026-12-06.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from icecache_ray.eval.checkpoint import PARTS, read_suite, unit_of, write_atomic

COMPARED = ("generated", "score", "nll")  # what a full-cache row must reproduce


def _key(row: dict, part: str) -> tuple:
    return (row["policy"], row.get("budget")) + unit_of(row, part)


def merge(base: dict, rerun: dict, tag: str) -> dict:
    """Replace ``base``'s rows by ``rerun``'s non-full rows in place; returns counts per part."""
    report = {}
    for part in PARTS:
        new = rerun["rows"].get(part, [])
        old = {_key(r, part): r for r in base["rows"].get(part, [])}
        mismatched = [_key(r, part) for r in new if r["policy"] == "full"
                      and any(old.get(_key(r, part), {}).get(f) != r.get(f) for f in COMPARED if f in r)]
        if mismatched:
            raise SystemExit(f"{part}: the full cache's rows differ for {mismatched[:5]} (of {len(mismatched)}); "
                             "the two runs are not comparable")
        replacing = {_key(r, part): dict(r, rerun=tag) for r in new if r["policy"] != "full"}
        missing = [k for k in replacing if k not in old]
        if missing:
            raise SystemExit(f"{part}: {len(missing)} rerun rows have no row to replace in the base, e.g. {missing[0]}")
        base["rows"][part] = [replacing.get(_key(r, part), r) for r in base["rows"].get(part, [])]
        changed = sum(1 for k, r in replacing.items() if r.get("generated", r.get("nll")) != old[k].get("generated", old[k].get("nll")))
        report[part] = {"full_rows_checked": sum(r["policy"] == "full" for r in new), "replaced": len(replacing),
                        "output_changed": changed}
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: merge_suite_rows.py BASE.json RERUN.json")
    base_path, rerun_path = map(Path, argv)
    base, rerun = read_suite(base_path, "merge_suite_rows.py"), read_suite(rerun_path, "merge_suite_rows.py")
    report = merge(base, rerun, rerun_path.name)
    write_atomic(base_path, json.dumps(base, indent=1, default=str))
    print(json.dumps({"base": str(base_path), "rerun": str(rerun_path), "parts": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
