"""Bulk page copies from the host pool into device slots: one gather, one copy, one scatter.

``HostPageCopier`` is the reference and the fallback: gather the pages with NumPy, hand them to
torch, ``index_copy_`` into the slot rows (on CUDA the copy is a synchronous-per-call ``.to``).
``DirectPageCopier`` is the CPU path for float32 pools and buffers: on the CPU the "device"
buffer is host memory too, so one numba pass copies each page row straight from the pool into its
slot row (no staging array, no torch ops; a decode step's loads are mostly per-call overhead).
``CupyPageCopier`` is the GPU path: the gather writes straight into a pinned (page-locked)
staging buffer, one ``cudaMemcpyAsync`` moves it to a device staging buffer on a dedicated CuPy
stream, and the scatter runs on that same stream (torch sees it as an external stream); the
current torch stream then waits on an event, so attention never reads a half-copied slot and
the host never blocks on the copy. All expose the same ``copy(pool, pages, rows, flat,
token_pages, token_rows)``: pages [m] land in the first m * 2 * P of ``rows`` (K rows then V rows
of each page, as the gather lays them out), then the single tokens (row ``token_rows[i]`` of page
``token_pages[i]``, the token slots) in the last 2 t (each token's K row, then its V row), all of
``flat``, the [rows, d] view of a device K/V buffer: one gather, one copy and one scatter for both.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from icecache_ray.kernels import EMPTY


class HostPageCopier:
    """Reference path (any device): see module docstring."""

    name = "host"

    def copy(self, pool, pages: np.ndarray, rows: torch.Tensor, flat: torch.Tensor,
             token_pages: np.ndarray = EMPTY, token_rows: np.ndarray = EMPTY) -> int:
        """pages: [m] pool page ids; token_pages, token_rows: [t]; rows: [m * 2 * P + 2 * t] rows
        of ``flat`` [N, d]. Returns bytes moved host -> device."""
        d = flat.shape[-1]
        staged = np.concatenate([pool.read(pages).reshape(-1, d), pool.read_rows(token_pages, token_rows).reshape(-1, d)])
        flat.index_copy_(0, rows, torch.from_numpy(staged).to(flat.device, flat.dtype))
        return staged.nbytes


@njit(cache=True, nogil=True)
def copy_pages_to_rows(pool_pages: np.ndarray, pages: np.ndarray, rows: np.ndarray, dst: np.ndarray) -> None:
    """pool_pages: [capacity, 2, P, d]; pages: [m] pool page ids; rows: [m * 2 * P] rows of
    ``dst`` [N, d] (K rows then V rows of each page, the order of a pool gather). Bounds are
    checked before anything is written."""
    m, psize = pages.shape[0], pool_pages.shape[2]
    if rows.shape[0] != m * 2 * psize or dst.shape[1] != pool_pages.shape[3]:
        raise ValueError("copy_pages_to_rows: rows / dst do not match the pages")
    for i in range(m):
        if pages[i] < 0 or pages[i] >= pool_pages.shape[0]:
            raise ValueError("copy_pages_to_rows: page id out of range")
    for r in range(rows.shape[0]):
        if rows[r] < 0 or rows[r] >= dst.shape[0]:
            raise ValueError("copy_pages_to_rows: row out of range")
    for i in range(m):
        for t in range(2):
            for s in range(psize):
                dst[rows[(i * 2 + t) * psize + s]] = pool_pages[pages[i], t, s]


@njit(cache=True, nogil=True)
def copy_tokens_to_rows(pool_pages: np.ndarray, pages: np.ndarray, prow: np.ndarray, rows: np.ndarray, dst: np.ndarray) -> None:
    """pool_pages: [capacity, 2, P, d]; token i = row ``prow[i]`` of page ``pages[i]`` (both [t]);
    rows: [2 * t] rows of ``dst`` [N, d] (each token's K row, then its V row). Bounds are checked
    before anything is written."""
    t = pages.shape[0]
    if prow.shape[0] != t or rows.shape[0] != 2 * t or dst.shape[1] != pool_pages.shape[3]:
        raise ValueError("copy_tokens_to_rows: rows / dst do not match the tokens")
    for i in range(t):
        if pages[i] < 0 or pages[i] >= pool_pages.shape[0] or prow[i] < 0 or prow[i] >= pool_pages.shape[2]:
            raise ValueError("copy_tokens_to_rows: token out of range")
    for r in range(rows.shape[0]):
        if rows[r] < 0 or rows[r] >= dst.shape[0]:
            raise ValueError("copy_tokens_to_rows: row out of range")
    for i in range(t):
        for kv in range(2):
            dst[rows[2 * i + kv]] = pool_pages[pages[i], kv, prow[i]]


class DirectPageCopier:
    """CPU path (float32 pool into a float32 CPU buffer): see module docstring."""

    name = "direct"

    def copy(self, pool, pages: np.ndarray, rows: torch.Tensor, flat: torch.Tensor,
             token_pages: np.ndarray = EMPTY, token_rows: np.ndarray = EMPTY) -> int:
        """Same contract as :meth:`HostPageCopier.copy`."""
        ids = np.ascontiguousarray(pages, np.int64)
        index, dst = rows.numpy(), flat.numpy()
        n_page_rows = len(ids) * 2 * pool.layout.page_size
        copy_pages_to_rows(pool.pages, ids, index[:n_page_rows], dst)
        tokens = np.ascontiguousarray(token_pages, np.int64)
        if len(tokens):
            copy_tokens_to_rows(pool.pages, tokens, np.ascontiguousarray(token_rows, np.int64), index[n_page_rows:], dst)
        return (n_page_rows + 2 * len(tokens)) * dst.shape[1] * 4


class CupyPageCopier:
    """GPU path with a pinned staging buffer of ``capacity_pages`` pages (grown on demand)."""

    name = "cupy"

    def __init__(self, page_shape: tuple[int, int, int], device: torch.device, capacity_pages: int = 256) -> None:
        import cupy

        self.cupy = cupy
        self.page_shape = page_shape  # (2, P, d)
        self.device = device
        with cupy.cuda.Device(device.index or 0):
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.torch_stream = torch.cuda.ExternalStream(self.stream.ptr, device=device)
        self._alloc(capacity_pages)

    def _alloc(self, capacity_pages: int) -> None:
        cp = self.cupy
        n = capacity_pages * int(np.prod(self.page_shape))
        self._pinned_mem = cp.cuda.alloc_pinned_memory(n * 4)
        self.pinned = np.frombuffer(self._pinned_mem, np.float32, n).reshape((capacity_pages,) + self.page_shape)
        with cp.cuda.Device(self.device.index or 0):
            self.staging = cp.empty((capacity_pages,) + self.page_shape, cp.float32)
        self.capacity = capacity_pages

    def copy(self, pool, pages: np.ndarray, rows: torch.Tensor, flat: torch.Tensor,
             token_pages: np.ndarray = EMPTY, token_rows: np.ndarray = EMPTY) -> int:
        """Same contract as :meth:`HostPageCopier.copy`; pages then tokens share the staging."""
        if pool.layout.dtype != "float32":
            raise ValueError(f"CupyPageCopier needs a float32 pool, got {pool.layout.dtype}")
        m, t = len(pages), len(token_pages)
        psize, d = self.page_shape[1], self.page_shape[2]
        need = m + -(-t // psize)  # 2 t token rows take t / P pages' room
        if need > self.capacity:
            self.stream.synchronize()  # the old buffers may still be in use by a queued copy
            self._alloc(max(need, 2 * self.capacity))
        self.stream.synchronize()  # the pinned buffer is reused: the previous copy must be done
        pool.read(pages, out=self.pinned[:m])  # the gather, straight into page-locked memory
        n_rows = m * 2 * psize + 2 * t
        if t:
            pool.read_rows(token_pages, token_rows, out=self.pinned.reshape(-1, d)[m * 2 * psize : n_rows].reshape(t, 2, d))
        nbytes = n_rows * d * 4
        self.staging.data.copy_from_host_async(self.pinned.ctypes.data, nbytes, stream=self.stream)  # the one copy
        with torch.cuda.stream(self.torch_stream):
            staged = torch.as_tensor(self.staging, device=self.device).view(-1, d)[:n_rows]
            flat.index_copy_(0, rows, staged.to(flat.dtype))  # the scatter, same stream
        torch.cuda.current_stream(self.device).wait_stream(self.torch_stream)
        return nbytes


def make_copier(device: torch.device, page_shape: tuple[int, int, int], pool_dtype: str, dtype: torch.dtype):
    """The CuPy copier on CUDA devices when CuPy can reach the GPU and the pool is float32; on the
    CPU the direct copier when pool and buffer are both float32; else the host copier (any pool
    dtype: pages decoded to float32 on the host, cast to the buffer's dtype on the device)."""
    if device.type == "cpu" and pool_dtype == "float32" and dtype == torch.float32:
        return DirectPageCopier()
    if device.type == "cuda" and pool_dtype == "float32":
        try:
            import cupy

            if cupy.cuda.is_available():
                return CupyPageCopier(page_shape, device)
        except ImportError:
            pass
    return HostPageCopier()
