"""Paired RULER comparison of the two selectors run with the same code on the same prompts.

``python docs/results/probes/ruler_selectors.py HOST.json DEVICE.json docs/results/suite.json``:
HOST and DEVICE are suite runs of icecache (``--selector host`` / the default device selector);
the suite JSON gives the exact-token oracle. For every length and budget they share, prints
(JSON) the mean per-prompt differences host − oracle, device − oracle, device − host and host −
the suite's own icecache row (the host selector with the code of its day) with a
95 % percentile-bootstrap interval (2,000 resamples, seed 0), the per-variant means, and the full
cache's agreement across the three files (0 on every prompt: same prompts, same dense decoding).
"""

from __future__ import annotations

import json
import random
import sys


def _scores(path: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for r in json.load(open(path))["rows"]["ruler"]:
        name = r["policy"] if r["budget"] is None else f"{r['policy']}@{r['budget']}"
        out.setdefault(name, {})[(r["length"], r["variant"], r["sample"])] = r["score"]
    return out


def _paired(a: dict, b: dict, keys: list) -> dict:
    diffs = [a[k] - b[k] for k in keys]
    rng = random.Random(0)
    boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(2000))
    return {"n": len(keys), "diff": round(sum(diffs) / len(diffs), 3), "ci95": [round(boots[50], 3), round(boots[1949], 3)],
            "differ_on": sum(d != 0 for d in diffs)}


def main(host_path: str, device_path: str, suite_path: str) -> None:
    host, device, suite = _scores(host_path), _scores(device_path), _scores(suite_path)
    result = {}
    for name in sorted(set(host) & set(device) - {"full"}):
        budget = name.split("@")[1]
        oracle = suite.get(f"oracle@{budget}", {})
        for length in sorted({k[0] for k in host[name]}):
            earlier = suite.get(name, {})
            keys = sorted(k for k in host[name] if k[0] == length and k in device[name] and k in oracle and k in earlier)
            if not keys:
                continue
            mean = lambda d: round(sum(d[k] for k in keys) / len(keys), 3)  # noqa: E731
            variants = sorted({k[1] for k in keys})
            result[f"{length} {name}"] = {
                "host": mean(host[name]), "device": mean(device[name]), "oracle": mean(oracle),
                "host - oracle": _paired(host[name], oracle, keys), "device - oracle": _paired(device[name], oracle, keys),
                "device - host": _paired(device[name], host[name], keys),
                "host - suite's host row (earlier code)": _paired(host[name], earlier, keys),
                "per_variant host / device / oracle / earlier host": {
                    v: [round(sum(d[k] for k in keys if k[1] == v) / sum(k[1] == v for k in keys), 3)
                        for d in (host[name], device[name], oracle, earlier)]
                    for v in variants},
                "full cache identical": all(host["full"][k] == device["full"][k] == suite["full"][k] for k in keys),
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
