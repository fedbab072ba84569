"""The command-line tools' shared plumbing: comma-separated integer options and a checked output
path in, one JSON document out (on stdout, and in a file)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def emit_json(result: dict, path: str | None = None) -> None:
    """Write ``result`` as indented JSON to ``path`` (when given) and to stdout."""
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.write(text + "\n")


def json_path(text: str) -> str:
    """argparse ``type=`` for ``--json OUT``: the folder must exist, so a long run never ends
    unable to write its result. Returns the path with ``~`` expanded (the one that was checked)."""
    path = Path(text).expanduser()
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    return str(path)


def positive_ints(text: str, name: str) -> list[int]:
    """``"1,4,8"`` -> [1, 4, 8] (empty parts skipped); ``ValueError`` naming ``--name`` otherwise."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"got --{name}={text!r}: --{name} must be positive integers (each at least 1), comma-separated")
    return [int(part) for part in parts]


def short_gomp_spin(count: str = "1000") -> str | None:
    """Ask libgomp for a short spin (``GOMP_SPINCOUNT``) before torch loads: idle torch threads
    then stop spinning on the cores our index threads need between ops. An explicit value wins.
    Returns the value the process really runs with (``None``: libgomp's default), which is the
    inherited one when torch was already loaded (the variable is read only at load)."""
    if "torch" in sys.modules:
        return os.environ.get("GOMP_SPINCOUNT")
    return os.environ.setdefault("GOMP_SPINCOUNT", count)
