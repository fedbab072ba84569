"""Batched decode throughput at long context on the engine: policies x max_running, local and Ray.

``python -m icecache_ray.bench.throughput --json OUT`` (``--quick``: the CI smoke run, same code)

Documents are summarization prompts cut from ``../shared/data/longdocs`` (7-8k tokens by default).
Two phases, in one run so that ratios compare like with like:

* **steady state** (``--max-running`` list): for each policy and each batch size B, B documents
  are dense-prefilled once (shared by every policy, :class:`SharedPrefill`) and loaded into a
  local engine of B rows; then every step decodes all B rows (no prefill, no EOS). Reported: the
  median step time, decode tokens/s (B / step), select ms per step, device KV bytes per sequence
  and peak host memory (PSS). Transformers' own decode with its ``DynamicCache`` over the same
  K/V (cut to the batch's shortest prompt, as it needs equal lengths) is the reference row.
* **end to end** (``--e2e-running`` B): every document is queued at once, the engine admits B at
  a time, chunked prefill interleaved with decode, ``--new-tokens`` each (EOS ignored, so every
  policy does the same work); on the local engine for each policy and on the Ray engine (one
  stage worker + one index actor) for icecache. Reported: documents/hour, prefill tokens/s
  (prompt tokens over the time of the steps that carried prefill chunks), steady decode tokens/s
  and select share (steps where all B rows decode and nothing prefills), and each document's
  tokens. ``tokens_identical``: a document that joined the running batch mid-flight gives the
  same greedy tokens alone, in the local batch and on the Ray engine.

``--device-kv-gib X`` (capacity): every policy's end-to-end runs get the rows that fit one device
budget of X GiB (``EngineConfig.device_kv_bytes``: the full cache far fewer than a sparse policy),
on at least as many documents as the most rows given; each row reports ``max_running`` (the rows
given) and the summary ``rows_given`` and the capacity ratios. ``--shape smollm2|llama-8b``,
``--context N`` (prompts of N tokens) and ``--dtype`` (default bfloat16 on CUDA, float32 on the
CPU; a 16-bit model also gets a pool of its dtype) choose the model (:mod:`.shapes`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
import sys
import time

from icecache_ray.report import emit_json, json_path, positive_ints, short_gomp_spin

# libgomp reads it when torch loads (the local engine's background index thread needs the cores
# idle torch threads would spin on; as in bench.speed).
_SPIN_IN_EFFECT = short_gomp_spin()

import torch  # noqa: E402

from icecache_ray.bench.throughput_runs import e2e_local, e2e_ray, steady_hf, steady_local  # noqa: E402
from icecache_ray.bench.capacity import capacity_ratios  # noqa: E402
from icecache_ray.bench.shapes import DTYPES, SHAPES, random_model  # noqa: E402
from icecache_ray.config import IceCacheConfig, PoolConfig  # noqa: E402
from icecache_ray.serving_config import EngineConfig  # noqa: E402

log = logging.getLogger("icecache_ray.bench.throughput")

FULL_DEFAULTS = dict(docs=16, min_tokens=7000, max_tokens=8000, new_tokens=128, max_running="1,4,8,16", e2e_running=8, steps=16)
SHAPE_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "llama-8b": "Llama-3-8B shape"}
QUICK_DEFAULTS = dict(docs=4, min_tokens=1800, max_tokens=2200, new_tokens=32, max_running="1,4", e2e_running=4, steps=8)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m icecache_ray.bench.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: 4 documents of ~2k tokens, 32 new tokens, B 1 and 4")
    p.add_argument("--docs", type=int, help="documents in the end-to-end runs (16; quick 4)")
    p.add_argument("--min-tokens", type=int, help="shortest prompt (7000; quick 1800)")
    p.add_argument("--max-tokens", type=int, help="longest prompt (8000; quick 2200)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per document end to end (128; quick 32)")
    p.add_argument("--max-running", help="batch sizes of the steady-state phase (1,4,8,16; quick 1,4)")
    p.add_argument("--e2e-running", type=int, help="max_running of the end-to-end runs (8; quick 4)")
    p.add_argument("--steps", type=int, help="timed steady-state steps per configuration (16; quick 8)")
    p.add_argument("--warmup", type=int, default=3, help="steady-state steps left out of the timings")
    p.add_argument("--budget", type=int, default=256, help="token budget of quest and icecache")
    p.add_argument("--max-step-tokens", type=int, default=2048, help="the engine's per-step token budget")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the Ray run stays on CPU workers; use --skip-ray there)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (driver and Ray stage worker)")
    p.add_argument("--policies", default="full,quest,icecache", help="policies to measure, run in this order (comma separated)")
    p.add_argument("--select-threads", default="1",
                   help="threads of one batched selection; several values add steady-state rows (the first is used end to end)")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M's architecture with random weights and random-token documents (for machines "
                        "without the bundled model or ../shared data, e.g. a lent GPU machine; timings are valid, tokens are not)")
    p.add_argument("--selectors", default="device,host",
                   help="icecache and quest selectors of the steady phase (the first also runs end to end and is "
                        "labelled icecache@B / quest@B; the others icecache@B/host ...)")
    p.add_argument("--shortlist", type=float, default=None,
                   help="icecache's device selector: pages re-scored exactly per retrieved slot (default: IceCacheConfig's, 12)")
    p.add_argument("--skip-floor", action="store_true",
                   help="leave out the floor rows (the full cache over prompts as long as the budget keeps)")
    p.add_argument("--skip-ray", action="store_true", help="leave out the Ray engine run")
    p.add_argument("--skip-hf", action="store_true", help="leave out the transformers DynamicCache reference")
    p.add_argument("--skip-e2e", action="store_true", help="steady-state phase only")
    p.add_argument("--skip-steady", action="store_true", help="end-to-end phase only")
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES),
                   help="model shape with --random-weights (llama-8b: random weights only)")
    p.add_argument("--context", type=int, help="prompt tokens of every document (sets --min-tokens and --max-tokens)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="model, device rows and host pool dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--device-kv-gib", type=float, default=None,
                   help="one device budget (GiB) for every policy: the end-to-end runs use the rows it gives each")
    p.add_argument("--json", default=None, type=json_path)
    args = p.parse_args(argv)
    if args.context is not None:
        args.min_tokens = args.max_tokens = args.context
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.device_kv_bytes = int(args.device_kv_gib * 2**30) if args.device_kv_gib is not None else None
    if args.shape != "smollm2" and not args.random_weights:
        p.error(f"--shape {args.shape} needs --random-weights (only SmolLM2 is bundled)")
    for key, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.batches = positive_ints(args.max_running, "max-running")
        args.thread_counts = positive_ints(args.select_threads, "select-threads")
        args.policy_names = [x.strip() for x in args.policies.split(",") if x.strip()]
        args.selector_names = [x.strip() for x in args.selectors.split(",") if x.strip()]
        if not args.selector_names or set(args.selector_names) - {"device", "host"}:
            raise ValueError(f"--selectors={args.selectors!r}: choose from device, host")
        unknown = sorted(set(args.policy_names) - {"full", "quest", "icecache"})
        if unknown or not args.policy_names:
            raise ValueError(f"--policies={args.policies!r}: choose from full, quest, icecache")
        IceCacheConfig(budget=args.budget, **_shortlist(args.shortlist))
        EngineConfig(max_running=args.e2e_running, max_step_tokens=args.max_step_tokens, device_kv_bytes=args.device_kv_bytes)
    except ValueError as err:
        p.error(str(err))
    for name, least in (("docs", 1), ("min_tokens", 64), ("new_tokens", 2), ("steps", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.max_tokens < args.min_tokens:
        p.error(f"--max-tokens={args.max_tokens} is below --min-tokens={args.min_tokens}")
    if not args.skip_steady and max(args.batches) > args.docs:
        p.error(f"--max-running {max(args.batches)} needs at least that many documents (--docs={args.docs})")
    return args


def _shortlist(shortlist: float | None) -> dict:
    return {} if shortlist is None else {"shortlist": shortlist}


def policies(budget: int, names=("full", "quest", "icecache"), pool_dtype: str = "float32",
             shortlist: float | None = None) -> dict[str, IceCacheConfig]:
    """label -> config for each policy in ``names``, in that order; ``shortlist`` (None: the
    config's default) goes to icecache (quest's bounds need none)."""
    pool, extra = PoolConfig(dtype=pool_dtype), _shortlist(shortlist)
    every = {"full": ("full", IceCacheConfig(policy="full", pool=pool)),
             "quest": (f"quest@{budget}", IceCacheConfig(policy="quest", budget=budget, pool=pool)),
             "icecache": (f"icecache@{budget}", IceCacheConfig(budget=budget, pool=pool, **extra))}
    return dict(every[n] for n in dict.fromkeys(names))  # the order asked for: runs go in this order


# ---------------------------------------------------------------------------- the run
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, docs = _model_and_documents(args)
    configs = policies(args.budget, args.policy_names, args.dtype, args.shortlist)
    rows: list[dict] = []
    hf_prefill_s = None if args.skip_steady else _steady_phase(model, docs, configs, rows, args)
    e2e_b = args.e2e_running
    given = _rows_given(model, docs, configs, args)
    if given:
        docs = _enough_documents(docs, max(given.values()), args)
    if not args.skip_e2e:
        for name, ice in configs.items():
            b = given.get(name, e2e_b)
            log.info("end to end: %s, local engine, %d rows, %d documents", name, b, len(docs))
            rows.append(e2e_local(model, docs, name, ice, b, args))
        ice_name = f"icecache@{args.budget}"
        if ice_name not in configs:
            return _result(args, docs, hf_prefill_s, rows)
        if not args.skip_ray:
            log.info("end to end: %s, Ray engine, %d rows", ice_name, e2e_b)
            rows.append(e2e_ray(docs, ice_name, configs[ice_name], given.get(ice_name, e2e_b), args))
        joined = min(given.get(ice_name, e2e_b), len(docs) - 1)  # the first document that had to wait for a free row
        log.info("alone: document %d, %s, local engine of one row", joined, ice_name)
        rows.append(e2e_local(model, [docs[joined]], ice_name, configs[ice_name], 1, args) | {"phase": "alone", "doc": joined})
    return _result(args, docs, hf_prefill_s, rows)


def _model_and_documents(args):
    """The bundled model and summarization prompts of the long texts, or (``--random-weights``)
    the ``--shape`` with random weights and random-token prompts of the same lengths."""
    from icecache_ray.bench.workloads import long_documents, random_documents
    from icecache_ray.model import load_model

    dtype = DTYPES[args.dtype]
    if args.random_weights:
        docs = random_documents(args.docs, args.min_tokens, args.max_tokens, SHAPES[args.shape]["vocab_size"])
        return random_model(args.shape, args.device, dtype, context=args.max_tokens + args.new_tokens + 1), docs
    model, tokenizer = load_model()
    return model.to(args.device, dtype), long_documents(tokenizer, args.docs, args.min_tokens, args.max_tokens)


def _rows_given(model, docs, configs, args) -> dict[str, int]:
    """Rows the device budget gives each policy (empty without ``--device-kv-gib``); a budget too
    small for one row of the context ends the run (SystemExit naming the sizes)."""
    from icecache_ray.engine.local import LocalEngine

    if args.device_kv_bytes is None:
        return {}
    cfg = EngineConfig(max_step_tokens=args.max_step_tokens, max_seq_len=max(map(len, docs)) + args.new_tokens + 1,
                       device_kv_bytes=args.device_kv_bytes)
    try:
        given = {name: LocalEngine.auto_rows(model, ice, cfg) for name, ice in configs.items()}
    except ValueError as err:
        raise SystemExit(f"--device-kv-gib={args.device_kv_gib}: {err}") from None
    log.info("rows the %.2f GiB device budget gives: %s", args.device_kv_gib, given)
    return given


def _enough_documents(docs, rows: int, args):
    """At least ``rows`` documents, so every policy's rows fill (random prompts are drawn anew)."""
    if len(docs) >= rows:
        return docs
    if not args.random_weights:
        raise SystemExit(f"--device-kv-gib gives {rows} rows: --docs must be at least {rows}, got {len(docs)}")
    from icecache_ray.bench.workloads import random_documents

    log.info("%d random documents (the most rows the budget gives), not --docs=%d", rows, len(docs))
    return random_documents(rows, args.min_tokens, args.max_tokens, SHAPES[args.shape]["vocab_size"])


def _result(args, docs, hf_prefill_s, rows) -> dict:
    for row in rows:
        log.info("%s", _line(row))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} torch threads)"
    return {"date": time.strftime("%Y-%m-%d"), "device": device,
            "model": (SHAPE_NAMES[args.shape] + " (random weights)") if args.random_weights else "SmolLM2-135M-Instruct",
            "dtype": args.dtype, "device_kv_bytes": args.device_kv_bytes, "gomp_spincount": _SPIN_IN_EFFECT, "quick": args.quick, "budget": args.budget, "new_tokens": args.new_tokens,
            "doc_tokens": [len(d) for d in docs], "hf_prefill_tok_s": hf_prefill_s, "rows": rows,
            "summary": summarize(rows, args)}


def _steady_phase(model, docs, configs, rows: list, args) -> float | None:
    """Dense prefills shared by every steady configuration, then each policy x batch size."""
    from icecache_ray.engine.generate import SharedPrefill

    need = max(args.batches)
    prefills, t0 = [], time.perf_counter()
    for i, ids in enumerate(docs[:need]):
        log.info("dense prefill %d/%d (%d tokens)", i + 1, need, len(ids))
        prefills.append(SharedPrefill(model, ids))
    tok_s = sum(len(d) for d in docs[:need]) / (time.perf_counter() - t0)
    floors = [] if args.skip_floor else [SharedPrefill(model, ids[: args.budget]) for ids in docs[:need]]
    for batch in args.batches:
        for name, ice in configs.items():
            for label, variant, threads in _steady_variants(name, ice, args):
                log.info("steady state: %s, %d rows", label, batch)
                rows.append(steady_local(model, prefills, label, variant, batch, args, threads))
        if floors:  # what the same rows cost when every layer holds as many tokens as the budget keeps
            log.info("steady state: floor (full cache over %d-token prompts), %d rows", args.budget, batch)
            rows.append(steady_local(model, floors, f"floor@{args.budget}", IceCacheConfig(policy="full"), batch, args))
        if not args.skip_hf:
            log.info("steady state: transformers DynamicCache, batch %d", batch)
            rows.append(steady_hf(model, prefills, batch, args))
    return tok_s


def _steady_variants(name: str, ice: IceCacheConfig, args):
    """(label, config, select threads) of one policy's steady rows: icecache and quest once per
    selector (the first keeps the plain label), the host selector once per select-thread count."""
    chooses = ice.policy in ("icecache", "quest")
    selectors = args.selector_names if chooses else [ice.selector]
    for k, selector in enumerate(selectors):
        variant = replace(ice, selector=selector) if chooses else ice
        base = name if k == 0 else f"{name}/{selector}"
        threads = args.thread_counts if ice.policy != "full" and variant.selector == "host" else args.thread_counts[:1]
        for t in threads:
            yield (base if t == threads[0] else f"{base} select_threads={t}"), variant, t


def _line(row: dict) -> str:
    tok_s = row.get("decode_tok_s")
    return (f"{row['phase']:6s} {row['config']:16s} {row['engine']:12s} B={row['max_running']:<2d} "
            f"decode {tok_s or float('nan'):.1f} tok/s" + (f", {row['docs_per_hour']:.0f} docs/h" if "docs_per_hour" in row else ""))


def _find(rows, phase, config, engine, batch):
    for row in rows:
        if (row["phase"], row["config"], row["engine"], row["max_running"]) == (phase, config, engine, batch):
            return row
    return None


def _ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def summarize(rows: list[dict], args) -> dict:
    """The ratios of the issue's contract, at the end-to-end batch size B (8; quick 4)."""
    b, ice = args.e2e_running, f"icecache@{args.budget}"
    steady = {(r["config"], r["max_running"]): r for r in rows if r["phase"] == "steady"}
    local, full_e2e = _find(rows, "e2e", ice, "local", b), _find(rows, "e2e", "full", "local", b)
    ray = _find(rows, "e2e", ice, "ray", b)
    alone = next((r for r in rows if r["phase"] == "alone"), None)
    out = {
        f"decode_speedup_icecache_vs_full_b{b}": _ratio(steady.get((ice, b)), steady.get(("full", b)), "decode_tok_s"),
        f"decode_scaling_icecache_b{b}_vs_b1": _ratio(steady.get((ice, b)), steady.get((ice, 1)), "decode_tok_s"),
        f"decode_speedup_quest_vs_full_b{b}": _ratio(steady.get((f"quest@{args.budget}", b)), steady.get(("full", b)), "decode_tok_s"),
        f"decode_speedup_icecache_vs_hf_b{b}": _ratio(steady.get((ice, b)), steady.get(("hf_dynamic_cache", b)), "decode_tok_s"),
        f"e2e_speedup_icecache_vs_full_b{b}": _ratio(local, full_e2e, "docs_per_hour"),
        f"ray_vs_local_decode_b{b}": _ratio(ray, local, "decode_tok_s"),
        f"select_frac_ray_b{b}": ray["select_frac"] if ray else None,
        f"select_frac_local_b{b}": local["select_frac"] if local else None,
        "tokens_identical": None,
    }
    out.update(_steady_targets(steady, args))
    if getattr(args, "device_kv_bytes", None) is not None:  # each policy at the rows the budget gave it
        out.update(capacity_ratios(rows, args.budget))
    if alone is not None and local is not None:
        doc = alone["doc"]
        variants = [alone["tokens"][0], local["tokens"][doc]] + ([ray["tokens"][doc]] if ray else [])
        out["tokens_identical"] = all(v == variants[0] for v in variants)
        out["tokens_identical_compared"] = ["alone", "local batch"] + (["ray batch"] if ray else [])
        if ray:
            out["ray_local_docs_identical"] = sum(a == r for a, r in zip(local["tokens"], ray["tokens"]))
    return out


def _steady_targets(steady: dict, args) -> dict:
    """Per batch size: icecache's step against the floor and the full cache, its select share;
    per configuration: device->host transfers per step."""
    ice, out = f"icecache@{args.budget}", {}
    for b in args.batches:
        row, full, floor = steady.get((ice, b)), steady.get(("full", b)), steady.get((f"floor@{args.budget}", b))
        out[f"icecache_step_vs_floor_b{b}"] = _ratio(floor, row, "decode_tok_s")
        out[f"decode_speedup_icecache_vs_full_b{b}"] = _ratio(row, full, "decode_tok_s")
        out[f"select_frac_b{b}"] = row["select_ms_per_step"] / row["step_ms_median"] if row and row.get("select_ms_per_step") is not None else None
    out["host_syncs_per_step"] = {f"{c} B={b}": r.get("host_syncs_per_step") for (c, b), r in steady.items()
                                  if r.get("host_syncs_per_step") is not None}
    if 1 in args.batches:
        for b in (b for b in args.batches if b != 1):
            out[f"decode_scaling_icecache_b{b}_vs_b1"] = _ratio(steady.get((ice, b)), steady.get((ice, 1)), "decode_tok_s")
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = _parse(argv)
    result = run(args)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
