"""Peak host memory of this process (and optionally of Ray actor processes) while a block runs.

Memory is the proportional set size (PSS, ``/proc/<pid>/smaps_rollup``): shared-memory page pools
mapped by several processes are counted once across them, not once per process as RSS would.
Linux only; elsewhere the peak stays 0.
"""

from __future__ import annotations

import os
import threading


def pss_bytes(pid: int | str = "self") -> int:
    """PSS of one process in bytes (0 when it cannot be read, e.g. the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def ray_actor_pids(prefixes: tuple[str, ...] = ("ray::StageWorker", "ray::IndexActor")) -> list[int]:
    """Pids of this machine's processes whose command line starts with one of ``prefixes``."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(prefixes):
            pids.append(int(entry))
    return pids


class PeakMemory:
    """``with PeakMemory(extra_pids) as m: ...`` then ``m.peak``: the largest summed PSS of this
    process and ``extra_pids``, sampled every ``interval_s`` on a daemon thread (``m.growth``:
    over what was in use at the start)."""

    def __init__(self, extra_pids: list[int] = (), interval_s: float = 0.25) -> None:
        self.pids = ["self", *extra_pids]
        self.interval_s = interval_s
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="peak-memory", daemon=True)

    def sample(self) -> int:
        now = sum(pss_bytes(pid) for pid in self.pids)
        self.peak = max(self.peak, now)
        return now

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    @property
    def growth(self) -> int:
        """Peak minus the memory in use when the block started."""
        return self.peak - self.start

    def __enter__(self) -> "PeakMemory":
        self.start = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()
