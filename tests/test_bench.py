"""The retrieval benchmark's command line: output contract and clear errors."""

import json

import pytest

from icecache_ray.bench.retrieval import main

SUMMARY_KEYS = {
    "real_recall_icecache_256", "real_recall_quest_256", "real_recall_oracle_token_256",
    "real_recall_oracle_seqpage_256", "synthetic_1m_speedup_vs_bruteforce", "synthetic_1m_hit_rate",
    "query_growth_64k_to_1m", "build_vs_prefill_ratio", "index_bytes_per_token_head",
}


def test_synthetic_run_writes_the_contract(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--json", str(out), "--skip-real", "--sizes", "2048,8192", "--budgets", "64,256",
                 "--policies", "icecache,quest,oracle_token"]) == 0
    data = json.loads(out.read_text())  # strict JSON (unmeasured metrics are null, never NaN)
    assert SUMMARY_KEYS <= set(data["summary"])
    assert data["summary"]["synthetic_1m_hit_rate"] is not None
    assert data["summary"]["real_recall_icecache_256"] is None
    policies = {(r["policy"], r["budget"], r["n_tokens"]) for r in data["rows"]}
    assert ("icecache", 256, 8192) in policies and ("oracle_token", 64, 2048) in policies
    oracle = [r for r in data["rows"] if r["policy"] == "oracle_token"]
    assert all(r["topk_hit_rate"] == 1.0 for r in oracle)


@pytest.mark.parametrize("argv,match", [
    (["--budgets", "abc"], "--budgets='abc'"),
    (["--budgets", "250"], "budget=250"),
    (["--sizes", "0"], "positive integers"),
    (["--policies", "magic"], "unknown \\[.magic.\\]"),
])
def test_bad_arguments_are_clear(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        main(["--json", str(tmp_path / "x.json"), "--skip-real"] + argv)


def test_insert_bench_compares_both_paths_on_the_same_inputs(tmp_path, capsys):
    from icecache_ray.bench import insert

    out = tmp_path / "insert.json"
    assert insert.main(["--stores", "3", "--tokens", "200", "--batches", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["identical_page_tables"] is True
    assert set(result["ms_per_16_token_insert"]) == {"numba", "python"}
    assert all(ms > 0 for ms in result["ms_per_16_token_insert"].values())
    assert result["ms_per_build"] > 0
    with pytest.raises(SystemExit):
        insert.main(["--stores", "1"])
    assert "--stores must be at least 2" in capsys.readouterr().err


def test_speed_bench_interleaved_run_reports_every_configuration(tmp_path):
    from icecache_ray.bench import speed

    out = tmp_path / "s.json"
    assert speed.main(["--random-weights", "--length", "600", "--steps", "3", "--warmup", "1", "--short", "16",
                       "--budgets", "128", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schedule"] == "interleaved"
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"full", "icecache@128", "full@16"}
    assert all(r["steps"] == 3 and len(r["tokens"]) == 5 for r in rows.values())  # prefill token + warmup + steps
    ice = rows["icecache@128"]
    assert ice["pages_loaded_per_step"] >= 0 and ice["host_pool_bytes"] > 0 and ice["select_ms"] > 0
    assert 0 < ice["device_kv_bytes_sparse_layers"] < ice["device_kv_bytes"] and ice["prefill_staging_bytes"] > 0
    assert data["summary"]["full"]["ratio_to_full"] == 1.0


@pytest.mark.parametrize("argv,match", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--budgets", "250"], "budget"),
    (["--layer-reuse", "x"], "--layer-reuse must be positive integers"),
    (["--token-pages", "x"], "--token-pages='x'"),
    (["--token-pages", "12"], "IceCacheConfig.token_pages=12"),
])
def test_speed_bench_rejects_bad_arguments(argv, match, capsys):
    from icecache_ray.bench import speed

    with pytest.raises(SystemExit):
        speed.main(["--random-weights"] + argv)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("module", ["icecache_ray.bench.retrieval", "icecache_ray.bench.speed",
                                    "icecache_ray.bench.insert", "icecache_ray.bench.copy", "icecache_ray.bench.throughput",
                                    "icecache_ray.eval.__main__"])
def test_every_tool_rejects_an_output_folder_that_does_not_exist_before_any_work(module, tmp_path, capsys):
    import importlib

    main_fn = importlib.import_module(module).main
    argv = ["passkey"] if module.endswith("eval.__main__") else []
    with pytest.raises(SystemExit):
        main_fn(argv + ["--json", str(tmp_path / "missing" / "out.json")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_fn(argv + ["--json", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_json_path_returns_the_path_it_checked():
    from pathlib import Path

    from icecache_ray.report import json_path

    assert json_path("~/out.json") == str(Path.home() / "out.json")


@pytest.mark.parametrize("argv,match", [
    (["--max-running", "0"], "--max-running must be positive integers"),
    (["--max-running", "8", "--docs", "4"], "needs at least that many documents"),
    (["--min-tokens", "900", "--max-tokens", "800"], "is below --min-tokens"),
    (["--budget", "250"], "budget"),
    (["--shortlist", "0.5"], "shortlist"),
])
def test_throughput_bench_rejects_bad_arguments(argv, match, capsys):
    from icecache_ray.bench import throughput

    with pytest.raises(SystemExit):
        throughput.main(["--quick"] + argv)
    assert match in capsys.readouterr().err


def test_throughput_runs_policies_in_the_order_asked():
    """Runs of one configuration pair in both orders are how drift of this machine is cancelled."""
    from icecache_ray.bench.throughput import policies
    from icecache_ray.config import IceCacheConfig

    assert list(policies(256, ["icecache", "full"])) == ["icecache@256", "full"]
    assert list(policies(256, ["full", "quest", "full"])) == ["full", "quest@256"]
    assert policies(256, ["icecache"], shortlist=12.0)["icecache@256"].shortlist == 12.0
    assert policies(256, ["icecache"])["icecache@256"].shortlist == IceCacheConfig().shortlist


def test_throughput_random_weights_runs_without_the_bundled_model_or_data(tmp_path, monkeypatch):
    """`--random-weights` (the GPU check's mode: a lent machine has neither the bundled model nor
    ../shared): SmolLM2's shape, random-token documents of the asked lengths, every phase measured,
    and the document that joined mid-flight still decodes the same tokens alone and in the batch."""
    from icecache_ray import model as model_module
    from icecache_ray.bench import throughput, workloads

    def unavailable(*args, **kwargs):
        raise AssertionError("--random-weights must not load the bundled model or read ../shared")

    monkeypatch.setattr(model_module, "load_model", unavailable)
    monkeypatch.setattr(workloads, "long_documents", unavailable)
    out = tmp_path / "t.json"
    argv = ["--random-weights", "--docs", "3", "--min-tokens", "300", "--max-tokens", "340", "--new-tokens", "4",
            "--max-running", "1,2", "--e2e-running", "2", "--steps", "2", "--warmup", "1", "--policies", "full,icecache",
            "--skip-ray", "--skip-hf", "--json", str(out)]
    assert throughput.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["model"].endswith("(random weights)") and all(300 <= n <= 340 for n in data["doc_tokens"])
    assert {(r["phase"], r["config"]) for r in data["rows"]} >= {("steady", "full"), ("steady", "icecache@256"),
                                                                ("e2e", "icecache@256"), ("alone", "icecache@256")}
    assert data["summary"]["tokens_identical"] is True


def test_throughput_device_budget_gives_each_policy_its_rows(tmp_path):
    """--device-kv-gib (the GPU check's capacity run, here on CPU at toy size): the full cache
    (30 layers x 3 KV heads x 64 x float32, K and V: 46080 B a token) gets the 3 rows that 3.5
    rows' bytes hold, icecache@64 more; documents are added so that every row fills; the
    capacity ratios are measured."""
    from icecache_ray.bench import throughput

    out = tmp_path / "t.json"
    row = 46080 * (600 + 3 + 1)  # prompt + new tokens + 1
    argv = ["--random-weights", "--docs", "2", "--context", "600", "--new-tokens", "3", "--budget", "64", "--policies",
            "full,icecache", "--skip-ray", "--skip-hf", "--skip-steady", "--device-kv-gib", str(3.5 * row / 2**30), "--json", str(out)]
    assert throughput.main(argv) == 0
    data = json.loads(out.read_text())
    given = data["summary"]["rows_given"]
    assert given["full"] == 3 and given["icecache@64"] > given["full"]
    e2e = {r["config"]: r for r in data["rows"] if r["phase"] == "e2e"}
    assert {c: r["max_running"] for c, r in e2e.items()} == given
    assert all(r["docs"] == given["icecache@64"] for r in e2e.values()) and data["dtype"] == "float32"
    for key in ("e2e_speedup_icecache_vs_full_capacity", "prefill_ratio_icecache_vs_full"):
        assert data["summary"][key] > 0, key
    with pytest.raises(SystemExit, match="too small for one row"):
        throughput.main(argv[:-4] + ["--device-kv-gib", str(0.5 * row / 2**30)])


@pytest.mark.realmodel
def test_throughput_quick_run_reports_the_contract(tmp_path):
    """The CI smoke run of the throughput benchmark (`--quick`, the same code as the full run):
    every configuration measured, the summary's ratios present, and a document that joined the
    running batch mid-flight decodes the same greedy tokens alone, in the batch and on Ray."""
    from icecache_ray.bench import throughput

    out = tmp_path / "t.json"
    assert throughput.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    summary = data["summary"]
    for key in ("decode_speedup_icecache_vs_full_b4", "decode_scaling_icecache_b4_vs_b1", "e2e_speedup_icecache_vs_full_b4",
                "ray_vs_local_decode_b4", "select_frac_ray_b4"):
        assert summary[key] is not None and summary[key] > 0, key
    assert summary["tokens_identical"] is True
    steady = {(r["config"], r["max_running"]) for r in data["rows"] if r["phase"] == "steady"}
    assert {("full", 4), ("quest@256", 1), ("icecache@256", 4), ("hf_dynamic_cache", 4)} <= steady
    e2e = [r for r in data["rows"] if r["phase"] == "e2e"]
    assert {(r["config"], r["engine"]) for r in e2e} == {("full", "local"), ("quest@256", "local"), ("icecache@256", "local"),
                                                        ("icecache@256", "ray")}
    for row in e2e:
        assert row["docs"] == 4 and all(len(t) == 32 for t in row["tokens"]) and row["steady_steps"] > 0
        assert row["peak_host_pss_bytes"] > 0 and row["device_kv_bytes_per_seq"] > 0
    ray_row = next(r for r in e2e if r["engine"] == "ray")
    assert ray_row["runtime"] == {"engine": "ray", "replicas": 1, "stages": 1, "stage_workers": 1, "index_actors": 1,
                                  "max_running": 4}
