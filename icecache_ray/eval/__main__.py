"""Accuracy harness: ``python -m icecache_ray.eval suite --json OUT`` (the fidelity suite, see
:mod:`icecache_ray.eval.suite`) or ``python -m icecache_ray.eval {passkey,longgen,ruler} --policy P1,P2 --budget B1,B2
--lengths L1,L2 [--depths D1,D2] [--variants V1,V2] [--samples N] [--layer-reuse R] --seed S --json OUT
[--model PATH]``.

Writes ``rows`` (one per trial) and ``summary`` (mean score per task, policy, budget, length) to
the JSON file and a Markdown table next to it (``OUT`` with ``.md``). Tasks whose rows carry a
``variant`` (ruler) also get ``summary_by_variant`` (mean score per task, variant, policy, budget,
length) and a second table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

from icecache_ray.config import POLICIES, IceCacheConfig
from icecache_ray.eval.ruler import VARIANTS as RULER_VARIANTS
from icecache_ray.report import json_path

log = logging.getLogger("icecache_ray.eval")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m icecache_ray.eval", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["passkey", "longgen", "ruler"])
    p.add_argument("--policy", default="icecache,streaming,full")
    p.add_argument("--budget", default="256")
    p.add_argument("--lengths", default=None, help="prompt tokens (default 1024,2048,4096; ruler: 4096,7680)")
    p.add_argument("--depths", default="0.0,0.25,0.5,0.75,1.0")
    p.add_argument("--new-tokens", type=int, default=512, help="longgen: tokens to generate")
    p.add_argument("--variants", default=",".join(RULER_VARIANTS), help="ruler: variants to run")
    p.add_argument("--samples", type=int, default=2, help="ruler: prompts per variant and length")
    p.add_argument("--layer-reuse", type=int, default=1,
                   help="IceCache(r) for every sparse policy: the first of each r sparse layers selects (default 1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, type=json_path)
    p.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2)")
    return p.parse_args(argv)


def _list(text: str, cast, name: str):
    try:
        values = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}={text!r}: could not parse") from None
    if not values:
        raise SystemExit(f"--{name}: empty")
    return values


def configs(policies: list[str], budgets: list[int], layer_reuse: int = 1) -> list[tuple[str, int | None, IceCacheConfig]]:
    """(policy, budget, config) for every combination; ``full`` runs once (budget None);
    ``layer_reuse`` applies to the sparse policies."""
    out = []
    for policy in policies:
        if policy not in POLICIES:
            raise SystemExit(f"--policy {policy!r}: choose from {list(POLICIES)}")
        for budget in ([None] if policy == "full" else budgets):
            try:
                cfg = IceCacheConfig(policy=policy, budget=budget or 256, layer_reuse=1 if policy == "full" else layer_reuse)
            except ValueError as exc:
                raise SystemExit(f"--budget {budget} / --layer-reuse {layer_reuse}: {exc}") from None
            out.append((policy, budget, cfg))
    return out


def variants(text: str) -> list[str]:
    """The ``--variants`` list, each checked against the ruler variants."""
    names = _list(text, str, "variants")
    for name in names:
        if name not in RULER_VARIANTS:
            raise SystemExit(f"--variants {name!r}: choose from {list(RULER_VARIANTS)}")
    return names


def summarize(rows: list[dict]) -> list[dict]:
    """Mean score per (task, policy, budget, length)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["policy"], r["budget"], r["length"])].append(r["score"])
    return [
        {"task": t, "policy": p, "budget": b, "length": l, "score": sum(v) / len(v), "n": len(v)}
        for (t, p, b, l), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0, kv[0][3]))
    ]


def summarize_by_variant(rows: list[dict]) -> list[dict]:
    """Mean score per (task, variant, policy, budget, length) over the rows that have a ``variant``."""
    groups = defaultdict(list)
    for r in rows:
        if "variant" in r:
            groups[(r["task"], r["variant"], r["policy"], r["budget"], r["length"])].append(r["score"])
    return [
        {"task": t, "variant": x, "policy": p, "budget": b, "length": l, "score": sum(v) / len(v), "n": len(v)}
        for (t, x, p, b, l), v in sorted(groups.items(), key=lambda kv: (kv[0][:3], kv[0][3] or 0, kv[0][4]))
    ]


def markdown(summary: list[dict], by_variant: list[dict] | None = None) -> str:
    lines = ["| task | policy | budget | length | score | n |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['task']} | {s['policy']} | {s['budget'] or '-'} | {s['length']} | {s['score']:.3f} | {s['n']} |")
    if by_variant:
        lines += ["", "| task | variant | policy | budget | length | score | n |", "|---|---|---|---|---|---|---|"]
        for s in by_variant:
            lines.append(f"| {s['task']} | {s['variant']} | {s['policy']} | {s['budget'] or '-'} | {s['length']} "
                         f"| {s['score']:.3f} | {s['n']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["suite"]:  # the whole fidelity table: its own options (icecache_ray.eval.suite)
        from icecache_ray.eval import suite

        return suite.main(argv[1:])
    args = _parse(argv)
    out = Path(args.json)
    if args.layer_reuse < 1:
        raise SystemExit(f"--layer-reuse {args.layer_reuse}: must be a positive integer")
    runs = configs(_list(args.policy, str, "policy"), _list(args.budget, int, "budget"), args.layer_reuse)
    lengths = _list(args.lengths or ("4096,7680" if args.task == "ruler" else "1024,2048,4096"), int, "lengths")
    if min(lengths) <= 0:
        raise SystemExit(f"--lengths {args.lengths!r}: must be positive")
    if args.task == "ruler":
        ruler_variants = variants(args.variants)
        if args.samples <= 0:
            raise SystemExit(f"--samples {args.samples}: must be a positive integer")
    from icecache_ray.model import load_model

    model, tokenizer = load_model(args.model)
    limit = model.config.max_position_embeddings
    if max(lengths) > limit:
        raise SystemExit(f"--lengths: {max(lengths)} exceeds the model's {limit}-token context")
    t0 = time.perf_counter()
    if args.task == "passkey":
        from icecache_ray.eval.tasks import run_passkey

        rows = run_passkey(model, tokenizer, runs, lengths, _list(args.depths, float, "depths"), args.seed)
    elif args.task == "ruler":
        from icecache_ray.eval.tasks import run_ruler

        rows = run_ruler(model, tokenizer, runs, lengths, args.seed, ruler_variants, args.samples)
    else:
        from icecache_ray.eval.tasks import run_longgen

        rows = run_longgen(model, tokenizer, runs, lengths, args.new_tokens, args.seed)
    for row in rows:
        row["layer_reuse"] = 1 if row["policy"] == "full" else args.layer_reuse
    summary = summarize(rows)
    by_variant = summarize_by_variant(rows)
    result = {"task": args.task, "layer_reuse": args.layer_reuse, "rows": rows, "summary": summary, "wall_s": time.perf_counter() - t0, "argv": sys.argv[1:]}
    if by_variant:
        result["summary_by_variant"] = by_variant
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(summary, by_variant))
    print(markdown(summary, by_variant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
