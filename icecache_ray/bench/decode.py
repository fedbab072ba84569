"""Decode-step breakdown, single process vs index actors on Ray, at several batch sizes.

``python -m icecache_ray.bench.decode --json OUT [--batches 1,4,8] [--length 1024] [--steps 16]``

For each batch size the same left-padded batch of essay prompts (lengths spread over
``--length`` / 2 .. ``--length``) is prefilled and greedily decoded with icecache@``--budget`` in
three modes: ``single``: the stores in this process (``LocalStores``); ``ray``: the stores in
``--actors`` index actors on a local Ray (loopback), every request a Ray actor call; ``channel``:
the same actors, but the per-layer selection requests go over same-node named pipes
(``icecache_ray.actors.channel``, the runtime's default). In both actor modes K/V goes in through a
shared-memory inbox and selected pages are read in place from the actors' pools. The model runs
in this process in every mode. Per step: total time and the parts from ``StepStats`` (select =
selection including the request round trip in actor modes, split into the time inside the actor
and the transport; load; attend; compute = the rest). Prints JSON; ``summary`` holds
``ray_select_overhead_frac_b8`` (select time / step time at batch 8 with the runtime's transport,
the channel), ``tokens_identical`` (every actor mode vs single, every batch),
``step_ms_single_b8`` and ``step_ms_ray_b8``; the Ray-call transport's numbers are reported too.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from icecache_ray.report import emit_json, json_path, positive_ints, short_gomp_spin

# While the worker waits for a selection answer, libgomp's idle torch threads spin on the cores
# the index actor needs (2 cores here); a short spin frees them. Read when torch loads, hence
# before the import.
_SPIN_IN_EFFECT = short_gomp_spin()

import torch  # noqa: E402

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.cache import IceCache
from icecache_ray.engine.generate import left_padded
from icecache_ray.haystack import essay_prompt_ids
from icecache_ray.model import load_model

log = logging.getLogger("icecache_ray.bench.decode")

TRANSPORTS = {
    "channel": "same-node named pipes (one pickled `select` request per index actor per layer and step: ids and "
               "queries only); builds/inserts as Ray calls; K/V in and pages out through POSIX shared memory",
    "ray": "Ray actor method calls for every request (same payloads); K/V and pages through POSIX shared memory",
}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.decode", description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--length", type=int, default=1024, help="longest prompt (others spread down to half)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--actors", type=int, default=1, help="index actors (layers dealt round-robin)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--select-threads", type=int, default=2, help="threads of each index actor for one select request")
    p.add_argument("--json", default=None, type=json_path)
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    try:
        args.batch_sizes = positive_ints(args.batches, "batches")
    except ValueError as err:
        p.error(str(err))
    for name in ("steps", "length", "budget", "actors", "select_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def _prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    lengths = [length - (length // 2) * i // max(1, batch - 1) for i in range(batch)] if batch > 1 else [length]
    return [essay_prompt_ids(tokenizer, n, seed=i)[0].tolist() for i, n in enumerate(lengths)]


def _run(model, prompts, cache, steps: int, warmup: int = 0, on_warm=None) -> tuple[list[float], list[list[int]]]:
    """Prefill the padded batch, then ``steps`` greedy steps; returns (step seconds, tokens [B][steps]).
    ``on_warm()`` is called after the first ``warmup`` steps."""
    ids, mask = left_padded(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    times, tokens = [], []
    with torch.inference_mode():
        logits = model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
        for i in range(steps):
            if i == warmup and on_warm is not None:
                on_warm()
            t0 = time.perf_counter()
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt[:, 0].tolist())
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            logits = model(nxt, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
            times.append(time.perf_counter() - t0)
    return times, [list(col) for col in zip(*tokens)]


def _row(mode: str, batch: int, times, cache, warmup: int) -> dict:
    kept, steps = times[warmup:], cache.stats.steps[-len(times) + warmup :]
    step_ms = 1e3 * statistics.fmean(kept)
    parts = {f: statistics.fmean(getattr(s, f) for s in steps) for f in ("select_ms", "load_ms", "attend_ms")}
    return {"mode": mode, "batch": batch, "step_ms": step_ms, "step_ms_median": 1e3 * statistics.median(kept), **parts,
            "compute_ms": step_ms - sum(parts.values()), "select_frac": parts["select_ms"] / step_ms}


class RayIndex:
    """Index actors on a local Ray and the clients the caches use, per transport."""

    def __init__(self, cfg: IceCacheConfig, head_dim: int, n_actors: int, select_threads: int = 1) -> None:
        from icecache_ray import ray_utils
        from icecache_ray.actors.channel import ChannelHandle
        from icecache_ray.actors.index import IndexActor
        from icecache_ray.pool import PagePool, PoolLayout
        from icecache_ray.runtime.remote_stores import RayHandle, ServiceClient

        self.ray = ray_utils.connect(num_cpus=2, object_store_memory=100 * 1024**2)
        actor_cls = self.ray.remote(num_cpus=0)(IndexActor)
        self.actors = [actor_cls.remote(cfg, head_dim, 1, None, select_threads) for _ in range(n_actors)]
        self.inbox = PagePool.create(PoolLayout(cfg.pool.capacity_pages, cfg.page_size, head_dim, "float32"))
        rays = [RayHandle(self.ray, a) for a in self.actors]
        self.clients = {
            "ray": [ServiceClient(h, self.inbox) for h in rays],
            "channel": [ServiceClient(ChannelHandle(h, f"{self.inbox.name}_{k}"), self.inbox) for k, h in enumerate(rays)],
        }

    def select_ms_inside(self) -> float:
        """Milliseconds the actors spent inside ``select`` so far (all calls)."""
        return sum(s["select_ms_inside"] for s in self.ray.get([a.stats.remote() for a in self.actors]))

    def factory(self, transport: str, request_id: str):
        from icecache_ray.runtime.remote_stores import RemoteStores

        clients = self.clients[transport]
        return lambda layer: (lambda: RemoteStores(clients[layer % len(clients)], layer, request_id))

    def close(self) -> None:
        for clients in self.clients.values():
            for c in clients:
                c.close()
        self.ray.get([a.close.remote() for a in self.actors])
        self.inbox.close()
        self.inbox.unlink()
        self.ray.shutdown()


def _measure(model, prompts, cfg, args, remote: RayIndex, mode: str, batch: int) -> tuple[dict, list]:
    """One mode at one batch size: the row and the tokens."""
    factory = remote.factory(mode, f"{mode}{batch}") if mode != "single" else None
    cache = IceCache(model, cfg, stores_factory=factory)
    inside = []
    warm = (lambda: inside.append(remote.select_ms_inside())) if mode != "single" else None
    try:
        times, tokens = _run(model, prompts, cache, args.steps + args.warmup, args.warmup, warm)
        row = _row(mode, batch, times, cache, args.warmup)
        if inside:  # selection work inside the actors vs transport, over the measured steps
            row["select_ms_inside_actor"] = (remote.select_ms_inside() - inside[0]) / args.steps
            row["select_ms_transport"] = row["select_ms"] - row["select_ms_inside_actor"]
    finally:
        cache.close()
    log.info("batch %d %s: %.1f ms/step (select %.1f)", batch, mode, row["step_ms"], row["select_ms"])
    return row, tokens


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    cfg = IceCacheConfig(budget=args.budget)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    remote = RayIndex(cfg, head_dim, args.actors, args.select_threads)
    rows, identical = [], True
    try:
        for batch in args.batch_sizes:
            prompts = _prompts(tok, batch, args.length)
            out = {}
            for mode in ("single", "channel", "ray"):
                row, out[mode] = _measure(model, prompts, cfg, args, remote, mode, batch)
                if mode != "single":
                    row["tokens_identical"] = out[mode] == out["single"]
                    identical &= row["tokens_identical"]
                rows.append(row)
    finally:
        remote.close()
    by = {(r["mode"], r["batch"]): r for r in rows}
    summary = {"tokens_identical": identical, "transport": TRANSPORTS["channel"], "also_tried": TRANSPORTS["ray"]}
    if ("channel", 8) in by:
        summary.update({"ray_select_overhead_frac_b8": by[("channel", 8)]["select_frac"],
                        "step_ms_single_b8": by[("single", 8)]["step_ms"], "step_ms_ray_b8": by[("channel", 8)]["step_ms"],
                        "ray_calls_select_frac_b8": by[("ray", 8)]["select_frac"], "step_ms_ray_calls_b8": by[("ray", 8)]["step_ms"]})
    return {"config": {"budget": args.budget, "length": args.length, "steps": args.steps, "actors": args.actors, "select_threads": args.select_threads,
                       "torch_threads": torch.get_num_threads(),
                       "gomp_spincount": _SPIN_IN_EFFECT}, "date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse(argv)
    result = run(args)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
