"""Bulk page copies: the CPU direct path and the CuPy path (GPU only) equal the host reference; the host path itself."""

import numpy as np
import pytest
import torch

from icecache_ray.engine.resident import ResidentKV
from icecache_ray.kernels.bulk_copy import CupyPageCopier, DirectPageCopier, HostPageCopier, make_copier
from icecache_ray.pool import PagePool, PoolLayout

PAGES = np.array([5, 17, 3, 40, 41, 63], np.int64)
SLOTS = np.array([0, 3, 7, 1, 2, 5])
HEADS = np.array([0, 1, 2, 0, 1, 2])
BATCH = np.array([0, 0, 0, 1, 1, 1])
# single tokens (row TOKEN_ROWS[i] of page TOKEN_PAGES[i]) into slot rows no page uses: (b, h, position in the slots)
TOKEN_PAGES = np.array([9, 17, 30, 2], np.int64)
TOKEN_ROWS = np.array([0, 15, 7, 3], np.int64)
TOKEN_AT = (np.array([0, 1, 1, 0]), np.array([2, 0, 1, 1]), np.array([6 * 16 + 1, 6 * 16, 6 * 16 + 5, 4 * 16 + 2]))


@pytest.fixture
def pool():
    p = PagePool.create(PoolLayout(capacity_pages=64, page_size=16, head_dim=32, dtype="float32"))
    rng = np.random.default_rng(0)
    for i in p.alloc(64):
        p.write(int(i), rng.standard_normal((16, 32)), rng.standard_normal((16, 32)))
    yield p
    p.close()
    p.unlink()


def _copy(copier, pool, device):
    """Six pages and four single tokens into the slots of a 2-sequence, 3-head buffer; returns
    (kv, bytes)."""
    kv = ResidentKV(2, 3, 16, 8 * 16, 48, 32, torch.float32, device)
    b, h, pos = TOKEN_AT
    tokens = kv.flat_rows(b, h, kv.slot_start + pos).T.reshape(-1)  # each token's K row, then its V row
    rows = torch.from_numpy(np.concatenate([kv.page_rows(BATCH, HEADS, SLOTS, 16), tokens])).to(device)
    moved = copier.copy(pool, PAGES, rows, kv.flat, TOKEN_PAGES, TOKEN_ROWS)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return kv, moved


def test_host_copier_puts_every_page_and_token_in_its_slot(pool):
    kv, moved = _copy(HostPageCopier(), pool, torch.device("cpu"))
    for page, s, h, b in zip(PAGES, SLOTS, HEADS, BATCH):
        rows = slice(16 + s * 16, 16 + (s + 1) * 16)
        np.testing.assert_array_equal(kv.keys[b, h, rows].numpy(), pool.pages[page, 0])
        np.testing.assert_array_equal(kv.values[b, h, rows].numpy(), pool.pages[page, 1])
    for page, row, b, h, pos in zip(TOKEN_PAGES, TOKEN_ROWS, *TOKEN_AT):
        np.testing.assert_array_equal(kv.keys[b, h, kv.slot_start + pos].numpy(), pool.pages[page, 0, row])
        np.testing.assert_array_equal(kv.values[b, h, kv.slot_start + pos].numpy(), pool.pages[page, 1, row])
    assert moved == len(PAGES) * pool.layout.page_bytes + len(TOKEN_PAGES) * 2 * 32 * 4
    assert int((kv.kv != 0).sum()) == (len(PAGES) * 16 + len(TOKEN_PAGES)) * 2 * 32  # nothing else was touched
    assert isinstance(make_copier(torch.device("cpu"), pool.layout.page_shape, "bfloat16", torch.float32), HostPageCopier)
    assert isinstance(make_copier(torch.device("cpu"), pool.layout.page_shape, "float32", torch.bfloat16), HostPageCopier)


def test_host_copier_reads_a_bfloat16_pool_exactly():
    """A 16-bit pool's pages reach the slots as the pool holds them (decoded, exact in bf16)."""
    p = PagePool.create(PoolLayout(capacity_pages=64, page_size=16, head_dim=32, dtype="bfloat16"))
    try:
        rng = np.random.default_rng(1)
        for i in p.alloc(64):
            p.write(int(i), rng.standard_normal((16, 32)), rng.standard_normal((16, 32)))
        assert isinstance(make_copier(torch.device("cuda"), p.layout.page_shape, "bfloat16", torch.bfloat16), HostPageCopier)
        kv = ResidentKV(2, 3, 16, 8 * 16, 48, 32, torch.bfloat16, torch.device("cpu"))
        rows = torch.from_numpy(kv.page_rows(BATCH, HEADS, SLOTS, 16))
        HostPageCopier().copy(p, PAGES, rows, kv.flat)
        for page, s, h, b in zip(PAGES, SLOTS, HEADS, BATCH):
            got = kv.keys[b, h, 16 + s * 16 : 16 + (s + 1) * 16].float().numpy()
            np.testing.assert_array_equal(got, p.read([page])[0, 0])
    finally:
        p.close()
        p.unlink()


def test_direct_copier_equals_host_reference(pool):
    copier = make_copier(torch.device("cpu"), pool.layout.page_shape, "float32", torch.float32)
    assert isinstance(copier, DirectPageCopier)
    ref, ref_bytes = _copy(HostPageCopier(), pool, torch.device("cpu"))
    got, got_bytes = _copy(copier, pool, torch.device("cpu"))
    assert torch.equal(got.kv, ref.kv) and got_bytes == ref_bytes


def test_direct_copier_rejects_bad_ids_before_writing(pool):
    kv = ResidentKV(2, 3, 16, 8 * 16, 48, 32, torch.float32, torch.device("cpu"))
    rows = torch.from_numpy(kv.page_rows(BATCH, HEADS, SLOTS, 16))
    bad = PAGES.copy()
    bad[-1] = 64  # == capacity
    with pytest.raises(ValueError, match="page id out of range"):
        DirectPageCopier().copy(pool, bad, rows, kv.flat)
    rows_bad = rows.clone()
    rows_bad[0] = kv.flat.shape[0]
    with pytest.raises(ValueError, match="row out of range"):
        DirectPageCopier().copy(pool, PAGES, rows_bad, kv.flat)
    token_row_bad = TOKEN_ROWS.copy()
    token_row_bad[0] = 16  # == page_size
    with pytest.raises(ValueError, match="token out of range"):
        DirectPageCopier().copy(pool, PAGES[:0], rows[: 2 * len(TOKEN_PAGES)], kv.flat, TOKEN_PAGES, token_row_bad)
    assert int((kv.kv != 0).sum()) == 0


def test_resident_write_takes_host_rows_into_a_buffer_on_another_device():
    """Token slots and token policies write rows gathered on the host: the buffer's device (here
    PyTorch's "meta" device, which checks devices like CUDA does but needs no GPU) and dtype win."""
    kv = ResidentKV(2, 3, 16, 8 * 16, 48, 32, torch.bfloat16, torch.device("meta"))
    rows = kv.flat_rows(np.array([1]), np.arange(3)[:, None], kv.slot_start + np.arange(5)[None, :])
    kv.write(rows, torch.ones(2, 3, 5, 32))
    got = kv.read(rows)
    assert got.device.type == "meta" and got.dtype == torch.bfloat16 and got.shape == (2, 3, 5, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cupy_copier_equals_host_reference(pool):
    device = torch.device("cuda")
    copier = make_copier(device, pool.layout.page_shape, "float32", torch.float32)
    assert isinstance(copier, CupyPageCopier)
    ref, ref_bytes = _copy(HostPageCopier(), pool, device)
    got, got_bytes = _copy(copier, pool, device)
    assert torch.equal(got.kv, ref.kv) and got_bytes == ref_bytes
    small = CupyPageCopier(pool.layout.page_shape, device, capacity_pages=2)  # 6 pages + 4 tokens: it grows
    grown, _ = _copy(small, pool, device)
    assert torch.equal(grown.kv, ref.kv) and small.capacity >= 7
