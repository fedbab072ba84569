"""capacity.json from throughput rows: a pure function of the rows (what gpu-check writes)."""

import json

from icecache_ray.bench.capacity import SUMMARY_KEYS, capacity_summary, main


def _steady(config, engine, b, tok_s):
    return {"phase": "steady", "config": config, "engine": engine, "max_running": b, "decode_tok_s": tok_s}


def _e2e(config, rows, tok_s, docs_h, prefill):
    return {"phase": "e2e", "config": config, "engine": "local", "max_running": rows, "docs": 80, "decode_tok_s": tok_s,
            "docs_per_hour": docs_h, "prefill_tok_s": prefill, "wall_s": 1.0, "device_kv_bytes_per_seq": 1}


NOCAP = {"device": "GPU X", "budget": 256, "rows": [
    _steady("full", "local", 8, 400.0), _steady("hf_dynamic_cache", "transformers", 8, 500.0),
    _steady("icecache@256", "local", 8, 300.0), _steady("full", "local", 1, 60.0)]}
CAP = {"device": "GPU X", "budget": 256, "model": "m", "dtype": "bfloat16", "device_kv_bytes": 3 << 30, "doc_tokens": [8000, 8100],
       "new_tokens": 128, "rows": [_e2e("full", 16, 800.0, 100.0, 9000.0), _e2e("icecache@256", 80, 2400.0, 180.0, 8100.0),
                                  {"phase": "alone", "config": "icecache@256", "engine": "local", "max_running": 1}]}


def test_summary_ratios_and_rows_given():
    out = capacity_summary(NOCAP, [CAP])
    s = out["summary"]
    assert set(s) == set(SUMMARY_KEYS)
    assert s["engine_full_vs_hf_b8"] == 0.8 and s["icecache_vs_full_b8_nocap"] == 0.75
    assert s["decode_speedup_icecache_vs_full_capacity"] == 3.0 and s["e2e_speedup_icecache_vs_full_capacity"] == 1.8
    assert s["prefill_ratio_icecache_vs_full"] == 0.9 and s["rows_given"] == {"full": 16, "icecache@256": 80}
    assert out["capacity_runs"][0]["context"] == 8100 and out["device"] == "GPU X"


def test_missing_runs_leave_nulls_not_guesses(tmp_path):
    out = capacity_summary(None, [])
    assert all(v is None for v in out["summary"].values())
    (tmp_path / "nocap.json").write_text(json.dumps(NOCAP))
    target = tmp_path / "capacity.json"
    assert main(["--nocap", str(tmp_path / "nocap.json"), "--capacity", str(tmp_path / "cut.json"), "--json", str(target)]) == 0
    s = json.loads(target.read_text())["summary"]
    assert s["engine_full_vs_hf_b8"] == 0.8 and s["decode_speedup_icecache_vs_full_capacity"] is None
