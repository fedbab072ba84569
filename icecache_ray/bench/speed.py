"""Decode speed and device memory at long context, single process, one run for every policy.

``python -m icecache_ray.bench.speed --length 8192 --steps 32 --json OUT``

For each configuration (the full cache and icecache at each ``--budget``) the same essay prompt is
prefilled, then ``--steps`` greedy tokens are decoded one model call at a time. By default the
configurations are interleaved (one step of each in turn, after every prefill) so that a shared
machine's slow phases hit all of them alike and the ratios compare like with like; an IceCache's
background index work is drained inside its own timed step. Reported per
configuration: median / mean time per decoded token (the first ``--warmup`` steps excluded), the
breakdown select / load / attend / rest from the sequence's counters, pages and bytes moved, hit
rate, the device-resident KV bytes of the row (dense layers at the row's capacity, sparse layers'
sink + slots + ring), the prefill staging (the prompt's K/V of the sparse layers, held until the
last prefill chunk), host pool bytes and index bytes per token.
A short-context reference (``--short``) measures the full cache's per-token time at a few tokens
of context, the floor no cache can beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

from icecache_ray.report import json_path, positive_ints, short_gomp_spin

# libgomp reads it when torch loads, hence before the import (the background index thread needs
# the cores idle torch threads would spin on; as in bench.decode).
_SPIN_IN_EFFECT = short_gomp_spin()

import torch  # noqa: E402

from icecache_ray.config import IceCacheConfig
from icecache_ray.engine.local import LocalEngine
from icecache_ray.engine.sequence import Sequence
from icecache_ray.serving_config import EngineConfig
from icecache_ray.haystack import essay_prompt_ids
from icecache_ray.model import SMOLLM2_SHAPE, load_model, random_smollm2

log = logging.getLogger("icecache_ray.bench.speed")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.speed", description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192, help="prompt tokens (default 8192)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per configuration")
    p.add_argument("--warmup", type=int, default=4, help="first decode steps left out of the timings")
    p.add_argument("--budgets", default="256", help="icecache budgets, comma separated")
    p.add_argument("--layer-reuse", default="1", help="IceCache(r) reuse factors to measure, comma separated")
    p.add_argument("--token-pages", default="default",
                   help="IceCacheConfig.token_pages values to measure, comma separated ('default': the budget's default; 0: whole pages only)")
    p.add_argument("--short", type=int, default=16, help="context of the short full-cache reference (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, type=json_path)
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M's architecture with random weights and random prompt tokens (for machines "
                        "without the bundled model; timings are valid, tokens are not)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--schedule", default="interleaved", choices=["interleaved", "sequential"],
                   help="interleaved (default): prefill every configuration, then decode one token of each in turn")
    args = p.parse_args(argv)
    for name, least in (("length", 1), ("steps", 1), ("warmup", 0), ("short", 0), ("threads", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name} must be >= {least}, got {getattr(args, name)}")
    try:
        _configs(args)  # every list and configuration is validated before the model loads
    except ValueError as err:
        p.error(str(err))
    return args


def _model_and_prompt(args):
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        model = random_smollm2(args.device, dtype)
        ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (1, args.length), generator=torch.Generator().manual_seed(0))
        return model, ids.to(args.device)
    model, tok = load_model(args.model, dtype=dtype)
    model.to(args.device)
    return model, essay_prompt_ids(tok, args.length, seed=0).to(args.device)


class _Run:
    """One configuration on one prompt in a local engine of one row, decoded one greedy token per
    :meth:`step`."""

    def __init__(self, model, ids: torch.Tensor, name: str, cfg: IceCacheConfig, n_steps: int) -> None:
        self.ids, self.name = ids[0].tolist(), name
        self.engine = LocalEngine(model, cfg, EngineConfig(max_running=1, max_seq_len=len(self.ids) + n_steps + 1))
        self.seq = self.engine.add(Sequence(self.ids, n_steps + 1))
        self.times: list[float] = []
        self.prefill_s = 0.0

    def prefill(self) -> None:
        t0 = time.perf_counter()
        while not self.seq.output:
            self.engine.step()
        self.prefill_s = time.perf_counter() - t0

    def step(self) -> None:
        """One decode step, timed until the token is on the host. Background index work is drained
        inside the timed region, so none of it spills into another run's step."""
        t0 = time.perf_counter()
        self.engine.step()
        self.engine.drain()
        self.times.append(time.perf_counter() - t0)

    def row(self, warmup: int) -> dict:
        kept = self.times[warmup:]
        runner = self.engine.runner
        sparse = runner.sparse
        row = {
            "config": self.name,
            "context": len(self.ids),
            "ms_per_token_median": 1e3 * statistics.median(kept),
            "ms_per_token_mean": 1e3 * statistics.fmean(kept),
            "steps": len(kept),
            "prefill_s": self.prefill_s,
            "device_kv_bytes": runner.device_bytes(),
            "device_kv_bytes_sparse_layers": sum(layer.device_bytes() for layer in sparse),
            # a prompt's K/V of the sparse layers, held until its last prefill chunk
            "prefill_staging_bytes": sum(layer.token_bytes for layer in sparse) * len(self.ids),
            "tokens": list(self.seq.output),
        }
        if sparse:
            row.update(_breakdown(self.seq, row["ms_per_token_mean"], self.engine))
        return row

    def close(self) -> None:
        self.engine.close()


def _breakdown(seq: Sequence, mean_ms: float, engine) -> dict:
    """select / load / attend / rest ms per token, pages and bytes moved, hit rate, host memory
    (the sequence's counters over all its decode steps, warm-up included)."""
    st = seq.stats
    n = max(1, st.decode_steps)
    out = {"select_ms": st.select_ms / n, "load_ms": st.load_ms / n, "attend_ms": st.attend_ms / n}
    out["rest_ms"] = mean_ms - out["select_ms"] - out["load_ms"] - out["attend_ms"]
    out["pages_loaded_per_step"] = st.pages_loaded / n
    out["bytes_loaded_per_step"] = st.bytes_loaded / n
    out["hit_rate"] = st.pages_hit / max(1, st.pages_selected)
    out.update(engine.host_memory())
    return out


def _configs(args) -> list[tuple[str, IceCacheConfig | None]]:
    out: list[tuple[str, IceCacheConfig | None]] = [("full", None)]
    for budget in positive_ints(args.budgets, "budgets"):
        for reuse in positive_ints(args.layer_reuse, "layer-reuse"):
            for tokens in _token_pages(args.token_pages):
                name = f"icecache@{budget}" + (f" r={reuse}" if reuse > 1 else "") + (f" token_pages={tokens}" if tokens is not None else "")
                out.append((name, IceCacheConfig(budget=budget, layer_reuse=reuse, token_pages=tokens)))
    return out


def _token_pages(text: str) -> list[int | None]:
    """``--token-pages``: integers and ``default`` (None)."""
    try:
        return [None if x == "default" else int(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"--token-pages={text!r}: comma-separated integers or 'default'") from None


def _runs(model, ids, args) -> list[_Run]:
    n = args.steps + args.warmup
    full = IceCacheConfig(policy="full")
    runs = [_Run(model, ids, name, cfg or full, n) for name, cfg in _configs(args)]
    if args.short:
        runs.append(_Run(model, ids[:, : args.short], f"full@{args.short}", full, n))
    return runs


def _measure_all(runs: list[_Run], args) -> list[dict]:
    """``interleaved``: every run is prefilled, then each step decodes one token of every run in
    turn, so slow phases of a shared machine hit all configurations alike; ``sequential``: one
    run after the other, each freed before the next starts."""
    n_steps = args.steps + args.warmup
    if args.schedule == "interleaved":
        for r in runs:
            r.prefill()
        for _ in range(n_steps):
            for r in runs:
                r.step()
        return [r.row(args.warmup) for r in runs]
    rows = []
    for r in runs:
        r.prefill()
        for _ in range(n_steps):
            r.step()
        rows.append(r.row(args.warmup))
        r.close()
    return rows


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ids = _model_and_prompt(args)
    runs = _runs(model, ids, args)
    try:
        rows = _measure_all(runs, args)
    finally:
        for r in runs:
            r.close()
    for row in rows:
        log.info("%s: %.1f ms/token", row["config"], row["ms_per_token_median"])
    full = rows[0]["ms_per_token_median"]
    summary = {r["config"]: {"ms_per_token": r["ms_per_token_median"], "ratio_to_full": r["ms_per_token_median"] / full} for r in rows}
    for r in rows[1:]:
        if r["config"].startswith("icecache"):
            summary[r["config"]]["tokens_equal_full"] = r["tokens"] == rows[0]["tokens"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} torch threads)"
    return {"length": args.length, "device": device, "dtype": args.dtype, "random_weights": args.random_weights,
            "schedule": args.schedule, "gomp_spincount": _SPIN_IN_EFFECT, "date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.write(json.dumps(result["summary"], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
