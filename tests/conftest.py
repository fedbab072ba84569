"""Test-session guards: Ray stays on loopback; no shared-memory segment of ours may leak."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import pytest  # noqa: E402

from icecache_ray.pool import list_leaked_segments  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Fail the session if a test left one of *this process's* ``icr_<pid>_`` segments in
    /dev/shm (other processes on the machine, e.g. a benchmark, may own ``icr_`` segments too)."""
    prefix = f"icr_{os.getpid()}_"
    before = set(list_leaked_segments(prefix))
    yield
    import gc

    gc.collect()
    leaked = sorted(set(list_leaked_segments(prefix)) - before)
    if leaked:
        pytest.fail(f"shared-memory segments leaked by the test suite: {leaked}", pytrace=False)
