"""How the command-line tools hand back results: one JSON document on stdout, and in a file."""

from __future__ import annotations

import json
import sys


def emit_json(result: dict, path: str | None = None) -> None:
    """Write ``result`` as indented JSON to ``path`` (when given) and to stdout."""
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.write(text + "\n")
