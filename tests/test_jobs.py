"""The summarization job: outputs, bad input, resume, the Ray engine (tiny local model)."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.summarize import main, run, parse_args

WORDS = "the quick brown fox jumps over the lazy dog and runs far away into the woods"


def _doc(i: int, words: int = 120) -> str:
    w = WORDS.split()
    return " ".join(w[(i + j) % len(w)] for j in range(words))


def _args(tiny_model_dir, inputs, out, *extra):
    return [
        "--input", *map(str, inputs), "--output", str(out), "--model", str(tiny_model_dir),
        "--engine", "local", "--budget", "64", "--max-new-tokens", "6", "--threads", "1", "--part-rows", "2", *extra,
    ]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_job_writes_parquet_errors_and_run_json(tiny_model_dir, tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i)} for i in range(3)])
    assert main(_args(tiny_model_dir, [src], tmp_path / "out")) == 0
    table = OutputDir(tmp_path / "out").read_all()
    assert sorted(table["id"].to_pylist()) == ["d0", "d1", "d2"]
    for col in ("summary", "prompt_tokens", "generated_tokens", "truncated", "wall_s", "select_ms_per_step", "hit_rate"):
        assert col in table.column_names
    assert all(n > 0 for n in table["generated_tokens"].to_pylist())
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (info["documents"], info["ok"], info["failed"], info["skipped_done"]) == (3, 3, 0, 0)
    assert info["options"]["policy"] == "icecache" and info["wall_s"] > 0


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_bad_inputs_are_reported_and_good_documents_still_summarized(tiny_model_dir, tmp_path, engine):
    """Each problem is one error row, on both engines (ray: read and validated in Ray Data tasks,
    the folder given as a ``file://`` URI, i.e. through a pyarrow filesystem)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.txt").write_text(_doc(1))
    (folder / "empty.txt").write_text("   \n")
    (folder / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4")
    _jsonl(folder / "nocol.jsonl", [{"id": "x", "body": "no text column"}])
    (folder / "huge.txt").write_text(_doc(2, words=3000))  # far beyond the tiny model's 1024 tokens
    _jsonl(folder / "again.jsonl", [{"id": "good", "text": _doc(3)}])  # the id of good.txt once more
    out = tmp_path / "out"
    args = _args(tiny_model_dir, [folder if engine == "local" else f"file://{folder}", tmp_path / "missing.jsonl"], out)
    args[args.index("--engine") + 1] = engine
    try:
        assert main(args) == 3  # some failed
    finally:
        if engine == "ray":
            import ray

            ray.shutdown()
    table = OutputDir(out).read_all()
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {"good", "huge"}
    assert rows["huge"]["truncated"] and rows["huge"]["document_tokens"] > 1024 and rows["huge"]["prompt_tokens"] <= 1024 - 6
    assert not rows["good"]["truncated"]
    reasons = [json.loads(line)["reason"] for line in (out / "errors.jsonl").read_text().splitlines()]
    for expected in ("empty text", "not valid UTF-8", "unsupported file type '.pdf'", "missing column(s) ['text']", "path does not exist",
                     "duplicate id 'good'"):
        assert any(expected in r for r in reasons), (expected, reasons)
    info = json.loads((out / "run.json").read_text())
    assert info["ok"] == 2 and info["failed"] == 6 and info["truncated"] == 1 and info["exit_code"] == 3
    assert info["data"] == ("ray.data" if engine == "ray" else "local")


@pytest.mark.parametrize("make_input", ["missing", "empty_folder", "all_bad"])
def test_nothing_summarized_exits_4(tiny_model_dir, tmp_path, make_input, caplog):
    """`ray job submit` must not report success for a run that summarized nothing."""
    src = tmp_path / "in"
    if make_input != "missing":
        src.mkdir()
    if make_input == "all_bad":
        (src / "empty.txt").write_text(" ")
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, [src], out)) == 4
    assert json.loads((out / "run.json").read_text())["exit_code"] == 4
    assert "nothing summarized" in caplog.records[-1].getMessage()


def test_resumed_run_with_nothing_left_exits_0(tiny_model_dir, tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": "d0", "text": _doc(0)}])
    assert main(_args(tiny_model_dir, [src], tmp_path / "out")) == 0
    assert main(_args(tiny_model_dir, [src], tmp_path / "out")) == 0


@pytest.mark.parametrize("model,match", [
    ("missing", "--model: model folder .*missing.* does not exist"),
    ("no_config", "has no config.json"),
    ("no_tokenizer", "has no tokenizer that loads"),
])
def test_bad_model_folder_is_named_before_any_work(tiny_model_dir, tmp_path, model, match):
    import shutil

    folder = tmp_path / model
    if model == "no_config":
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x")
    elif model == "no_tokenizer":
        shutil.copytree(tiny_model_dir, folder)
        for f in folder.iterdir():
            if "token" in f.name or f.suffix in (".model", ".txt") or f.name == "special_tokens_map.json":
                f.unlink()
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": "d0", "text": _doc(0)}])
    args = _args(tiny_model_dir, [src], tmp_path / "out")
    args[args.index("--model") + 1] = str(folder)
    with pytest.raises(SystemExit, match=match):
        run(parse_args(args + ["--engine", "ray"]))


def test_bad_options_fail_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--budget"):
        run(parse_args(_args(tiny_model_dir, [tmp_path], tmp_path / "out", "--budget", "10")))
    assert not (tmp_path / "out").exists()


def test_device_kv_budget_sizes_the_rows_and_run_json_reports_them(tiny_model_dir, tmp_path):
    """--device-kv-gib: the full cache of the tiny model (4 layers x 2 KV heads x 16 x float32 x
    1024 tokens, K and V: 1 MiB a row) gets the rows 3.5 of them fit; a budget below one row
    ends the job with the sizes in run.json."""
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i)} for i in range(2)])
    gib = 3.5 / 1024
    assert main(_args(tiny_model_dir, [src], tmp_path / "out", "--policy", "full", "--device-kv-gib", str(gib))) == 0
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["runtime"]["max_running"] == 3 and info["engine_config"]["device_kv_bytes"] == int(gib * 2**30)
    assert main(_args(tiny_model_dir, [src], tmp_path / "small", "--policy", "full", "--device-kv-gib", "0.0001")) == 1
    info = json.loads((tmp_path / "small" / "run.json").read_text())
    assert "too small for one row of 1024 tokens, which needs 1048576 B" in info["error"]
    with pytest.raises(SystemExit, match="device.kv.gib=-1.0"):
        run(parse_args(_args(tiny_model_dir, [src], tmp_path / "bad", "--device-kv-gib", "-1")))


def test_interrupted_run_resumes_with_every_document_exactly_once(tiny_model_dir, tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i, 200)} for i in range(12)])
    out = tmp_path / "out"
    args = _args(tiny_model_dir, [src], out)
    args[args.index("--max-new-tokens") + 1] = "60"
    proc = subprocess.Popen([sys.executable, "-m", "icecache_ray.jobs.summarize", *args], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the harshest interruption: no cleanup at all
    proc.wait()
    first = set(OutputDir(out).done_ids())
    assert 1 <= len(first) < 12
    assert main(args) == 0
    ids = OutputDir(out).read_all()["id"].to_pylist()
    assert sorted(ids) == sorted(f"d{i}" for i in range(12))  # each exactly once
    info = json.loads((out / "run.json").read_text())
    assert info["skipped_done"] == len(first) and info["ok"] == 12 - len(first)


def test_ray_engine_replicas_summarize_like_the_local_engine(tiny_model_dir, tmp_path):
    """Two Ray replicas (local Ray on loopback) produce the same summaries as the in-process run."""
    ray = pytest.importorskip("ray")
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i)} for i in range(4)])
    assert main(_args(tiny_model_dir, [src], tmp_path / "local")) == 0
    args = _args(tiny_model_dir, [src], tmp_path / "ray")
    args[args.index("--engine") + 1] = "ray"
    from icecache_ray import ray_utils

    ray_utils.connect(num_cpus=2, object_store_memory=80 * 1024**2)
    try:
        assert main(args + ["--replicas", "2", "--batch-size", "1"]) == 0
    finally:
        ray.shutdown()
    local = {r["id"]: r["summary"] for r in OutputDir(tmp_path / "local").read_all().to_pylist()}
    remote = {r["id"]: r["summary"] for r in OutputDir(tmp_path / "ray").read_all().to_pylist()}
    assert remote == local
    info = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert info["engine"] == "ray" and info["replicas"] == 2


def test_rouge_l_by_hand():
    from icecache_ray.jobs.compare import lcs_length, rouge_l

    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert rouge_l("The cat sat.", "the cat sat") == 1.0
    assert rouge_l("", "anything") == 0.0
    # candidate "a b x", reference "a b c d": lcs 2, p = 2/3, r = 1/2, f = 4/7
    assert abs(rouge_l("a b x", "a b c d") - 4 / 7) < 1e-12


def test_compare_two_runs(tiny_model_dir, tmp_path):
    from icecache_ray.jobs.compare import compare

    src = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i)} for i in range(2)])
    main(_args(tiny_model_dir, [src], tmp_path / "a"))
    main(_args(tiny_model_dir, [src], tmp_path / "b", "--policy", "full"))
    result = compare(str(tmp_path / "b"), str(tmp_path / "a"))
    assert result["documents"] == 2 and 0.0 <= result["rouge_l_mean"] <= 1.0
    assert result["candidate_s_per_document"] > 0


def test_sigterm_writes_the_buffered_summaries_before_the_job_ends(never_eos_model_dir, tmp_path):
    """`ray job stop` sends SIGTERM: the summaries still in the part buffer must not be lost."""
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i, 60)} for i in range(12)])
    out = tmp_path / "out"
    args = _args(never_eos_model_dir, [src], out, "--max-running", "2")
    args[args.index("--part-rows") + 1] = "1000"  # nothing is written before the end of the run
    args[args.index("--max-new-tokens") + 1] = "100"
    args += ["--progress-every", "0.2"]
    proc = subprocess.Popen([sys.executable, "-m", "icecache_ray.jobs.summarize", *args], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            done = re.search(r"(\d+) of \d+ documents done", line)
            if done and int(done.group(1)) >= 1:  # a progress line once a document has ended
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert 1 <= len(OutputDir(out).done_ids()) < 12
