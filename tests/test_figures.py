"""``make figures``: the series extracted from the committed JSON, and the PNGs drawn from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from icecache_ray.figures import data

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def _ruler_row(policy: str, budget: int | None, length: int, sample: int, score: float) -> dict:
    return {"policy": policy, "budget": budget, "length": length, "variant": "niah_single", "sample": sample,
            "score": score}


def test_ruler_curves_sort_budgets_and_keep_full_as_one_point():
    rows = [_ruler_row(p, b, 4096, s, score) for s in range(4)
            for p, b, score in (("icecache", 256, 1.0), ("icecache", 64, 0.0), ("full", None, 0.5))]
    rows.append(_ruler_row("icecache", 256, 7680, 0, 0.0))  # another length: not in the 4096 table
    suite = {"rows": {"ruler": rows}}
    assert data.ruler_lengths(suite) == [4096, 7680]
    curves = data.ruler_curves(data.ruler_table(suite, 4096))
    assert curves["icecache"].x == (64.0, 256.0) and curves["icecache"].y == (0.0, 1.0)
    assert curves["icecache"].n == (4, 4)
    assert curves["full"].x == (0.0,) and curves["full"].y == (0.5,)


def test_ruler_series_equal_the_committed_summary():
    """The figure's points and intervals are the suite's own summary (same statistics code)."""
    suite = data.read_json(RESULTS / "suite.json")
    for length in data.ruler_lengths(suite):
        summary = suite["summary"][f"ruler_{length}"]
        for policy, curve in data.ruler_curves(data.ruler_table(suite, length)).items():
            for x, y, lo, hi, n in zip(curve.x, curve.y, curve.lo, curve.hi, curve.n):
                entry = summary[data.label_of(policy, x)]
                assert (y, lo, hi, n) == pytest.approx((entry["score"], entry["lo"], entry["hi"], entry["n"]))


def test_throughput_curves_by_config_and_engine():
    rows = [{"phase": "steady", "config": "full", "engine": "local", "max_running": b, "decode_tok_s": t}
            for b, t in ((8, 11.0), (1, 6.0))]
    rows += [{"phase": "e2e", "config": "full", "engine": "local", "max_running": 8, "decode_tok_s": 99.0},
             {"phase": "steady", "config": "icecache@256", "engine": "ray", "max_running": 8, "decode_tok_s": 12.0}]
    curves = data.throughput_curves({"rows": rows})
    assert curves["full"].x == (1.0, 8.0) and curves["full"].y == (6.0, 11.0)
    assert curves["icecache@256 (ray)"].y == (12.0,)


def test_recall_curves_drop_ablations_and_name_pre_token_slot_runs_pages_only():
    def row(policy, budget, recall, workload="real"):
        return {"workload": workload, "policy": policy, "budget": budget, "recall": recall}

    old = {"rows": [row("icecache", 256, 0.8), row("icecache", 64, 0.7), row("icecache[beam width 4]", 256, 0.1),
                    row("quest", 256, 0.6), row("icecache", 256, 0.01, workload="synthetic")]}
    curves = data.recall_curves(old)
    assert set(curves) == {"icecache_pages", "quest"}
    assert curves["icecache_pages"].x == (64.0, 256.0) and curves["icecache_pages"].y == (0.7, 0.8)
    new = {"rows": [row("icecache", 256, 0.9), row("icecache_pages", 256, 0.8)]}
    assert data.recall_curves(new)["icecache"].y == (0.9,)


def test_gpu_runs_found_and_captioned():
    files = data.gpu_throughput_files(RESULTS)
    assert files and all(path.name == "throughput.json" for path in files)
    caption = data.run_caption(data.read_json(files[0]))
    assert data.read_json(files[0])["device"] in caption


def test_two_runs_of_one_day_get_different_captions():
    base = {"date": "2026-12-07", "device": "cpu", "model": "m"}
    b1_8 = data.run_caption({**base, "rows": [{"max_running": 1}, {"max_running": 8}, {"max_running": 8}]})
    b16 = data.run_caption({**base, "rows": [{"max_running": 16}]})
    assert b1_8 == "2026-12-07, cpu, m, B 1/8" and b16 == "2026-12-07, cpu, m, B 16"


def test_data_extraction_imports_neither_torch_nor_ray():
    code = "import sys, icecache_ray.figures.data; assert not {'torch', 'ray'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=RESULTS.parent.parent)


def test_figures_command_writes_every_png_without_torch_or_ray(tmp_path):
    """``python -m icecache_ray.figures`` (what ``make figures`` runs) into a temporary folder."""
    pytest.importorskip("matplotlib")
    from icecache_ray.figures import build

    code = ("import sys; from icecache_ray.figures.build import main; "
            f"main(['--results', {str(RESULTS)!r}, '--out', {str(tmp_path)!r}]); "
            "assert not {'torch', 'ray'} & set(sys.modules), sorted({'torch', 'ray'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=RESULTS.parent.parent)
    assert {path.name for path in tmp_path.iterdir()} == {build.RULER_PNG, build.THROUGHPUT_PNG, build.RECALL_PNG}
    for path in tmp_path.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
