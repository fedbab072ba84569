"""Paired RULER differences between rows of suite JSONs, prompt by prompt.

``python docs/results/probes/ruler_pairs.py LENGTH A.json:CONFIG B.json:CONFIG [C.json:CONFIG D.json:CONFIG ...]``
prints (JSON), for each pair, both means and the mean per-prompt difference A − B over the
prompts both rows hold at LENGTH, with a 95 % percentile-bootstrap interval (2,000 resamples,
seed 0, as :mod:`ruler_selectors`), and whether the full cache scored the same on those prompts
in both files (same prompts, same dense decoding). CONFIG is a row label: ``full``,
``icecache@256``, ``oracle@256``, ``quest@256``...
"""

from __future__ import annotations

import json
import sys

from ruler_selectors import _paired, _scores


def _row(spec: str, length: int) -> tuple[dict, dict]:
    path, config = spec.rsplit(":", 1)
    scores = _scores(path)
    pick = lambda name: {k: v for k, v in scores.get(name, {}).items() if k[0] == length}  # noqa: E731
    return pick(config), pick("full")


def main(length: str, *specs: str) -> None:
    if len(specs) % 2:
        raise SystemExit("give pairs: A.json:CONFIG B.json:CONFIG")
    out = {}
    for a_spec, b_spec in zip(specs[::2], specs[1::2]):
        (a, a_full), (b, b_full) = _row(a_spec, int(length)), _row(b_spec, int(length))
        keys = sorted(set(a) & set(b))
        if not keys:
            raise SystemExit(f"{a_spec} and {b_spec} share no prompt at {length}")
        out[f"{a_spec} - {b_spec}"] = {
            "a": round(sum(a[k] for k in keys) / len(keys), 3), "b": round(sum(b[k] for k in keys) / len(keys), 3),
            **_paired(a, b, keys),
            "full cache identical": all(a_full.get(k) == b_full.get(k) for k in keys),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
