"""The GPU check's capacity summary (``capacity.json``) from throughput-benchmark results (no torch).

``python -m icecache_ray.bench.capacity --nocap T.json --capacity C.json [--capacity C2.json ...]
--json capacity.json``: ``T.json`` is a :mod:`icecache_ray.bench.throughput` run without a device
budget (steady state at B 1 / 8 with transformers' ``DynamicCache``), each ``C.json`` one with
``--device-kv-gib`` (end to end, every policy at the rows the budget gives it). The summary keys:

* ``engine_full_vs_hf_b8``: steady decode tokens/s of the engine's full cache / transformers at B8;
* ``icecache_vs_full_b8_nocap``: steady decode tokens/s of icecache@budget / full at B8;
* ``decode_speedup_icecache_vs_full_capacity``: steady decode tokens/s (all rows decoding) of the
  end-to-end runs at the budget's rows, icecache / full;
* ``e2e_speedup_icecache_vs_full_capacity``: documents/hour, icecache / full;
* ``prefill_ratio_icecache_vs_full``: prefill tokens/s, icecache / full;
* ``rows_given``: per policy, the rows the budget gave it;

each from the first capacity file; every capacity file's own numbers are under ``capacity_runs``.
A ratio whose rows are missing (a run cut for time) is null, never a guess.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from icecache_ray.report import emit_json, json_path

log = logging.getLogger("icecache_ray.bench.capacity")

SUMMARY_KEYS = ("engine_full_vs_hf_b8", "icecache_vs_full_b8_nocap", "decode_speedup_icecache_vs_full_capacity",
                "e2e_speedup_icecache_vs_full_capacity", "prefill_ratio_icecache_vs_full", "rows_given")


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def _row(rows: list[dict], phase: str, config: str, engine: str, batch: int | None = None) -> dict | None:
    for row in rows:
        if (row["phase"], row["config"], row["engine"]) == (phase, config, engine) and batch in (None, row["max_running"]):
            return row
    return None


def nocap_ratios(rows: list[dict], budget: int, batch: int = 8) -> dict:
    """``engine_full_vs_hf_b8`` and ``icecache_vs_full_b8_nocap`` from a run's steady rows."""
    full = _row(rows, "steady", "full", "local", batch)
    return {"engine_full_vs_hf_b8": _ratio(full, _row(rows, "steady", "hf_dynamic_cache", "transformers", batch), "decode_tok_s"),
            "icecache_vs_full_b8_nocap": _ratio(_row(rows, "steady", f"icecache@{budget}", "local", batch), full, "decode_tok_s")}


def capacity_ratios(rows: list[dict], budget: int) -> dict:
    """The capacity ratios and ``rows_given`` from a budgeted run's end-to-end local rows."""
    ice, full = _row(rows, "e2e", f"icecache@{budget}", "local"), _row(rows, "e2e", "full", "local")
    return {"decode_speedup_icecache_vs_full_capacity": _ratio(ice, full, "decode_tok_s"),
            "e2e_speedup_icecache_vs_full_capacity": _ratio(ice, full, "docs_per_hour"),
            "prefill_ratio_icecache_vs_full": _ratio(ice, full, "prefill_tok_s"),
            "rows_given": {r["config"]: r["max_running"] for r in rows if r["phase"] == "e2e" and r["engine"] == "local"}}


def capacity_summary(nocap: dict | None, capacity: list[dict]) -> dict:
    """``capacity.json``: the summary (see module docstring) and what each run measured."""
    summary: dict = dict.fromkeys(SUMMARY_KEYS)
    if nocap is not None:
        summary.update(nocap_ratios(nocap["rows"], nocap["budget"]))
    runs = []
    for run in capacity:
        ratios = capacity_ratios(run["rows"], run["budget"])
        runs.append({"model": run.get("model"), "dtype": run.get("dtype"), "device_kv_bytes": run.get("device_kv_bytes"),
                     "context": max(run.get("doc_tokens") or [0]), "budget": run["budget"], "new_tokens": run.get("new_tokens"),
                     **ratios, "e2e": [{k: r.get(k) for k in ("config", "max_running", "docs", "docs_per_hour", "decode_tok_s",
                                                              "prefill_tok_s", "wall_s", "device_kv_bytes_per_seq")}
                                       for r in run["rows"] if r["phase"] == "e2e"]})
    if runs:
        summary.update({k: runs[0][k] for k in capacity_ratios([], 0)})
    device = (nocap or (capacity[0] if capacity else {})).get("device")
    return {"device": device, "summary": summary, "capacity_runs": runs}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.capacity", description=__doc__.splitlines()[0])
    p.add_argument("--nocap", help="throughput JSON without a device budget (steady B1/B8 with transformers)")
    p.add_argument("--capacity", action="append", default=[], help="throughput JSON with --device-kv-gib (repeatable)")
    p.add_argument("--json", default=None, type=json_path)
    args = p.parse_args(argv)
    loaded = []
    for path in ([args.nocap] if args.nocap else []) + args.capacity:
        try:
            with open(path) as fh:
                loaded.append(json.load(fh))
        except (OSError, ValueError) as err:  # a step cut for time leaves no file: its keys stay null
            log.warning("%s: %s (left out)", path, err)
            loaded.append(None)
    nocap = loaded.pop(0) if args.nocap else None
    result = capacity_summary(nocap, [run for run in loaded if run is not None])
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
