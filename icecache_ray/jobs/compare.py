"""Compare two summarization runs: ROUGE-L of one run's summaries against the other's, and time.

``python -m icecache_ray.jobs.compare --reference DIR_FULL --candidate DIR_ICECACHE [--json OUT]``

ROUGE-L F1 (Lin, 2004) on lower-cased word tokens (letters and digits, split on anything else),
per document over the ids both runs hold, then averaged. Also the mean generation time per
document and generated tokens of each run. Prints JSON.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.report import emit_json, json_path

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts (0 when either is empty)."""
    c, r = words(candidate), words(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def compare(reference_dir: str, candidate_dir: str) -> dict:
    """ROUGE-L and times of the candidate folder's summaries against the reference's (see module
    docstring); SystemExit naming a folder that does not exist or a pair with no id in common."""
    for option, folder in (("--reference", reference_dir), ("--candidate", candidate_dir)):
        if not Path(folder).expanduser().is_dir():
            raise SystemExit(f"{option} {folder!r}: no such folder (a job's --output)")
    ref = {r["id"]: r for r in OutputDir(reference_dir).read_all().to_pylist()}
    cand = {r["id"]: r for r in OutputDir(candidate_dir).read_all().to_pylist()}
    common = sorted(set(ref) & set(cand))
    if not common:
        raise SystemExit(f"no document is in both {reference_dir!r} and {candidate_dir!r}")
    per_doc = [
        {"id": i, "rouge_l": rouge_l(cand[i]["summary"], ref[i]["summary"]), "prompt_tokens": ref[i]["prompt_tokens"],
         "reference_s": ref[i]["wall_s"], "candidate_s": cand[i]["wall_s"]}
        for i in common
    ]
    return {
        "documents": len(common),
        "rouge_l_mean": statistics.fmean(d["rouge_l"] for d in per_doc),
        "reference_s_per_document": statistics.fmean(d["reference_s"] for d in per_doc),
        "candidate_s_per_document": statistics.fmean(d["candidate_s"] for d in per_doc),
        "reference_generated_tokens": sum(ref[i]["generated_tokens"] for i in common),
        "candidate_generated_tokens": sum(cand[i]["generated_tokens"] for i in common),
        "per_document": per_doc,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m icecache_ray.jobs.compare", description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="output folder of the baseline run (e.g. --policy full)")
    p.add_argument("--candidate", required=True, help="output folder of the run to score")
    p.add_argument("--json", default=None, type=json_path)
    args = p.parse_args(argv)
    result = compare(args.reference, args.candidate)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
