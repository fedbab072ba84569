"""Paired RULER comparison of a device-selector rerun with the committed suite (same prompts).

``python docs/results/probes/ruler_device_rerun.py RERUN.json docs/results/suite.json`` pairs every
prompt (length, variant, sample) that RERUN finished with the same prompt in the suite and prints,
per length, the mean per-prompt difference with a 95 % percentile-bootstrap interval (2,000
resamples, seed 0) for: the rerun's icecache@256 against the suite's oracle@256 and icecache@256
(host selector), its icecache@128 against the suite's quest@256 and icecache@128, and its full
cache against the suite's (the check that both runs saw the same prompts and decoding: 0 on every
prompt). Prints JSON. Used on 2026-12-07 for suite-device-2026-12-07.json (n = 102 at both lengths).
"""

from __future__ import annotations

import json
import random
import sys


def _scores(path: str) -> dict[str, dict[tuple, float]]:
    rows = json.load(open(path))["rows"]["ruler"]
    out: dict[str, dict[tuple, float]] = {}
    for r in rows:
        name = r["policy"] if r["budget"] is None else f"{r['policy']}@{r['budget']}"
        out.setdefault(name, {})[(r["length"], r["variant"], r["sample"])] = r["score"]
    return out


def _paired(a: dict, b: dict, length: int) -> dict:
    keys = sorted(k for k in a if k[0] == length and k in b)
    if not keys:
        return {"n": 0}
    diffs = [a[k] - b[k] for k in keys]
    rng = random.Random(0)
    boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(2000))
    return {"n": len(keys), "rerun": round(sum(a[k] for k in keys) / len(keys), 3), "suite": round(sum(b[k] for k in keys) / len(keys), 3),
            "diff": round(sum(diffs) / len(diffs), 3), "ci95": [round(boots[50], 3), round(boots[1949], 3)]}


def main(rerun: str, suite: str) -> None:
    new, old = _scores(rerun), _scores(suite)
    pairs = [("icecache@256", "oracle@256"), ("icecache@256", "icecache@256"), ("icecache@128", "quest@256"),
             ("icecache@128", "icecache@128"), ("full", "full")]
    result = {f"{length} rerun {a} - suite {b}": _paired(new[a], old[b], length)
              for length in (4096, 7680) for a, b in pairs if a in new and b in old}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
