"""One output folder, one job, one run's settings: the folder lock (a second job exits 1 at once
naming the owner; a stale lock is taken over with a warning) and the generation settings in
run.json (a rerun with other settings exits 2 naming each difference; --overwrite starts over),
on both engines (the refusals come before any engine starts)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from icecache_ray.jobs.lock import LOCK_NAME, FolderLock
from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.summarize import main
from test_jobs import _args, _doc, _jsonl

ENGINES = ["local", "ray"]


def _job(model_dir, src, out, engine="local", *extra):
    args = _args(model_dir, [src], out, *extra)
    args[args.index("--engine") + 1] = engine
    return args


def _source(tmp_path, n=3):
    return _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": _doc(i)} for i in range(n)])


def _snapshot(folder):
    """Every file in the folder with its size and modification time."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of ``tmp_path / "out"`` until the test ends."""
    out = tmp_path / "out"
    out.mkdir()
    code = (f"import sys; from icecache_ray.jobs.lock import FolderLock; FolderLock({str(out)!r}).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc.pid
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("engine", ENGINES)
def test_second_job_on_a_locked_folder_exits_1_at_once_naming_the_owner(tiny_model_dir, tmp_path, holder, engine, caplog):
    out, owner_pid = holder
    before = _snapshot(out)
    t0 = time.perf_counter()
    assert main(_job(tiny_model_dir, _source(tmp_path), out, engine)) == 1
    assert time.perf_counter() - t0 < 30 and not _ray_started()  # refused before any engine (or Ray) starts
    message = caplog.records[-1].getMessage()
    assert f"pid {owner_pid} on host {socket.gethostname()}" in message and "in use by" in message
    assert _snapshot(out) == before  # wrote nothing


def test_two_jobs_started_at_once_on_one_folder_one_runs_the_other_exits_1(tiny_model_dir, tmp_path):
    """The issue's case: two jobs at once on one --output wrote every document twice."""
    src, out = _source(tmp_path, 6), tmp_path / "out"
    cmd = [sys.executable, "-m", "icecache_ray.jobs.summarize", *_job(tiny_model_dir, src, out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 1)
    assert "is in use by pid" in refused and "Traceback" not in refused
    assert sorted(OutputDir(out).read_all()["id"].to_pylist()) == [f"d{i}" for i in range(6)]  # each once
    assert not (out / LOCK_NAME).exists()  # the running job removed its lock at the end


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "command": "old job"}))
    assert main(_job(tiny_model_dir, _source(tmp_path), out)) == 0
    warnings = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert len(warnings) == 1 and f"pid {dead_pid}" in warnings[0]
    assert len(OutputDir(out).read_all()) == 3 and not (out / LOCK_NAME).exists()


def test_lock_is_exclusive_and_released(tmp_path):
    with FolderLock(tmp_path) as lock:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert lock.held and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RuntimeError, match=f"in use by pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()  # another open file description: flock refuses it
    assert not (tmp_path / LOCK_NAME).exists()
    FolderLock(tmp_path).acquire().release()  # free again


@pytest.mark.parametrize("engine", ENGINES)
def test_rerun_with_other_settings_exits_2_naming_each_difference(tiny_model_dir, tmp_path, engine, caplog):
    src, out = _source(tmp_path), tmp_path / "out"
    assert main(_job(tiny_model_dir, src, out)) == 0
    recorded = json.loads((out / "run.json").read_text())["settings"]
    assert (recorded["policy"], recorded["budget"], recorded["max_new_tokens"]) == ("icecache", 64, 6)
    assert recorded["chat_template_sha256"] and recorded["model"] == tiny_model_dir.name
    before = _snapshot(out)
    args = _job(tiny_model_dir, src, out, engine, "--policy", "full", "--instruction", "Sum it up.")
    args[args.index("--max-new-tokens") + 1] = "5"
    assert main(args) == 2
    assert not _ray_started() and _snapshot(out) == before  # refused before any work, nothing written
    message = caplog.records[-1].getMessage()
    for difference in ("policy: 'icecache' -> 'full'", "budget: 64 -> None", "max_new_tokens: 6 -> 5",
                       "instruction: 'Summarize", "-> 'Sum it up.'", "--overwrite"):
        assert difference in message, (difference, message)
    assert "model" not in message.replace("max_new_tokens", "")  # the same model is no difference


def test_another_model_is_a_difference(tiny_model_dir, never_eos_model_dir, tmp_path, caplog):
    src, out = _source(tmp_path), tmp_path / "out"
    assert main(_job(tiny_model_dir, src, out)) == 0
    assert main(_job(never_eos_model_dir, src, out)) == 2
    message = caplog.records[-1].getMessage()
    assert f"model: {tiny_model_dir.name} (" in message and f"-> {never_eos_model_dir.name} (" in message


def test_overwrite_starts_over_with_the_new_settings(tiny_model_dir, tmp_path):
    src, out = _source(tmp_path), tmp_path / "out"
    assert main(_job(tiny_model_dir, src, out)) == 0
    (out / "notes.txt").write_text("the user's own file")
    assert main(_job(tiny_model_dir, src, out, "local", "--policy", "full", "--overwrite")) == 0
    table = OutputDir(out).read_all()
    assert sorted(table["id"].to_pylist()) == ["d0", "d1", "d2"] and set(table["policy"].to_pylist()) == {"full"}
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["policy"] == "full" and info["skipped_done"] == 0 and info["ok"] == 3
    assert (out / "notes.txt").read_text() == "the user's own file"  # only what runs write is removed


def test_same_settings_resume_and_a_folder_without_settings_is_refused(tiny_model_dir, tmp_path, caplog):
    src, out = _source(tmp_path), tmp_path / "out"
    assert main(_job(tiny_model_dir, src, out)) == 0
    assert main(_job(tiny_model_dir, src, out)) == 0  # same settings: resumes (nothing left)
    assert json.loads((out / "run.json").read_text())["skipped_done"] == 3
    (out / "run.json").unlink()  # results, but nothing says how they were made
    assert main(_job(tiny_model_dir, src, out)) == 2
    assert "settings were not recorded" in caplog.records[-1].getMessage()


def test_run_json_of_an_older_version_is_checked_by_its_options(tiny_model_dir, tmp_path, caplog):
    """Folders the job wrote before run.json had settings: their options still tell policy,
    budget, max-new-tokens and instruction, so ``make demo`` keeps resuming its old folder."""
    def as_an_older_version_wrote_it():
        info = json.loads((out / "run.json").read_text())
        (out / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "settings"}))

    src, out = _source(tmp_path), tmp_path / "out"
    assert main(_job(tiny_model_dir, src, out)) == 0
    as_an_older_version_wrote_it()
    assert main(_job(tiny_model_dir, src, out)) == 0  # resumed
    assert any("older version" in r.getMessage() for r in caplog.records)
    as_an_older_version_wrote_it()
    assert main(_job(tiny_model_dir, src, out, "local", "--budget", "128")) == 2
    assert "budget: 64 -> 128" in caplog.records[-1].getMessage()
