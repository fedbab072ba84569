"""The fidelity suite: ``python -m icecache_ray.eval suite --json OUT`` (see README "Fidelity suite").

One dense prefill per prompt is shared by every policy and budget (``SharedPrefill``), so each
extra configuration costs only its decoding. Three parts:

- RULER-style tasks (:mod:`icecache_ray.eval.ruler`, every variant) at each length, scored per
  prompt; per configuration the mean with a 95 % bootstrap interval, and per policy the smallest
  budget within ``MATCH_POINTS`` of the full cache (``budget_to_match_full``);
- long generation: the teacher-forced NLL of the full cache's greedy continuation under each
  configuration, over several essay texts (ratio to the full cache's NLL, mean over the texts);
- summary fidelity: the same ratio for the full cache's greedy summary of example-corpus
  documents (the batch job's prompt): does the sparse cache keep the model's own summary likely?

Output (``--json``): ``summary`` with ``ruler_<length>`` (``policy@budget`` → ``{score, lo, hi,
n}``), ``budget_to_match_full`` (length → policy → budget or null), ``longgen_ratio`` and
``summary_nll_ratio`` (``policy@budget`` → ratio); ``rows`` keeps every per-prompt result.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection

import numpy as np

from icecache_ray.config import IceCacheConfig

log = logging.getLogger(__name__)

SUITE_BUDGETS = {"icecache": (64, 128, 256, 512, 1024), "quest": (256, 512, 1024, 2048), "oracle": (128, 256)}
MATCH_POINTS = 0.02  # "within 2 points" of the full cache, scores in [0, 1]


def suite_runs(budgets: dict[str, tuple[int, ...]] = SUITE_BUDGETS) -> list[tuple[str, int | None, IceCacheConfig]]:
    """(policy, budget, config): ``full`` once, then every policy at each of its budgets."""
    runs = [("full", None, IceCacheConfig(policy="full"))]
    for policy, values in budgets.items():
        runs += [(policy, b, IceCacheConfig(policy=policy, budget=b)) for b in values]
    return runs


def label(policy: str, budget: int | None) -> str:
    return policy if budget is None else f"{policy}@{budget}"


def bootstrap_ci(scores: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling prompts)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def score_table(rows: list[dict]) -> dict[str, dict]:
    """``policy@budget`` → ``{score, lo, hi, n}`` over ``rows`` (each with policy, budget, score)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[label(r["policy"], r["budget"])].append(r["score"])
    table = {}
    for key, scores in groups.items():
        lo, hi = bootstrap_ci(scores)
        table[key] = {"score": float(np.mean(scores)), "lo": lo, "hi": hi, "n": len(scores)}
    return table


def budget_to_match_full(table: dict[str, dict], points: float = MATCH_POINTS) -> dict[str, int | None]:
    """Per policy, the smallest budget whose score is at least the full cache's minus ``points``
    (None when no budget in the sweep gets there)."""
    full = table["full"]["score"]
    found: dict[str, int | None] = {}
    for key, entry in table.items():
        if "@" not in key:
            continue
        policy, budget = key.split("@")
        found.setdefault(policy, None)
        if entry["score"] >= full - points and (found[policy] is None or int(budget) < found[policy]):
            found[policy] = int(budget)
    return found


def nll_ratios(rows: list[dict]) -> dict[str, float]:
    """``policy@budget`` → mean over texts of (mean NLL / the full cache's mean NLL)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[label(r["policy"], r["budget"])].append(r["nll_ratio"])
    return {key: float(np.mean(v)) for key, v in groups.items()}


def forced_nll_rows(task: str, shared, reference: list[int], runs, **facts) -> list[dict]:
    """One row per configuration: the teacher-forced NLL of ``reference`` after the shared prompt."""
    full = float(np.mean(shared.nll(IceCacheConfig(policy="full"), reference)))
    rows = []
    for policy, budget, cfg in runs:
        nll = full if policy == "full" else float(np.mean(shared.nll(cfg, reference)))
        rows.append({"task": task, "policy": policy, "budget": budget, "nll": nll, "nll_full": full,
                     "nll_ratio": nll / full, "new_tokens": len(reference), **facts})
        log.info("%s %s: NLL ratio %.4f", task, label(policy, budget), nll / full)
    return rows


def run_longgen_texts(model, tokenizer, runs, length: int, new_tokens: int, texts: int,
                      skip: Collection[tuple] = (), on_unit: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """``texts`` essay prompts of ``length`` tokens (seeds 0, 1, ...): NLL rows of the full cache's
    greedy ``new_tokens``-token continuation under every configuration. ``skip``: ``(text,)``
    already done; ``on_unit``: called with each text's rows."""
    from icecache_ray.engine.generate import SharedPrefill
    from icecache_ray.haystack import essay_prompt_ids

    rows = []
    for text in range(texts):
        if (text,) in skip:
            continue
        shared = SharedPrefill(model, essay_prompt_ids(tokenizer, length, seed=text)[0].tolist())
        reference = shared.generate(IceCacheConfig(policy="full"), new_tokens).token_ids
        rows += _finished(on_unit, forced_nll_rows("longgen", shared, reference, runs, text=text, length=length))
    return rows


def run_summary_fidelity(model, tokenizer, runs, corpus: str, documents: int, new_tokens: int,
                         skip: Collection[tuple] = (), on_unit: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The first ``documents`` documents of ``corpus`` in the batch job's chat prompt: NLL rows of
    the full cache's greedy summary (up to ``new_tokens``, ends at EOS) under every configuration.
    ``skip``: ``(document id,)`` already done; ``on_unit``: called with each document's rows."""
    from icecache_ray.engine.generate import SharedPrefill
    from icecache_ray.jobs.inputs import list_sources, read_documents
    from icecache_ray.jobs.prompts import DEFAULT_INSTRUCTION, chat_prompt

    files, errors = list_sources([corpus])
    docs, bad = read_documents(files)
    if errors or bad or not docs:
        raise SystemExit(f"--corpus {corpus}: {[e.reason for e in errors + bad] or 'no documents'}")
    room = model.config.max_position_embeddings - new_tokens
    rows = []
    for doc in docs[:documents]:
        if (doc.id,) in skip:
            continue
        prompt = chat_prompt(tokenizer, doc.text, DEFAULT_INSTRUCTION, room)
        shared = SharedPrefill(model, prompt.ids)
        reference = shared.generate(IceCacheConfig(policy="full"), new_tokens, tokenizer=tokenizer).token_ids
        if not reference:
            log.warning("summary %s: the full cache generated nothing; skipped", doc.id)
            continue
        rows += _finished(on_unit, forced_nll_rows("summary", shared, reference, runs, document=doc.id,
                                                   prompt_tokens=len(prompt.ids)))
    return rows


def _finished(on_unit, rows: list[dict]) -> list[dict]:
    if on_unit is not None:
        on_unit(rows)
    return rows


def summarize_suite(ruler_rows: list[dict], longgen_rows: list[dict], summary_rows: list[dict]) -> dict:
    """The ``summary`` block of the suite's JSON (see module docstring)."""
    out: dict = {"budget_to_match_full": {}}
    for length in sorted({r["length"] for r in ruler_rows}):
        table = score_table([r for r in ruler_rows if r["length"] == length])
        out[f"ruler_{length}"] = table
        out["budget_to_match_full"][str(length)] = budget_to_match_full(table)
    out["longgen_ratio"] = nll_ratios(longgen_rows)
    out["summary_nll_ratio"] = nll_ratios(summary_rows)
    return out


def markdown(summary: dict) -> str:
    """The suite's tables: RULER score [95 % interval] per configuration and length, NLL ratios."""
    keys = list(dict.fromkeys(k for name, t in summary.items() if name.startswith("ruler_") for k in t))
    keys += [k for k in {**summary["longgen_ratio"], **summary["summary_nll_ratio"]} if k not in keys]
    lengths = [name for name in summary if name.startswith("ruler_")]
    lines = ["| config | " + " | ".join(lengths) + " | longgen NLL ratio | summary NLL ratio |",
             "|---" * (len(lengths) + 3) + "|"]
    for key in keys:
        cells = []
        for name in lengths:
            e = summary[name].get(key)
            cells.append(f"{e['score']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}] (n={e['n']})" if e else "-")
        for name in ("longgen_ratio", "summary_nll_ratio"):
            cells.append(f"{summary[name][key]:.4f}" if key in summary[name] else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "budget_to_match_full (within 2 points of full): " + repr(summary["budget_to_match_full"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    import argparse

    from icecache_ray.eval.ruler import VARIANTS
    from icecache_ray.report import json_path

    p = argparse.ArgumentParser(prog="python -m icecache_ray.eval suite", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, type=json_path)
    p.add_argument("--lengths", default="4096,7680", help="RULER prompt tokens")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--samples-per-variant", type=int, default=17, help="RULER prompts per variant and length (6 x 17 = 102)")
    p.add_argument("--batch", type=int, default=8, help="RULER prompts of a variant decoded together under each configuration")
    p.add_argument("--longgen-texts", type=int, default=4)
    p.add_argument("--longgen-length", type=int, default=7168, help="prompt tokens before the continuation")
    p.add_argument("--longgen-tokens", type=int, default=512)
    p.add_argument("--corpus", default=str(_default_corpus()), help="summary fidelity documents (the job's input format)")
    p.add_argument("--summary-docs", type=int, default=12)
    p.add_argument("--summary-tokens", type=int, default=64)
    p.add_argument("--parts", default="ruler,longgen,summary", help="which parts to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2)")
    p.add_argument("--resume", action="store_true",
                   help="keep what an earlier run finished in --json (same seed, texts, corpus, model) and run only the rest")
    args = p.parse_args(argv)
    for name in ("samples_per_variant", "batch", "longgen_texts", "longgen_length", "longgen_tokens", "summary_docs", "summary_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    args.parts = [x for x in args.parts.split(",") if x]
    if not args.parts or set(args.parts) - {"ruler", "longgen", "summary"}:
        p.error(f"--parts={','.join(args.parts)}: choose from ruler, longgen, summary")
    args.variants = [x for x in args.variants.split(",") if x]
    if not args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants: choose from {list(VARIANTS)}")
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) <= 0:
        p.error(f"--lengths={args.lengths!r}: comma-separated positive integers")
    args.lengths = lengths
    return args


def _default_corpus():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "examples" / "corpus.jsonl"


def main(argv=None) -> int:
    """Run the suite; the JSON is rewritten (atomically) after each RULER prompt group, long-generation
    text and summary document, so a long run keeps what it finished and ``--resume`` goes on from there."""
    from pathlib import Path

    from icecache_ray.eval import checkpoint
    from icecache_ray.eval.tasks import run_ruler
    from icecache_ray.model import load_model

    args = parse_args(argv)
    runs, out = suite_runs(), Path(args.json)
    parts, wall_before = checkpoint.load_previous(out, vars(args), len(runs)) if args.resume else ({p: [] for p in checkpoint.PARTS}, 0.0)
    if any(parts.values()):
        log.info("--resume: keeping %s finished rows of %s", {p: len(r) for p, r in parts.items()}, out)
    model, tokenizer = load_model(args.model)
    context = model.config.max_position_embeddings
    if max(args.lengths) > context or args.longgen_length + args.longgen_tokens > context:
        raise SystemExit(f"--lengths / --longgen-length + --longgen-tokens must fit the model's {context}-token context")
    save = _saver(out, parts, args, wall_before)
    done = {part: {checkpoint.unit_of(r, part) for r in rows} for part, rows in parts.items()}
    if "ruler" in args.parts:
        run_ruler(model, tokenizer, runs, args.lengths, args.seed, args.variants, args.samples_per_variant, args.batch,
                  skip=done["ruler"], on_group=save("ruler"))
    if "longgen" in args.parts:
        run_longgen_texts(model, tokenizer, runs, args.longgen_length, args.longgen_tokens, args.longgen_texts,
                          skip=done["longgen"], on_unit=save("longgen"))
    if "summary" in args.parts:
        run_summary_fidelity(model, tokenizer, runs, args.corpus, args.summary_docs, args.summary_tokens,
                             skip=done["summary"], on_unit=save("summary"))
    print(markdown(save(None)([])))
    return 0


def _saver(out, parts: dict[str, list[dict]], args, wall_before: float):
    """``save(part)(rows)``: add ``rows`` to ``part`` and rewrite the JSON and its Markdown table;
    returns the summary."""
    import json
    import sys
    import time

    from icecache_ray.eval.checkpoint import write_atomic

    t0 = time.perf_counter()

    def save(part: str | None):
        def add(rows: list[dict]) -> dict:
            if part is not None:
                parts[part] += rows
            summary = summarize_suite(parts["ruler"], parts["longgen"], parts["summary"])
            write_atomic(out, json.dumps({"summary": summary, "rows": parts, "argv": sys.argv[1:], "args": vars(args),
                                          "wall_s": wall_before + time.perf_counter() - t0}, indent=1, default=str))
            write_atomic(out.with_suffix(".md"), markdown(summary))
            return summary
        return add
    return save
