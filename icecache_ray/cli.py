"""The ``icecache-ray`` command: one name for the project's tools.

``icecache-ray COMMAND [options]`` runs the same code, with the same options, as the module it
names (each subcommand hands its arguments to that module's ``main(argv)``; ``python -m ...``
keeps working):

======================================  ==============================================
``icecache-ray summarize ...``          ``python -m icecache_ray.jobs.summarize ...``
``icecache-ray compare ...``            ``python -m icecache_ray.jobs.compare ...``
``icecache-ray eval ...``               ``python -m icecache_ray.eval ...``
``icecache-ray bench NAME ...``         ``python -m icecache_ray.bench.NAME ...``
======================================  ==============================================

``icecache-ray COMMAND --help`` lists the command's options. Exit status: the command's own;
2 for an unknown command.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

PROG = "icecache-ray"
DESCRIPTION = ("IceCache on Ray, the project's tools under one command: each command takes exactly the options\n"
               "of the module it stands for (python -m ..., which keeps working).")
EXIT_USAGE = 2

# command -> (module whose main(argv) runs it, one line for the help)
COMMANDS: dict[str, tuple[str, str]] = {
    "summarize": ("icecache_ray.jobs.summarize", "batch long-document summarization job (local or Ray Data)"),
    "compare": ("icecache_ray.jobs.compare", "ROUGE-L and time of one job output folder against another"),
    "eval": ("icecache_ray.eval.__main__", "accuracy harness: passkey, longgen, ruler, the fidelity suite"),
    "bench": ("icecache_ray.bench", "a benchmark: icecache-ray bench NAME [options]"),
}

BENCH_PACKAGE = Path(__file__).resolve().parent / "bench"


def benches() -> dict[str, str]:
    """bench NAME -> the first line of its docstring, for every module of ``icecache_ray.bench`` that
    runs as ``python -m icecache_ray.bench.NAME`` (read from the source: nothing is imported)."""
    found = {}
    for path in sorted(BENCH_PACKAGE.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^if __name__ == .__main__.:", text, re.M):
            doc = (ast.get_docstring(ast.parse(text)) or "").strip().splitlines()
            found[path.stem] = _plain(doc[0]) if doc else ""
    return found


def _plain(text: str, limit: int = 64) -> str:
    """A docstring's first line for the help: no markup, up to its first colon, at most ``limit`` characters."""
    text = text.replace("``", "").split(": ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def usage() -> str:
    """The top-level help text: every command with its ``python -m`` twin, and every bench."""
    rows = [(name, text, f"python -m {module.removesuffix('.__main__')}") for name, (module, text) in COMMANDS.items()
            if name != "bench"]
    rows.append(("bench NAME", "a benchmark (below)", "python -m icecache_ray.bench.NAME"))
    bench_list = benches()
    width = max(len(name) for name in [*(r[0] for r in rows), *bench_list]) + 2
    text_width = max(len(r[1]) for r in rows) + 2
    lines = [f"usage: {PROG} COMMAND [options]", "", DESCRIPTION, "",
             f"commands ({PROG} COMMAND --help lists the command's options):"]
    lines += [f"  {name:<{width}}{text:<{text_width}}= {twin}" for name, text, twin in rows]
    lines += ["", "benches:"] + [f"  {name:<{width}}{text}" for name, text in bench_list.items()]
    return "\n".join(lines) + "\n"


def resolve(argv: Sequence[str]) -> tuple[Callable[[list[str]], int], list[str]]:
    """(the ``main`` to call, its arguments) for ``argv`` = COMMAND [options]; SystemExit(2) naming
    the mistake for an unknown command or bench."""
    command, rest = argv[0], list(argv[1:])
    if command not in COMMANDS:
        _usage_error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    module = COMMANDS[command][0]
    if command == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            sys.stdout.write(usage())
            raise SystemExit(0 if rest else EXIT_USAGE)
        names = benches()
        if rest[0] not in names:
            _usage_error(f"unknown bench {rest[0]!r} (choose from {', '.join(names)})")
        module, rest = f"{module}.{rest[0]}", rest[1:]
    return importlib.import_module(module).main, rest


def _usage_error(message: str) -> None:
    sys.stderr.write(f"usage: {PROG} COMMAND [options]\n{PROG}: error: {message}; see {PROG} --help\n")
    raise SystemExit(EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``icecache-ray`` (see module docstring). Returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else EXIT_USAGE
    command_main, rest = resolve(argv)
    return int(command_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
