"""Index insertion speed: the numba path for plain tokens vs the Python path, same inputs.

``python -m icecache_ray.bench.insert --json OUT [--stores 30] [--tokens 950] [--batches 8]``

Builds ``--stores`` indexes (head_dim 64, page size 16, default index config) over ``--tokens``
clustered random keys each, then inserts ``--batches`` 16-token pages into every store (what a
sealed decode-window page does), once with ``MDCIIndex.fast_insert`` on and once off, and
reports milliseconds per 16-token insert, the median milliseconds per build and whether both built identical page tables. Prints JSON.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from icecache_ray.config import IndexConfig
from icecache_ray.index.mdci import MDCIIndex
from icecache_ray.pool import PagePool, PoolLayout
from icecache_ray.report import emit_json, json_path

HEAD_DIM, PAGE = 64, 16


def _clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    return (centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, HEAD_DIM))).astype(np.float32)


def _inputs(stores: int, tokens: int, batches: int, seed: int) -> list[tuple]:
    """Per store: (build keys, build values, [(keys, values)] of each 16-token insert)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, HEAD_DIM)).astype(np.float32) * 3
    return [(_clustered(rng, centres, tokens), _clustered(rng, centres, tokens),
             [(_clustered(rng, centres, PAGE), _clustered(rng, centres, PAGE)) for _ in range(batches)]) for _ in range(stores)]


def _run(inputs: list[tuple], fast: bool) -> tuple[float, float, list[np.ndarray]]:
    """(ms per 16-token insert, ms per build, page tables) with the numba insert path on or off."""
    need = sum(2 * len(k) // PAGE + 4 * len(b) + 8 for k, _, b in inputs)
    pool = PagePool.create(PoolLayout(need, PAGE, HEAD_DIM, "float32"))
    indexes = []
    try:
        build_s = []
        for keys, values, _ in inputs:
            t0 = time.perf_counter()
            index = MDCIIndex(pool, IndexConfig(), HEAD_DIM)
            index.fast_insert = fast
            index.build(keys, values)
            indexes.append(index)
            build_s.append(time.perf_counter() - t0)
        build_ms = 1e3 * float(np.median(build_s[1:] or build_s))  # the first build may compile the kernels
        indexes[0].insert(*inputs[0][2][0])  # compile outside the timing
        t0 = time.perf_counter()
        for index, (_, _, batches) in zip(indexes[1:], inputs[1:]):
            for k, v in batches:
                index.insert(k, v)
        elapsed = time.perf_counter() - t0
        tables = [ix.table.page_tokens[: ix.n_pages].copy() for ix in indexes]
    finally:
        for index in indexes:
            index.release()
        pool.close()
        pool.unlink()
    return 1e3 * elapsed / sum(len(b) for _, _, b in inputs[1:]), build_ms, tables


def run(args) -> dict:
    inputs = _inputs(args.stores, args.tokens, args.batches, args.seed)
    fast_ms, build_ms, fast_tables = _run(inputs, True)
    python_ms, _, python_tables = _run(inputs, False)
    identical = all(a.shape == b.shape and (a == b).all() for a, b in zip(fast_tables, python_tables))
    return {"config": vars(args) | {"head_dim": HEAD_DIM, "page_size": PAGE}, "date": time.strftime("%Y-%m-%d"),
            "ms_per_16_token_insert": {"numba": fast_ms, "python": python_ms}, "speedup": python_ms / fast_ms,
            "ms_per_build": build_ms,
            "identical_page_tables": identical}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.insert", description=__doc__.splitlines()[0])
    p.add_argument("--stores", type=int, default=30)
    p.add_argument("--tokens", type=int, default=950, help="tokens each index is built over")
    p.add_argument("--batches", type=int, default=8, help="16-token inserts per index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, type=json_path)
    args = p.parse_args(argv)
    for name in ("stores", "tokens", "batches"):
        if getattr(args, name) < (2 if name == "stores" else 1):
            p.error(f"--{name} must be at least {2 if name == 'stores' else 1}, got {getattr(args, name)}")
    emit_json(run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
