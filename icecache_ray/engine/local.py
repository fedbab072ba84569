"""The local engine: one replica in this process (one runner over every layer, one in-process
index service), sized from this machine's memory unless told otherwise."""

from __future__ import annotations

import logging

import torch

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.engine import Engine, LocalStage
from icecache_ray.engine.index_service import IndexService
from icecache_ray.engine.runner import ModelRunner, check_model, is_sparse
from icecache_ray.engine.scheduler import Scheduler
from icecache_ray.engine.sequence import Sequence
from icecache_ray.engine.sizing import auto_max_running, available_host_bytes, budget_rows, pages_per_sequence, policy_row_cost
from icecache_ray.engine.stores import InProcessTransport, ServiceClient
from icecache_ray.serving_config import MAX_AUTO_RUNNING, EngineConfig

log = logging.getLogger(__name__)


def plan_rows(model_config, ice: IceCacheConfig, cfg: EngineConfig, layers: range, device: torch.device, itemsize: int,
              cap: int = MAX_AUTO_RUNNING) -> tuple[int, int]:
    """(rows, tokens per row) of a stage with ``layers``: as configured, else what fits
    ``cfg.device_kv_bytes`` (:func:`budget_rows`), else sized from free memory."""
    max_seq_len = cfg.max_seq_len or model_config.max_position_embeddings
    if cfg.max_running is not None and cfg.device_kv_bytes is None:
        return cfg.max_running, max_seq_len
    _, head_dim = check_model(model_config, ice)
    sparse = sum(1 for i in layers if is_sparse(i, ice))
    cost = policy_row_cost(ice, len(layers), sparse, model_config.num_key_value_heads, head_dim, itemsize, max_seq_len)
    if cfg.device_kv_bytes is not None:
        return _budget_rows(cfg, cost, max_seq_len, ice.policy), max_seq_len
    host_free = available_host_bytes()
    device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_free
    rows = auto_max_running(cost, device_free, host_free, cfg.memory_fraction, min(cap, cfg.max_step_tokens - 1), device.type == "cpu")
    log.info("sized %d row(s) of %d tokens from memory (%.0f MiB device + %.0f MiB host per row)", rows, max_seq_len,
             cost.device / 2**20, cost.host / 2**20)
    return rows, max_seq_len


def _budget_rows(cfg: EngineConfig, cost, max_seq_len: int, policy: str) -> int:
    """Rows the device budget gives (a configured ``max_running`` must fit it)."""
    fit = budget_rows(cost, cfg.device_kv_bytes, max_seq_len, cfg.max_step_tokens - 1)
    if cfg.max_running is not None:
        if cfg.max_running > fit:
            raise ValueError(f"EngineConfig.max_running={cfg.max_running}: more rows than device_kv_bytes="
                             f"{cfg.device_kv_bytes} holds for policy {policy!r} ({fit} of {cost.device} B each)")
        return cfg.max_running
    log.info("policy %s: %d row(s) of %d tokens fit the device budget of %.2f GiB (%.1f MiB per row)", policy, fit,
             max_seq_len, cfg.device_kv_bytes / 2**30, cost.device / 2**20)
    return fit


def host_pages(model_config, ice: IceCacheConfig, layers, max_tokens: int) -> int:
    """Host pages one sequence of ``max_tokens`` can fill in the sparse ``layers`` (icecache)."""
    if ice.policy != "icecache":
        return 0
    return pages_per_sequence(max_tokens, ice.page_size, model_config.num_key_value_heads, sum(1 for i in layers if is_sparse(i, ice)))


class LocalEngine(Engine):
    """:class:`Engine` over one in-process runner; close it (or use ``with``) to free its rows,
    host pool and background thread."""

    def __init__(self, model, ice: IceCacheConfig | None = None, cfg: EngineConfig | None = None) -> None:
        ice, cfg = ice or IceCacheConfig(), cfg or EngineConfig()
        mc = model.config
        n_layers, head_dim = check_model(mc, ice)
        layers = range(n_layers)
        param = next(model.parameters())
        rows, max_seq_len = plan_rows(mc, ice, cfg, layers, param.device, param.element_size())
        if cfg.max_step_tokens <= rows:
            raise ValueError(f"EngineConfig.max_step_tokens={cfg.max_step_tokens}: must exceed the {rows} rows")
        self.config, self.ice = cfg, ice
        pool_pages = cfg.pool_pages or max(1, rows * host_pages(mc, ice, layers, max_seq_len))
        self.service = self.transport = self.client = self.runner = None
        try:
            clients = []
            if ice.policy != "full":
                self.service = IndexService(ice, head_dim, pool_pages, select_threads=cfg.select_threads)
                self.transport = InProcessTransport(self.service)
                self.client = ServiceClient(self.transport)
                clients = [self.client]
            self.runner = ModelRunner(model, ice, layers, rows, max_seq_len, clients)
        except BaseException:
            self.close()
            raise
        capacity = {0: pool_pages} if ice.policy == "icecache" else {}
        need = (lambda n: {0: host_pages(mc, ice, layers, n)}) if capacity else None
        super().__init__([LocalStage(self.runner)], Scheduler(rows, cfg.max_step_tokens, max_seq_len, need, capacity), "local engine")
        self.rows, self.max_seq_len, self.pool_pages = rows, max_seq_len, pool_pages if capacity else 0

    def add_prefilled(self, seq: Sequence, keys: list, values: list, first_token: int) -> Sequence:
        """Start ``seq`` from a dense prefill computed elsewhere (per layer K/V [H, T, d]) and the
        first token it produced; it decodes from the next step on."""
        with self._lock:
            self.scheduler.admit_prefilled(seq)
            self.runner.load_prefill(seq.row, seq.seq_id, keys, values)
            if seq.append(first_token):
                self.scheduler.retire(seq)
        return seq

    def drain(self) -> None:
        """Wait until the background index work queued so far (builds, inserts) is done."""
        for layer in self.runner.sparse:
            layer.stores.wait()

    def host_memory(self) -> dict:
        """Host pool bytes in use and index metadata bytes, also per stored token and KV head."""
        if self.service is None:
            return {}
        st = self.service.stats()
        pool_bytes = st["pool_pages_used"] * self.service.pool.layout.page_bytes if self.service.pool is not None else 0
        tokens = max(1, st["token_heads"])
        return {"host_pool_bytes": pool_bytes, "index_bytes": st["index_bytes"],
                "host_pool_bytes_per_token_head": pool_bytes / tokens, "index_bytes_per_token_head": st["index_bytes"] / tokens}

    @staticmethod
    def auto_rows(model, ice: IceCacheConfig, cfg: EngineConfig) -> int:
        """The rows :class:`LocalEngine` would give ``model`` under ``cfg``."""
        n_layers, _ = check_model(model.config, ice)
        param = next(model.parameters())
        return plan_rows(model.config, ice, cfg, range(n_layers), param.device, param.element_size())[0]

    def close(self) -> None:
        """Free rows, stores and pool (idempotent)."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        for part in (self.client, self.transport, self.service):
            if part is not None:
                part.close()
        self.client = self.transport = self.service = None

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
