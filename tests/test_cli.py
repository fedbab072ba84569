"""The ``icecache-ray`` console command: each subcommand is its module's ``main`` with the same
options (help text identical to ``python -m ...``), unknown commands exit 2, exit codes pass through."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from icecache_ray import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("icecache-ray")

# (icecache-ray arguments, the python -m module they stand for)
TWINS = [
    (["summarize"], "icecache_ray.jobs.summarize"),
    (["compare"], "icecache_ray.jobs.compare"),
    (["eval"], "icecache_ray.eval"),
    (["eval", "suite"], "icecache_ray.eval suite"),
    *[(["bench", name], f"icecache_ray.bench.{name}") for name in cli.benches()],
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pyproject_installs_the_command():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["icecache-ray"] == "icecache_ray.cli:main"
    assert SCRIPT.exists(), f"{SCRIPT} missing: reinstall the package (make setup)"


def test_top_level_help_names_every_command_and_bench():
    res = _run(str(SCRIPT), "--help")
    assert res.returncode == 0, res.stderr
    for name in ["summarize", "compare", "eval", "bench NAME", *cli.benches()]:
        assert re.search(rf"^  {name} ", res.stdout, re.M), name


@pytest.mark.parametrize("args,module", TWINS, ids=[" ".join(a) for a, _ in TWINS])
def test_subcommand_help_is_the_modules_own(args, module):
    """Same parser, so the same options: the help text matches ``python -m MODULE --help``."""
    ours = _run(str(SCRIPT), *args, "--help")
    theirs = _run(sys.executable, "-m", *module.split(), "--help")
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout and "--" in ours.stdout


def test_summarize_help_lists_every_option():
    from icecache_ray.jobs.summarize import build_parser

    help_text = _run(str(SCRIPT), "summarize", "--help").stdout
    options = [o for action in build_parser()._actions for o in action.option_strings]
    assert "--output" in options and "--overwrite" in options
    assert [o for o in options if o not in help_text] == []


def test_every_runnable_bench_is_a_subcommand():
    """``icecache-ray bench X`` exists for each ``python -m icecache_ray.bench.X`` (found from the
    sources, so a new bench needs no registration) and for nothing else."""
    assert {"copy", "insert", "retrieval", "speed", "throughput"} <= set(cli.benches())
    assert not {"harness", "workloads", "__init__"} & set(cli.benches())


@pytest.mark.parametrize("argv,message", [
    (["nope"], "unknown command 'nope'"),
    (["bench", "nope"], "unknown bench 'nope'"),
])
def test_unknown_command_exits_2_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2 and "commands (" in capsys.readouterr().out


def test_exit_status_and_errors_pass_through(tmp_path):
    """A usage error of the subcommand is its own (exit 2, its message, no traceback)."""
    res = _run(str(SCRIPT), "summarize", "--output", str(tmp_path / "out"))
    assert res.returncode == 2 and "--input" in res.stderr and "Traceback" not in res.stderr
    res = _run(str(SCRIPT), "compare", "--reference", str(tmp_path / "a"), "--candidate", str(tmp_path / "b"))
    assert res.returncode == 1 and "--reference" in res.stderr and "no such folder" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "a").exists()  # and it created nothing
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    res = _run(str(SCRIPT), "compare", "--reference", str(tmp_path / "a"), "--candidate", str(tmp_path / "b"))
    assert res.returncode == 1 and "no document is in both" in res.stderr and "Traceback" not in res.stderr
