"""The host page pool as a tensor the device reads from: one view per pool, made once.

CPU: the shared-memory pages themselves (``torch.from_numpy``; no copy). CUDA: the segment is
registered once as pinned, mapped memory (``cudaHostRegister`` with the mapped flag) and wrapped as
a CUDA tensor over its device pointer, so an ``index_select`` on the device reads exactly the pages
it names over PCIe, with no host gather and no stream synchronize (ShadowKV's and ClusterKV's way
of reading misses). Page bytes are never copied by the host either way.
"""

from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pool_tensor(pool, device) -> torch.Tensor:
    """[capacity, 2, P, d] pages of ``pool`` in its own dtype, readable on ``device``."""
    host = torch.from_numpy(pool.pages)
    if pool.layout.dtype == "bfloat16":
        host = host.view(torch.bfloat16)  # stored as uint16 bit patterns
    if torch.device(device).type == "cpu":
        return host
    return _mapped_cuda_view(pool.pages, host.dtype, device)


def _mapped_cuda_view(pages: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """A CUDA tensor over the host array ``pages`` (registered pinned + mapped; zero copy)."""
    import cupy

    ptr, size = pages.ctypes.data, pages.nbytes
    mapped = 2  # cudaHostRegisterMapped
    cupy.cuda.runtime.hostRegister(ptr, size, mapped)
    dev_ptr = cupy.cuda.runtime.hostGetDevicePointer(ptr, 0)
    memory = cupy.cuda.UnownedMemory(dev_ptr, size, pages)
    element = torch.empty(0, dtype=dtype).element_size()
    raw = cupy.ndarray((size // element,), dtype=_cupy_storage(dtype), memptr=cupy.cuda.MemoryPointer(memory, 0))
    flat = torch.as_tensor(raw, device=device)
    if dtype == torch.bfloat16:
        flat = flat.view(torch.bfloat16)
    return flat.view(pages.shape)


def _cupy_storage(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
