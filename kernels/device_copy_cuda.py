"""The device selector's page loads on CUDA: only the missing pages, pool view → page slots, with
no host round trip.

The torch formulation (:meth:`icecache_ray.engine.device_pages.DevicePages._copy_pages`, the
reference) first lists the missing pages with ``nonzero``, whose result size the host must read
back: a blocking device→host sync in every sparse layer. This kernel takes the static
[n, H, k] plan instead: one thread block per planned page, which returns at once for a page
already resident (a hit) and otherwise copies the page's K and V rows from the pool view (the
shared-memory pool registered as pinned, mapped memory: the reads cross PCIe, only for misses)
into its slot rows. ShadowKV and ClusterKV gather their misses the same way. Elements are moved
as raw 2- or 4-byte words, so the pool and the buffer must have the same dtype; other pairs keep
the torch path. ``tests/test_device_select.py`` checks it against the reference on a GPU.
"""

from __future__ import annotations

import functools

import torch

_SOURCE = r"""
template <typename T>
__device__ void copy_missing(const T* pool, const long long* src, const bool* missing, const long long* dst,
                             T* flat, long long v_offset, long long page_elems) {
    const long long e = blockIdx.x;
    if (!missing[e]) return;  // a hit: the page is already in its slot
    const T* from = pool + src[e] * 2 * page_elems;  // page src[e]: K rows [P, d], then V rows
    T* to_k = flat + dst[e];
    T* to_v = flat + dst[e] + v_offset;
    for (long long i = threadIdx.x; i < page_elems; i += blockDim.x) {
        to_k[i] = from[i];
        to_v[i] = from[page_elems + i];
    }
}

extern "C" __global__ void copy_missing_u16(const unsigned short* pool, const long long* src, const bool* missing,
                                            const long long* dst, unsigned short* flat, long long v_offset,
                                            long long page_elems) {
    copy_missing(pool, src, missing, dst, flat, v_offset, page_elems);
}

extern "C" __global__ void copy_missing_u32(const unsigned int* pool, const long long* src, const bool* missing,
                                            const long long* dst, unsigned int* flat, long long v_offset,
                                            long long page_elems) {
    copy_missing(pool, src, missing, dst, flat, v_offset, page_elems);
}
"""
_WORDS = {2: (torch.int16, "copy_missing_u16"), 4: (torch.int32, "copy_missing_u32")}
THREADS = 256


def supports(pool_t: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether :func:`copy_missing_pages` serves this pool view and buffer (CUDA, same dtype, 2 or
    4 bytes an element, contiguous)."""
    return (pool_t.is_cuda and flat.is_cuda and pool_t.dtype == flat.dtype and flat.element_size() in _WORDS
            and pool_t.is_contiguous() and flat.is_contiguous())


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    import cupy

    return cupy.RawModule(code=_SOURCE, options=("--std=c++14",)).get_function(name)


def copy_missing_pages(pool_t: torch.Tensor, src: torch.Tensor, missing: torch.Tensor, dst_rows: torch.Tensor,
                       flat: torch.Tensor, v_offset_rows: int) -> None:
    """Copy planned pages that are ``missing`` into their slots, on the current torch stream.

    pool_t [capacity, 2, P, d] (the pool view); src [n, H, k] pool page of each planned page
    (any value where not missing); missing [n, H, k] bool; dst_rows [n, H, k] flat K row of each
    page's first slot row in ``flat`` [N, d] (its V rows start ``v_offset_rows`` rows later)."""
    import cupy

    word, name = _WORDS[flat.element_size()]
    d = flat.shape[1]
    page_elems = pool_t.shape[2] * pool_t.shape[3]
    n = src.numel()
    if n == 0:
        return
    args = (cupy.asarray(pool_t.view(word)), cupy.asarray(src.reshape(-1).contiguous()),
            cupy.asarray(missing.reshape(-1).contiguous()), cupy.asarray((dst_rows.reshape(-1) * d).contiguous()),
            cupy.asarray(flat.view(word)), cupy.int64(v_offset_rows * d), cupy.int64(page_elems))
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(flat.device).cuda_stream)
    with stream:
        _kernel(name)((n,), (THREADS,), args)
