"""Bulk page copies from the host pool into device slots: one gather, one copy, one scatter.

``HostPageCopier`` is the reference and the CPU path: gather the pages with NumPy, hand them to
torch, ``index_copy_`` into the slot rows (on CUDA the copy is a synchronous-per-call ``.to``).
``CupyPageCopier`` is the GPU path: the gather writes straight into a pinned (page-locked)
staging buffer, one ``cudaMemcpyAsync`` moves it to a device staging buffer on a dedicated CuPy
stream, and the scatter runs on that same stream (torch sees it as an external stream); the
current torch stream then waits on an event, so attention never reads a half-copied slot and
the host never blocks on the copy. Both expose the same ``copy(pool, pages, rows, flat)``: pages
[m] land in the rows [m * 2 * P] (K rows then V rows of each page, as the gather lays them out)
of ``flat``, the [rows, d] view of a device K/V buffer.
"""

from __future__ import annotations

import numpy as np
import torch


class HostPageCopier:
    """Reference path (any device): see module docstring."""

    name = "host"

    def copy(self, pool, pages: np.ndarray, rows: torch.Tensor, flat: torch.Tensor) -> int:
        """pages: [m] pool page ids; rows: [m * 2 * P] rows of ``flat`` [N, d].
        Returns bytes moved host -> device."""
        staged = torch.from_numpy(pool.read(pages))
        flat.index_copy_(0, rows, staged.view(-1, staged.shape[-1]).to(flat.device, flat.dtype))
        return staged.numel() * staged.element_size()


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

    def copy(self, pool, pages: np.ndarray, rows: torch.Tensor, flat: torch.Tensor) -> int:
        if pool.layout.dtype != "float32":
            raise ValueError(f"CupyPageCopier needs a float32 pool, got {pool.layout.dtype}")
        m = len(pages)
        if m > self.capacity:
            self.stream.synchronize()  # the old buffers may still be in use by a queued copy
            self._alloc(max(m, 2 * self.capacity))
        self.stream.synchronize()  # the pinned buffer is reused: the previous copy must be done
        pool.read(pages, out=self.pinned[:m])  # the gather, straight into page-locked memory
        nbytes = m * int(np.prod(self.page_shape)) * 4
        dst = self.staging[:m]
        dst.data.copy_from_host_async(self.pinned[:m].ctypes.data, nbytes, stream=self.stream)  # the one copy
        with torch.cuda.stream(self.torch_stream):
            staged = torch.as_tensor(dst, device=self.device)
            flat.index_copy_(0, rows, staged.view(-1, staged.shape[-1]).to(flat.dtype))  # the scatter, same stream
        torch.cuda.current_stream(self.device).wait_stream(self.torch_stream)
        return nbytes


def make_copier(device: torch.device, page_shape: tuple[int, int, int]):
    """The CuPy copier on CUDA devices when CuPy can reach the GPU, else the host copier."""
    if device.type == "cuda":
        try:
            import cupy

            if cupy.cuda.is_available():
                return CupyPageCopier(page_shape, device)
        except ImportError:
            pass
    return HostPageCopier()
