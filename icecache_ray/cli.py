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

import importlib
import sys
from typing import Callable, Sequence

PROG = "icecache-ray"
DESCRIPTION = ("IceCache on Ray: the project's tools under one command. Each command takes exactly the options of "
               "the module it names (python -m ...), which keeps working.")
EXIT_USAGE = 2

# command -> (module whose main(argv) runs it, one line for the help)
COMMANDS: dict[str, tuple[str, str]] = {
    "summarize": ("icecache_ray.jobs.summarize", "batch long-document summarization job (local or Ray Data)"),
    "compare": ("icecache_ray.jobs.compare", "ROUGE-L and time of one job output folder against another"),
    "eval": ("icecache_ray.eval.__main__", "accuracy harness: passkey, longgen, ruler, the fidelity suite"),
    "bench": ("icecache_ray.bench", "benchmarks: icecache-ray bench NAME [options]"),
}

# bench NAME -> one line for the help (each is python -m icecache_ray.bench.NAME)
BENCHES: dict[str, str] = {
    "copy": "host -> device page-copy bandwidth (CUDA)",
    "insert": "index insertion speed: numba path vs Python path",
    "retrieval": "retrieval recall and speed of the KV policies",
    "speed": "decode speed and device memory at long context, every policy",
    "throughput": "batched decode throughput: policies x max_running, local and Ray",
}


def usage() -> str:
    """The top-level help text: every command and every bench, with its ``python -m`` twin."""
    width = max(map(len, [*COMMANDS, *(f"bench {b}" for b in BENCHES)])) + 2
    lines = [f"usage: {PROG} COMMAND [options]      ({PROG} COMMAND --help: the command's options)", "",
             DESCRIPTION, "", "commands:"]
    for name, (module, text) in COMMANDS.items():
        if name != "bench":
            lines.append(f"  {name:<{width}}{text}  (python -m {module.removesuffix('.__main__')})")
    for name, text in BENCHES.items():
        lines.append(f"  {'bench ' + name:<{width}}{text}  (python -m icecache_ray.bench.{name})")
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
        if rest[0] not in BENCHES:
            _usage_error(f"unknown bench {rest[0]!r} (choose from {', '.join(BENCHES)})")
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
