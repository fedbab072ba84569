"""Why the device selector misses some RULER prompts at 7680 that the host selector answers.

``python docs/results/probes/ruler_device_misses.py [--no-host] [SHORTLIST ...]`` reruns the
7680-token RULER prompts on which icecache@256's device rerun (``suite-device-2026-12-07.json``)
and the suite's host row disagree, under the host selector and the device selector with each
``IceCacheConfig.shortlist`` given (default: 8 as shipped, 32, and 10000 = every page, where the
centroid shortlist decides nothing and only the exact pick rule remains). One dense prefill per
prompt is shared by all of them (as in the suite). Prints one JSON line per (prompt,
configuration): score and generated text.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from icecache_ray.config import IceCacheConfig
from icecache_ray.eval.tasks import _ruler_group
from icecache_ray.model import load_model

RESULTS = Path(__file__).resolve().parents[1]
LENGTH, BUDGET = 7680, 256


def discordant() -> dict[str, list[int]]:
    """variant -> samples where the device rerun and the suite's host row score differently."""
    def rows(name):
        return {(r["variant"], r["sample"]): r["score"] for r in json.load(open(RESULTS / name))["rows"]["ruler"]
                if r["length"] == LENGTH and r["policy"] == "icecache" and r["budget"] == BUDGET}
    device, host = rows("suite-device-2026-12-07.json"), rows("suite.json")
    out: dict[str, list[int]] = {}
    for (variant, sample), score in sorted(device.items()):
        if host[(variant, sample)] != score:
            out.setdefault(variant, []).append(sample)
    return out


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    shortlists = [float(x) for x in argv if x != "--no-host"] or [8, 32, 10_000]
    model, tokenizer = load_model()
    runs = [] if "--no-host" in argv else [("host", BUDGET, IceCacheConfig(budget=BUDGET, selector="host"))]
    runs += [(f"device shortlist {s:g}", BUDGET, IceCacheConfig(budget=BUDGET, selector="device", shortlist=s)) for s in shortlists]
    for variant, samples in discordant().items():
        for row in _ruler_group(model, tokenizer, runs, LENGTH, variant, 0, samples):
            print(json.dumps({"variant": variant, "sample": row["sample"], "config": row["policy"], "score": row["score"],
                              "generated": row["generated"][:40]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
