"""GrowingLayer: the same K/V as transformers' DynamicLayer, written in place."""

import torch
from transformers.cache_utils import DynamicLayer

from icecache_ray.engine.dense_layer import GrowingLayer, spare_rows


def _kv(gen, b=2, h=3, n=5, d=8):
    return torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)


def test_growing_layer_returns_what_dynamic_layer_returns_and_grows_in_place():
    gen = torch.Generator().manual_seed(0)
    ours, ref = GrowingLayer(), DynamicLayer()
    steps = [_kv(gen, n=100)] + [_kv(gen, n=1) for _ in range(120)]  # past the first buffer's room
    reallocations, buffer = 0, None
    for k, v in steps:
        got, want = ours.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].data_ptr() == ours._k.data_ptr()  # a view of the buffer, not a copy
        reallocations += buffer is not ours._k
        buffer = ours._k
    assert ours.get_seq_length() == ref.get_seq_length() == 220
    assert reallocations == 2  # the prompt's buffer (100 + 64 rows), then one 1.5x growth
    assert ours.device_bytes() == 2 * ours._k.numel() * 4 >= 2 * 220 * 2 * 3 * 8 * 4


def test_growing_layer_follows_crop_and_batch_selection():
    gen = torch.Generator().manual_seed(1)
    ours, ref = GrowingLayer(), DynamicLayer()
    for layer in (ours, ref):
        layer.update(*_kv(torch.Generator().manual_seed(2), n=10))
    ours.crop(-3), ref.crop(-3)
    k, v = _kv(gen, n=2)
    got, want = ours.update(k, v), ref.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ours.batch_select_indices(slice(0, 1)), ref.batch_select_indices(slice(0, 1))  # same storage start, smaller batch
    k, v = _kv(gen, b=1, n=1)
    got, want = ours.update(k, v), ref.update(k, v)
    assert got[0].shape == (1, 3, 10, 8) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ours.reset()
    assert ours.device_bytes() == 0 and ours.get_seq_length() == 0
    assert spare_rows(10) == 64 and spare_rows(8192) == 256
