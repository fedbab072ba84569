"""How much a row costs, and how many rows and host pages a replica gets (plain Python).

A row (one running sequence) holds on its device the dense layers' K/V up to ``max_seq_len`` and,
for every sparse layer, the static sink + slots + window ring; on the host it fills up to
:func:`pages_per_sequence` pool pages. A sequence being prefilled also keeps its prompt's K/V of
the sparse layers until its last chunk (the prefill staging). The automatic sizing plans rows so
that all of this fits a share of the free memory; a device budget (``EngineConfig.device_kv_bytes``,
:func:`budget_rows`) plans them so that the rows, two sequences' prefill staging and, for the
sparse layers, a device page-summary table (:func:`summary_table_bytes`) fit that many bytes, the
same budget for every policy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# M-DCI pages are cut per cluster, so they are not all full (measured 551 B stored per token-head
# against 512 B of a full page at 8k on SmolLM2): the worst-case reservation leaves 25 % headroom.
PAGE_FILL_SLACK = 1.25
SUMMARY_ENTRY_EXTRA = 16  # bytes of a device page-summary entry beyond its float32 mean key
PREFILL_STAGING_ROWS = 2  # sequences whose prefill staging the sizing sets aside


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


def summary_table_bytes(max_seq_len: int, page_size: int, kv_heads: int, head_dim: int, sparse_layers: int) -> int:
    """Device page-summary table of one row: for each sparse layer and KV head,
    ``ceil(ceil(max_seq_len / page_size) * 1.25)`` entries (the pages' fill slack) of a float32
    mean key plus 16 bytes (``head_dim * 4 + 16`` B each)."""
    if sparse_layers <= 0:
        return 0
    pages = math.ceil(math.ceil(max_seq_len / page_size) * PAGE_FILL_SLACK)
    return sparse_layers * kv_heads * pages * (head_dim * 4 + SUMMARY_ENTRY_EXTRA)


def row_cost(dense_layers: int, sparse_layers: int, kv_heads: int, head_dim: int, itemsize: int, max_seq_len: int,
             resident_rows: int, page_size: int, pool_itemsize: int = 4, summary: bool = False) -> RowCost:
    """:class:`RowCost` of a stage with these layers (``resident_rows``: sink + slots + ring).

    ``pool_itemsize`` 2 (a 16-bit pool) adds the index's float32 key copy, 4 * head_dim B per page
    slot, to the host bytes; ``summary`` adds :func:`summary_table_bytes` to the device bytes."""
    per_token = 2 * kv_heads * head_dim * itemsize  # K and V of one token in one layer
    page_bytes = 2 * page_size * head_dim * pool_itemsize + (page_size * head_dim * 4 if pool_itemsize < 4 else 0)
    table = summary_table_bytes(max_seq_len, page_size, kv_heads, head_dim, sparse_layers) if summary else 0
    return RowCost(
        device=per_token * (dense_layers * max_seq_len + sparse_layers * resident_rows) + table,
        staging=per_token * sparse_layers * max_seq_len,
        host=pages_per_sequence(max_seq_len, page_size, kv_heads, sparse_layers) * page_bytes,
    )


def policy_row_cost(ice, n_layers: int, sparse_layers: int, kv_heads: int, head_dim: int, itemsize: int,
                    max_seq_len: int) -> RowCost:
    """:class:`RowCost` of a stage of ``n_layers`` layers (``sparse_layers`` of them sparse) under
    the policy of ``ice`` (an :class:`~icecache_ray.config.IceCacheConfig`): resident rows sink +
    slots + window ring, a device summary table for the sparse layers (icecache with the device
    selector: the only configuration that allocates one), the pool's dtype; token
    policies keep the middle K/V in host arrays (their host bytes are the staging's), except quest
    with the device selector, which keeps it on the device (:func:`quest_device_bytes`)."""
    resident = ice.sink_tokens + ice.retrieved_pages * ice.page_size + (ice.window_pages + 1) * ice.page_size
    pool_itemsize = 4 if ice.pool.dtype == "float32" else 2
    summary = ice.policy == "icecache" and ice.selector == "device"  # only the device selector keeps one
    cost = row_cost(n_layers - sparse_layers, sparse_layers, kv_heads, head_dim, itemsize, max_seq_len, resident,
                    ice.page_size, pool_itemsize, summary=summary)
    if ice.policy == "quest" and ice.selector == "device":
        return RowCost(cost.device + quest_device_bytes(max_seq_len, ice.page_size, kv_heads, head_dim, itemsize, sparse_layers),
                       cost.staging, 0)
    if ice.policy != "icecache":
        cost = RowCost(cost.device, cost.staging, cost.staging)
    return cost


def quest_device_bytes(max_seq_len: int, page_size: int, kv_heads: int, head_dim: int, itemsize: int, sparse_layers: int) -> int:
    """Quest on the device (:class:`~icecache_ray.engine.device_quest.DeviceQuest`) keeps a row's
    middle K/V resident in every sparse layer, plus two float32 bound vectors per page."""
    pages = math.ceil(max_seq_len / page_size)
    per_layer = kv_heads * (2 * pages * page_size * head_dim * itemsize + 2 * pages * head_dim * 4)
    return sparse_layers * per_layer


def budget_rows(cost: RowCost, device_kv_bytes: int, max_seq_len: int, cap: int) -> int:
    """Rows that fit a device budget of ``device_kv_bytes``: each row's ``cost.device`` plus
    :data:`PREFILL_STAGING_ROWS` sequences' prefill staging, at most ``cap``. A budget that cannot
    hold one row raises ValueError naming the sizes."""
    staging = PREFILL_STAGING_ROWS * cost.staging
    rows = (device_kv_bytes - staging) // max(1, cost.device)
    if rows < 1:
        raise ValueError(
            f"EngineConfig.device_kv_bytes={device_kv_bytes}: too small for one row of {max_seq_len} tokens, which needs "
            f"{cost.device} B on the device" + (f" plus {staging} B of prefill staging" if staging else "")
            + f" ({(cost.device + staging) / 2**30:.3f} GiB in all)")
    return int(min(cap, rows))


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
