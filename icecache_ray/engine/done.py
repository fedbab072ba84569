"""A finished future: what a transport hands back when the work ran in the caller's thread."""

from __future__ import annotations


class Done:
    """``result()`` returns ``value`` at once (same interface as ``concurrent.futures.Future``)."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self, timeout=None):
        return self.value
