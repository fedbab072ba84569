"""The fidelity suite (``python -m icecache_ray.eval suite``): its statistics, and a few-prompt
smoke run of the same command on the tiny model (the real run is long: outside CI)."""

import json

import pytest

from icecache_ray.eval.suite import main
from icecache_ray.eval.suite_report import (bootstrap_ci, budget_to_match_full, markdown, paired_difference, score_table,
                                            summarize_suite)


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_prompts():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    small = bootstrap_ci([0.0, 1.0] * 10)
    large = bootstrap_ci([0.0, 1.0] * 200)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < small[1] - small[0]


def test_budget_to_match_full_is_the_smallest_budget_within_two_points():
    rows = [{"policy": "full", "budget": None, "score": 0.50}]
    rows += [{"policy": "icecache", "budget": b, "score": s} for b, s in ((64, 0.40), (128, 0.485), (256, 0.52))]
    rows += [{"policy": "quest", "budget": b, "score": s} for b, s in ((256, 0.30), (512, 0.45))]
    table = score_table(rows)
    assert table["icecache@128"]["n"] == 1 and table["full"]["score"] == 0.5
    assert budget_to_match_full(table) == {"icecache": 128, "quest": None}


def test_targets_use_paired_differences_and_stay_open_while_data_is_missing():
    rows = []
    for sample in range(10):  # icecache@256 loses one prompt of ten to the oracle; quest@256 loses three
        for policy, budget, score in (("full", None, 1.0), ("icecache", 256, float(sample != 0)), ("oracle", 256, 1.0),
                                      ("icecache", 128, 1.0), ("quest", 256, float(sample > 2))):
            rows.append({"policy": policy, "budget": budget, "score": score, "length": 4096, "variant": "v", "sample": sample})
    diff = paired_difference(rows, "icecache@256", "oracle@256")
    assert diff["difference"] == pytest.approx(-0.1) and diff["n"] == 10 and diff["lo"] <= -0.1 <= diff["hi"] <= 0.0
    assert paired_difference(rows, "icecache@256", "oracle@512") is None
    got = summarize_suite(rows, [], [])["targets"]
    assert got["ruler_4096: icecache@256 - oracle@256 >= -0.02"]["met"] is False
    assert got["ruler_4096: icecache@128 - quest@256 >= 0"]["met"] is True
    assert got["budget_to_match_full_4096: icecache <= quest / 2"] == {"value": {"icecache": 128, "quest": None}, "met": True}
    assert got["longgen_ratio: icecache@256 <= 1.03"]["met"] is None and got["summary_nll_ratio: icecache@256 <= 1.03"]["value"] is None


@pytest.mark.parametrize("lengths", [[], [4096], [4096, 7680]])
def test_the_table_has_one_separator_per_column_whichever_parts_ran(lengths):
    ruler = [{"policy": "full", "budget": None, "score": 1.0, "length": n, "variant": "v", "sample": 0} for n in lengths]
    longgen = [{"policy": "full", "budget": None, "nll_ratio": 1.0}]
    header, separator, *_ = markdown(summarize_suite(ruler, longgen, [])).splitlines()
    assert header.count("|") == separator.count("|") == len(lengths) + 4
    assert "|  |" not in header


@pytest.mark.timeout(600)
def test_suite_smoke_run_writes_the_output_contract(never_eos_model_dir, tmp_path):
    out = tmp_path / "suite.json"
    assert main(["--json", str(out), "--model", str(never_eos_model_dir), "--lengths", "600",
                 "--variants", "niah_single,variable_tracking", "--samples-per-variant", "1", "--longgen-texts", "1",
                 "--longgen-length", "200", "--longgen-tokens", "8", "--summary-docs", "1", "--summary-tokens", "8"]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    table = summary["ruler_600"]
    expected = {"full", *(f"icecache@{b}" for b in (64, 128, 256, 512, 1024)), *(f"quest@{b}" for b in (256, 512, 1024, 2048)),
                "oracle@128", "oracle@256"}
    assert set(table) == expected and set(summary["longgen_ratio"]) == expected and set(summary["summary_nll_ratio"]) == expected
    for entry in table.values():
        assert entry["n"] == 2 and entry["lo"] <= entry["score"] <= entry["hi"]
    assert set(summary["budget_to_match_full"]["600"]) == {"icecache", "quest", "oracle"}
    assert summary["longgen_ratio"]["full"] == 1.0 and summary["summary_nll_ratio"]["full"] == 1.0
    # a budget covering every page of these prompts: icecache is dense attention
    for ratios in (summary["longgen_ratio"], summary["summary_nll_ratio"]):
        assert ratios["icecache@1024"] == pytest.approx(1.0, abs=1e-3)
    gen = {(r["policy"], r["budget"], r["variant"]): r["generated"] for r in result["rows"]["ruler"]}
    for variant in ("niah_single", "variable_tracking"):
        assert gen[("icecache", 1024, variant)] == gen[("full", None, variant)]
    assert out.with_suffix(".md").exists()


def test_selector_reaches_every_selecting_configuration():
    from icecache_ray.eval.suite import suite_runs

    for selector in ("host", "device"):
        chosen = {(p, cfg.selector) for p, _, cfg in suite_runs(selector=selector) if p in ("icecache", "quest")}
        assert chosen == {("icecache", selector), ("quest", selector)}
    assert {cfg.selector for p, _, cfg in suite_runs() if p == "icecache"} == {"device"}  # the config's default
    assert {cfg.shortlist for p, _, cfg in suite_runs(shortlist=16) if p != "full"} == {16}


@pytest.mark.parametrize("argv,match", [(["--lengths", "0"], "--lengths"), (["--lengths", "x"], "--lengths"),
                                        (["--parts", "magic"], "--parts"), (["--samples-per-variant", "0"], "--samples-per-variant"),
                                        (["--configs", "icecache@300"], "icecache@300"), (["--selector", "gpu"], "--selector"),
                                        (["--shortlist", "0.5"], "--shortlist")])
def test_bad_suite_options_are_named_before_any_model_loads(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path / "s.json"), *argv])
    assert match in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_resume_keeps_finished_prompts_and_runs_only_the_rest(never_eos_model_dir, tmp_path, monkeypatch):
    """``--resume``: an earlier run's finished rows are kept as they were, only missing prompts and
    parts run, a finished file runs nothing, and a run with other row-defining options is refused."""
    from icecache_ray.engine import generate
    from icecache_ray.eval import tasks

    out = tmp_path / "suite.json"
    base = ["--json", str(out), "--model", str(never_eos_model_dir), "--lengths", "400", "--variants", "niah_single",
            "--longgen-texts", "1", "--longgen-length", "200", "--longgen-tokens", "4", "--summary-docs", "1",
            "--summary-tokens", "4", "--batch", "1"]
    assert main(base + ["--samples-per-variant", "1", "--parts", "ruler"]) == 0
    first = json.loads(out.read_text())
    more = base + ["--samples-per-variant", "2", "--parts", "ruler,longgen", "--resume"]
    assert main(more) == 0
    second = json.loads(out.read_text())
    assert [r for r in second["rows"]["ruler"] if r["sample"] == 0] == first["rows"]["ruler"]
    assert {r["sample"] for r in second["rows"]["ruler"]} == {0, 1} and second["summary"]["ruler_400"]["full"]["n"] == 2
    assert len(second["rows"]["longgen"]) == 12 and second["wall_s"] > first["wall_s"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a resumed run with nothing left must not prefill")

    monkeypatch.setattr(tasks, "SharedPrefill", no_decoding)
    monkeypatch.setattr(generate, "SharedPrefill", no_decoding)
    assert main(more) == 0
    assert json.loads(out.read_text())["rows"] == second["rows"]
    with pytest.raises(SystemExit, match="was run with seed=0, this run has 1"):
        main(more + ["--seed", "1"])
    assert main(more + ["--report-only"]) == 0  # no model, no decoding: the summary again from the rows
    assert json.loads(out.read_text())["rows"] == second["rows"] and "targets" in json.loads(out.read_text())["summary"]
    out.write_text("{not json")
    with pytest.raises(SystemExit, match="not a fidelity-suite JSON"):
        main(more)


@pytest.mark.timeout(600)
def test_configs_runs_only_the_named_configurations_and_full(never_eos_model_dir, tmp_path, monkeypatch):
    """``--configs``: rows only for the named labels and ``full``; a resumed run of the same subset
    finds its prompts finished (the full set of configurations is not required)."""
    from icecache_ray.engine import generate
    from icecache_ray.eval import tasks

    out = tmp_path / "subset.json"
    argv = ["--json", str(out), "--model", str(never_eos_model_dir), "--lengths", "400", "--variants", "niah_single",
            "--samples-per-variant", "1", "--parts", "ruler", "--configs", "icecache@256,quest@512"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["summary"]["ruler_400"]) == {"full", "icecache@256", "quest@512"}
    assert {(r["policy"], r["budget"]) for r in result["rows"]["ruler"]} == {("full", None), ("icecache", 256), ("quest", 512)}

    def no_decoding(*args, **kwargs):
        raise AssertionError("every prompt of the subset is finished")

    monkeypatch.setattr(tasks, "SharedPrefill", no_decoding)
    monkeypatch.setattr(generate, "SharedPrefill", no_decoding)
    assert main(argv + ["--resume"]) == 0
    assert json.loads(out.read_text())["rows"] == result["rows"]
    with pytest.raises(SystemExit, match="was run with selector=None, this run has 'host'"):
        main(argv + ["--resume", "--selector", "host"])  # other pages, other rows: not mixed into this file
    with pytest.raises(SystemExit, match="was run with shortlist=None, this run has 16.0"):
        main(argv + ["--resume", "--shortlist", "16"])
    # --report-only runs nothing: it keeps every row of a subset run and the file's own arguments,
    # whatever options it is given (it once kept only units finished by all 12 configurations)
    before = json.loads(out.read_text())
    with pytest.raises(SystemExit, match="without icecache@1024.* resuming would rerun and replace them"):
        main(argv[:-1] + ["icecache@256,quest@512,icecache@1024", "--resume"])  # the subset's rows stay
    assert json.loads(out.read_text()) == before
    assert main(["--json", str(out), "--report-only"]) == 0
    assert json.loads(out.read_text()) == before
