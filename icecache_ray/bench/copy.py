"""Host -> device page-copy bandwidth: our bulk copy vs a plain pinned ``cudaMemcpy``.

``python -m icecache_ray.bench.copy --json OUT [--pages 192,1536] [--repeats 50]``

For each size, the same number of random pool pages (float32, page_size 16, head_dim 64: 8 KiB a
page) is moved (a) by ``CupyPageCopier`` (gather into pinned memory + one async copy + scatter
into slots) and (b) by one ``cudaMemcpy`` of an already-contiguous pinned buffer of the same
bytes (the hardware ceiling, no gather, no scatter). Also reports the host gather alone.
Needs a CUDA device; prints JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from icecache_ray.kernels.bulk_copy import CupyPageCopier
from icecache_ray.pool import PagePool, PoolLayout
from icecache_ray.report import emit_json, json_path, positive_ints


def _time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(n_pages: int, pool: PagePool, repeats: int) -> dict:
    import cupy

    device = torch.device("cuda")
    p, d = pool.layout.page_size, pool.layout.head_dim
    rng = np.random.default_rng(n_pages)
    pages = rng.choice(pool.layout.capacity_pages, n_pages, replace=False).astype(np.int64)
    flat = torch.zeros(n_pages * 2 * p, d, device=device)  # K rows then V rows of each page, as in ResidentKV
    rows = torch.randperm(n_pages * 2 * p, device=device)  # a scatter, as into decode slots
    copier = CupyPageCopier(pool.layout.page_shape, device, capacity_pages=n_pages)
    nbytes = n_pages * pool.layout.page_bytes
    ours = _time(lambda: copier.copy(pool, pages, rows, flat), repeats)
    pinned = cupy.cuda.alloc_pinned_memory(nbytes)
    dst = cupy.empty(nbytes // 4, cupy.float32)
    plain = _time(lambda: dst.data.copy_from_host(pinned.ptr, nbytes), repeats)
    out = np.empty((n_pages,) + pool.layout.page_shape, np.float32)
    t0 = time.perf_counter()
    for _ in range(repeats):
        pool.read(pages, out=out)
    gather = (time.perf_counter() - t0) / repeats
    return {
        "pages": n_pages, "bytes": nbytes,
        "bulk_copy_ms": 1e3 * ours, "bulk_copy_GBps": nbytes / ours / 1e9,
        "plain_pinned_memcpy_ms": 1e3 * plain, "plain_pinned_memcpy_GBps": nbytes / plain / 1e9,
        "host_gather_ms": 1e3 * gather,
        "ratio_to_plain": plain / ours,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.copy", description=__doc__.splitlines()[0])
    p.add_argument("--pages", default="36,192,1536,12288", help="pages per copy (36 = one 8k step of a layer at budget 256)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", default=None, type=json_path)
    args = p.parse_args(argv)
    try:
        sizes = positive_ints(args.pages, "pages")
    except ValueError as err:
        p.error(str(err))
    if not torch.cuda.is_available():
        raise SystemExit("bench.copy needs a CUDA device")
    pool = PagePool.create(PoolLayout(capacity_pages=max(sizes) * 2, page_size=16, head_dim=64, dtype="float32"))
    try:
        pool.pages[:] = np.random.default_rng(0).standard_normal(pool.pages.shape, dtype=np.float32)
        rows = [measure(n, pool, args.repeats) for n in sizes]
    finally:
        pool.close()
        pool.unlink()
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
