"""The configurations :mod:`icecache_ray.bench.throughput` measures: steady-state decode of B
prefilled rows (local engine, and transformers' ``DynamicCache`` as the reference) and end-to-end
runs of a document set (local engine, Ray engine). Each returns one JSON row."""

from __future__ import annotations

import logging
import statistics
import time

import torch

from icecache_ray.bench.memory_probe import PeakMemory, ray_actor_pids
from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.sequence import Sequence
from icecache_ray.serving_config import DeploymentConfig, EngineConfig

log = logging.getLogger("icecache_ray.bench.throughput")


# ---------------------------------------------------------------------------- steady state
def steady_local(model, prefills, name: str, ice: IceCacheConfig, batch: int, args, select_threads: int = 1) -> dict:
    """B prefilled documents decoding together in a local engine of B rows, every step timed."""
    from icecache_ray.engine.local import LocalEngine

    n_steps = args.warmup + args.steps
    max_len = max(len(p.prompt) for p in prefills[:batch]) + n_steps + 2
    cfg = EngineConfig(max_running=batch, max_seq_len=max_len, select_threads=select_threads)
    with PeakMemory() as mem, LocalEngine(model, ice, cfg) as engine:
        for pre in prefills[:batch]:
            engine.add_prefilled(Sequence(pre.prompt, n_steps + 1), pre.keys, pre.values, int(pre.logits.argmax()))
        engine.drain()  # index builds of the loaded prompts finish before the clock starts
        step_ms, select_ms, syncs = [], [], []
        for _ in range(n_steps):
            t0 = time.perf_counter()
            engine.step()
            engine.drain()
            step_ms.append(1e3 * (time.perf_counter() - t0))
            select_ms.append(engine.last_stats.select_ms)
            syncs.append(engine.last_stats.host_syncs)
        device_bytes = engine.runner.device_bytes()
    row = _steady_row(name, "local", batch, step_ms[args.warmup :], select_ms[args.warmup :], device_bytes, mem)
    return row | {"selector": ice.selector if ice.policy == "icecache" else None,
                  "shortlist": ice.shortlist if ice.policy == "icecache" and ice.selector == "device" else None,
                  "host_syncs_per_step": statistics.fmean(syncs[args.warmup :])}


def steady_hf(model, prefills, batch: int, args) -> dict:
    """Transformers' decode over a ``DynamicCache`` holding the same K/V (cut to equal lengths)."""
    from transformers import DynamicCache

    length = min(len(p.prompt) for p in prefills[:batch])
    with PeakMemory() as mem:
        cache = DynamicCache(config=model.config)
        for layer in range(len(prefills[0].keys)):
            keys = torch.stack([p.keys[layer][:, :length] for p in prefills[:batch]])
            values = torch.stack([p.values[layer][:, :length] for p in prefills[:batch]])
            cache.update(keys, values, layer)
        tokens = torch.tensor([[int(p.logits.argmax())] for p in prefills[:batch]], device=model.device)
        step_ms = []
        with torch.inference_mode():
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                pos = torch.full((batch, 1), length + i, device=model.device)
                logits = model(input_ids=tokens, cache=cache, position_ids=pos, use_cache=True).logits
                tokens = logits[:, -1].argmax(-1, keepdim=True)
                tokens.cpu()  # the step ends when its tokens are on the host, as in the engine
                step_ms.append(1e3 * (time.perf_counter() - t0))
        kv_bytes = sum(k.numel() * k.element_size() * 2 for k in (layer.keys for layer in cache.layers))
        del cache
    return _steady_row("hf_dynamic_cache", "transformers", batch, step_ms[args.warmup :], None, kv_bytes, mem)


def _steady_row(name, engine, batch, step_ms, select_ms, device_bytes, mem: PeakMemory) -> dict:
    step = statistics.median(step_ms)
    return {"phase": "steady", "config": name, "engine": engine, "max_running": batch, "step_ms_median": step,
            "step_ms_mean": statistics.fmean(step_ms), "steps": len(step_ms), "decode_tok_s": 1e3 * batch / step,
            "select_ms_per_step": statistics.median(select_ms) if select_ms else None,
            "device_kv_bytes_per_seq": device_bytes / batch, **_memory(mem)}


def _memory(mem: PeakMemory) -> dict:
    """Peak host PSS of the run (this process, plus the Ray actors for the Ray engine) and its
    growth over the start of the configuration (the steady phase's shared prefills, the loaded
    model and the Ray actors' baseline are in the first, not in the second)."""
    return {"peak_host_pss_bytes": mem.peak, "peak_host_pss_growth_bytes": mem.growth}


# ---------------------------------------------------------------------------- end to end
def drive(engine, seqs: list[Sequence], rows: int) -> dict:
    """Step ``engine`` until every sequence of ``seqs`` (already queued) has ended; per step its
    time, decode rows, prefill tokens and select ms."""
    steps, reported = [], 0
    t_start = time.perf_counter()
    while engine.has_work and engine.alive:
        t0 = time.perf_counter()
        pending = engine.launch()
        if pending is None:
            break
        engine.complete(pending)
        plan = pending.plan
        steps.append((1e3 * (time.perf_counter() - t0), plan.n_decode, plan.n_tokens - plan.n_decode, engine.last_stats))
        reported = _progress(seqs, reported, t_start)
    failed = [s.error for s in seqs if s.error]
    if failed:
        raise RuntimeError(f"{len(failed)} document(s) failed: {failed[0]}")
    wall = time.perf_counter() - t_start
    return _e2e_numbers(steps, seqs, rows, wall)


def _progress(seqs: list[Sequence], reported: int, t_start: float) -> int:
    """Log each newly ended document (a run of 16 long documents takes minutes); returns how
    many have ended."""
    ended = sum(s.done for s in seqs)
    if ended > reported:
        log.info("end to end: %d/%d documents done after %.0f s", ended, len(seqs), time.perf_counter() - t_start)
    return ended


def _e2e_numbers(steps, seqs, rows: int, wall: float) -> dict:
    prefill_ms = sum(ms for ms, _, pre, _ in steps if pre)
    steady = [(ms, st.select_ms if st is not None else 0.0) for ms, dec, pre, st in steps if dec == rows and not pre]
    step = statistics.median(ms for ms, _ in steady) if steady else None
    select = statistics.median(sel for _, sel in steady) if steady else None
    prompt_tokens = sum(s.prompt_len for s in seqs)
    return {"wall_s": wall, "docs": len(seqs), "docs_per_hour": 3600 * len(seqs) / wall, "steps": len(steps),
            "prefill_tok_s": 1e3 * prompt_tokens / prefill_ms if prefill_ms else None, "prompt_tokens": prompt_tokens,
            "steady_steps": len(steady), "step_ms_median": step, "decode_tok_s": 1e3 * rows / step if step else None,
            "select_ms_per_step": select, "select_frac": select / step if step else None,
            "tokens": [list(s.output) for s in seqs]}


def e2e_local(model, docs, name: str, ice: IceCacheConfig, rows: int, args) -> dict:
    from icecache_ray.engine.local import LocalEngine

    cfg = EngineConfig(max_running=rows, max_step_tokens=args.max_step_tokens, max_seq_len=max(map(len, docs)) + args.new_tokens + 1,
                       select_threads=args.thread_counts[0], device_kv_bytes=getattr(args, "device_kv_bytes", None))
    with PeakMemory() as mem, LocalEngine(model, ice, cfg) as engine:
        seqs = [engine.add(Sequence(ids, args.new_tokens)) for ids in docs]
        out = drive(engine, seqs, rows)
        engine.drain()
        out["wall_s_with_drain"] = time.perf_counter() - seqs[0].stats.submitted_at
        device_bytes = engine.runner.device_bytes()
    return {"phase": "e2e", "config": name, "engine": "local", "max_running": rows,
            "device_kv_bytes_per_seq": device_bytes / rows, **_memory(mem), **out}


def e2e_ray(docs, name: str, ice: IceCacheConfig, rows: int, args) -> dict:
    """The same documents through a one-replica Ray deployment: one stage worker holding every
    layer and the device rows, one index actor owning the host pools (loopback Ray)."""
    from icecache_ray.runtime.deployment import Deployment

    engine_cfg = EngineConfig(max_running=rows, max_step_tokens=args.max_step_tokens,
                              max_seq_len=max(map(len, docs)) + args.new_tokens + 1, select_threads=args.thread_counts[0])
    dep_cfg = DeploymentConfig(replicas=1, stages=1, index_actors_per_stage=1, engine=engine_cfg, threads=args.threads)
    with Deployment(dep_cfg, ice) as dep:
        with PeakMemory(ray_actor_pids()) as mem:
            ids = dep.submit(docs, max_new_tokens=args.new_tokens, eos_token_id=-1)
            seqs = [dep.requests[i][0] for i in ids]
            out = drive(dep.replicas[0].engine, seqs, rows)
        worker = dep.stats()["replicas"][0]["stages"][0].get("worker", {})
        shape = dep.runtime_shape()
    return {"phase": "e2e", "config": name, "engine": "ray", "max_running": rows, "runtime": shape,
            "device_kv_bytes_per_seq": worker.get("device_kv_bytes", 0) / rows, **_memory(mem), **out}
