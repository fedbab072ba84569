"""One run of the Ray Data job as a user starts it (its own local Ray on loopback, in a
subprocess), checked for what the user sees: a clean end (exit 0, no traceback anywhere in its
output: the engine actors' shared-memory pools used to end every run with a resource-tracker
``KeyError``), progress in tokens while the replicas still hold every document, and a folder
whose recorded settings the local engine resumes and a Ray rerun with other settings refuses."""

import json
import shutil
import subprocess
import sys

import pytest

from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.summarize import main
from test_jobs import _args, _doc, _jsonl
from test_progress import LINE, _parse

pytest.importorskip("ray")
DOCS, NEW_TOKENS = 4, 300


@pytest.fixture(scope="module")
def ray_run(never_eos_model_dir, tmp_path_factory):
    """(completed process, output folder, source file, args) of one Ray job run."""
    tmp = tmp_path_factory.mktemp("ray-run")
    src = _jsonl(tmp / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i, 60)} for i in range(DOCS)])
    out = tmp / "out"
    args = _args(never_eos_model_dir, [src], out, "--replicas", "1", "--batch-size", str(DOCS), "--max-running", str(DOCS),
                 "--progress-every", "0.5")
    args[args.index("--engine") + 1] = "ray"
    args[args.index("--max-new-tokens") + 1] = str(NEW_TOKENS)
    proc = subprocess.run([sys.executable, "-m", "icecache_ray.jobs.summarize", *args], capture_output=True, text=True,
                          timeout=400)
    return proc, out, src, args


@pytest.mark.timeout(450)
def test_a_successful_ray_run_ends_without_a_traceback(ray_run):
    proc, out, _, _ = ray_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "Traceback" not in output and "KeyError" not in output, output[-5000:]
    assert len(OutputDir(out).read_all()) == DOCS
    runtime = json.loads((out / "run.json").read_text())["runtime"]
    actors = runtime["index_mode"] == "actors"  # --index-mode auto: actors on a node of >= 8 CPUs
    assert (runtime["stage_workers"], runtime["index_actors"]) == ((1, 1) if actors else (0, 0)), runtime


@pytest.mark.timeout(450)
def test_ray_run_logs_progress_in_tokens_while_the_replica_holds_every_document(ray_run):
    proc, _, _, _ = ray_run
    lines = [_parse(line) for line in proc.stderr.splitlines() if LINE.search(line)]
    assert lines, proc.stderr[-3000:]
    for got in lines:
        assert got["ok"] + got["failed"] <= got["documents"] == DOCS
        assert got["prompt"] <= got["prompt_total"] and got["generated"] <= got["generated_total"]
    # the replica's work, reported through the InFlight actor before any document came back
    assert any(got["ok"] == 0 and got["prompt"] > 0 for got in lines), lines
    assert any(got["ok"] == 0 and 0 < got["generated"] < got["generated_total"] for got in lines), lines
    assert lines[-1]["ok"] == DOCS and lines[-1]["generated"] == lines[-1]["generated_total"] == DOCS * NEW_TOKENS
    assert lines[-1]["prompt"] == lines[-1]["prompt_total"] > 0


@pytest.mark.timeout(450)
def test_ray_run_folder_resumes_locally_and_refuses_other_settings_on_ray(ray_run, tmp_path, caplog):
    import ray

    proc, out, _, args = ray_run
    assert proc.returncode == 0
    folder = shutil.copytree(out, tmp_path / "out")
    args = [str(folder) if a == str(out) else a for a in args]
    other = list(args)
    other[other.index("--max-new-tokens") + 1] = "5"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert main(other) == 2  # --engine ray, refused before Ray starts
    assert f"max_new_tokens: {NEW_TOKENS} -> 5" in caplog.records[-1].getMessage() and not ray.is_initialized()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    local = list(args)
    local[local.index("--engine") + 1] = "local"
    assert main(local) == 0  # the same settings on the other engine: a resume with nothing left
    info = json.loads((folder / "run.json").read_text())
    assert (info["skipped_done"], info["ok"], info["engine"]) == (DOCS, 0, "local")


@pytest.mark.timeout(300)
def test_ray_run_with_index_actors_records_them_and_summarizes_like_in_process(ray_run, never_eos_model_dir, tmp_path):
    """--index-mode actors: each engine actor drives a replica of stage workers and index actors
    (the Deployment's code); run.json's runtime counts them; the summaries are the in-process ones."""
    proc, out, src, args = ray_run
    assert proc.returncode == 0
    actors_out = tmp_path / "actors"
    mine = [str(actors_out) if a == str(out) else a for a in args] + ["--index-mode", "actors"]
    res = subprocess.run([sys.executable, "-m", "icecache_ray.jobs.summarize", *mine], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    runtime = json.loads((actors_out / "run.json").read_text())["runtime"]
    assert (runtime["index_mode"], runtime["replicas"], runtime["stage_workers"], runtime["index_actors"]) == ("actors", 1, 1, 1)
    summaries = lambda folder: dict(zip(*[OutputDir(folder).read_all().column(c).to_pylist() for c in ("id", "summary")]))
    assert summaries(actors_out) == summaries(out)


def test_a_bad_index_mode_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_args(tiny_model_dir, [tmp_path / "docs.jsonl"], tmp_path / "out", "--index-mode", "threads"))
    assert exc.value.code == 2
    assert "--index-mode: invalid choice: 'threads'" in capsys.readouterr().err
