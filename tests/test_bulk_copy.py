"""Bulk page copies: the CuPy path equals the host reference (GPU only); the host path itself."""

import numpy as np
import pytest
import torch

from icecache_ray.kernels.bulk_copy import CupyPageCopier, HostPageCopier, make_copier
from icecache_ray.pool import PagePool, PoolLayout


def _pool_with_pages(n=64, p=16, d=32):
    pool = PagePool.create(PoolLayout(capacity_pages=n, page_size=p, head_dim=d, dtype="float32"))
    ids = pool.alloc(n)
    rng = np.random.default_rng(0)
    for i in ids:
        pool.write(int(i), rng.standard_normal((p, d)), rng.standard_normal((p, d)))
    return pool


def _copy(copier, pool, device):
    p, d = pool.layout.page_size, pool.layout.head_dim
    keys = torch.zeros(2, 3, 8 * p, d, device=device)
    values = torch.zeros_like(keys)
    pages = np.array([5, 17, 3, 40, 41, 63], np.int64)
    slots = np.array([0, 3, 7, 1, 2, 5])
    heads = np.array([0, 1, 2, 0, 1, 2])
    batch = np.array([0, 0, 0, 1, 1, 1])
    base = ((batch * 3 + heads) * 8 * p + slots * p)[:, None] + np.arange(p)[None]
    rows = torch.from_numpy(base.reshape(-1)).to(device)
    moved = copier.copy(pool, pages, rows, keys, values)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return keys.cpu(), values.cpu(), moved, (pages, slots, heads, batch)


def test_host_copier_puts_every_page_in_its_slot():
    pool = _pool_with_pages()
    try:
        keys, values, moved, (pages, slots, heads, batch) = _copy(HostPageCopier(), pool, torch.device("cpu"))
        p = pool.layout.page_size
        for page, s, h, b in zip(pages, slots, heads, batch):
            np.testing.assert_array_equal(keys[b, h, s * p : (s + 1) * p].numpy(), pool.pages[page, 0])
            np.testing.assert_array_equal(values[b, h, s * p : (s + 1) * p].numpy(), pool.pages[page, 1])
        assert moved == len(pages) * pool.layout.page_bytes
        assert isinstance(make_copier(torch.device("cpu"), pool.layout.page_shape), HostPageCopier)
    finally:
        pool.close()
        pool.unlink()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cupy_copier_equals_host_reference():
    pool = _pool_with_pages()
    try:
        device = torch.device("cuda")
        copier = make_copier(device, pool.layout.page_shape)
        assert isinstance(copier, CupyPageCopier)
        ref = _copy(HostPageCopier(), pool, device)
        got = _copy(copier, pool, device)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and got[2] == ref[2]
        small = CupyPageCopier(pool.layout.page_shape, device, capacity_pages=2)  # 6 pages: it grows
        grown = _copy(small, pool, device)
        assert torch.equal(grown[0], ref[0]) and small.capacity >= 6
    finally:
        pool.close()
        pool.unlink()
