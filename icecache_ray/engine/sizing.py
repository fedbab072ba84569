"""How much a row costs, and how many rows and host pages a replica gets (plain Python).

A row (one running sequence) holds on its device the dense layers' K/V up to ``max_seq_len`` and,
for every sparse layer, the static sink + slots + window ring; on the host it fills up to
:func:`pages_per_sequence` pool pages. A sequence being prefilled also keeps its prompt's K/V of
the sparse layers until its last chunk (the prefill staging). The automatic sizing plans rows so
that all of this fits a share of the free memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# M-DCI pages are cut per cluster, so they are not all full (measured 551 B stored per token-head
# against 512 B of a full page at 8k on SmolLM2): the worst-case reservation leaves 25 % headroom.
PAGE_FILL_SLACK = 1.25


def pages_per_sequence(max_tokens: int, page_size: int, kv_heads: int, sparse_layers: int) -> int:
    """Host pages one sequence of ``max_tokens`` can fill in ``sparse_layers`` layers."""
    if sparse_layers <= 0:
        return 0
    return math.ceil(math.ceil(max_tokens / page_size) * kv_heads * sparse_layers * PAGE_FILL_SLACK)


@dataclass(frozen=True)
class RowCost:
    """Bytes of one row: ``device`` (kept for the sequence's lifetime), ``staging`` (during its
    prefill only), ``host`` (pool pages at most)."""

    device: int
    staging: int
    host: int


def row_cost(dense_layers: int, sparse_layers: int, kv_heads: int, head_dim: int, itemsize: int, max_seq_len: int,
             resident_rows: int, page_size: int, pool_itemsize: int = 4) -> RowCost:
    """:class:`RowCost` of a stage with these layers (``resident_rows``: sink + slots + ring)."""
    per_token = 2 * kv_heads * head_dim * itemsize  # K and V of one token in one layer
    page_bytes = 2 * page_size * head_dim * pool_itemsize
    return RowCost(
        device=per_token * (dense_layers * max_seq_len + sparse_layers * resident_rows),
        staging=per_token * sparse_layers * max_seq_len,
        host=pages_per_sequence(max_seq_len, page_size, kv_heads, sparse_layers) * page_bytes,
    )


def auto_max_running(cost: RowCost, device_free: int, host_free: int, fraction: float, cap: int, same_memory: bool) -> int:
    """Rows that fit ``fraction`` of the free memory (at least 1, at most ``cap``). Two sequences'
    prefill staging are set aside; ``same_memory``: device and host are the same RAM (CPU)."""
    if same_memory:
        rows = (fraction * min(device_free, host_free) - 2 * cost.staging) / max(1, cost.device + cost.host)
    else:
        rows = min((fraction * device_free - 2 * cost.staging) / max(1, cost.device), fraction * host_free / max(1, cost.host))
    return int(max(1, min(cap, rows)))

def available_host_bytes() -> int:
    """Free host memory (MemAvailable on Linux; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
