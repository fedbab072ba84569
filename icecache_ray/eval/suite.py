"""The fidelity suite: ``python -m icecache_ray.eval suite --json OUT`` (see docs/accuracy.md "The fidelity suite").

One dense prefill per prompt is shared by every policy and budget (``SharedPrefill``), so each
extra configuration costs only its decoding. Three parts:

- RULER-style tasks (:mod:`icecache_ray.eval.ruler`, every variant) at each length, scored per
  prompt; per configuration the mean with a 95 % bootstrap interval, and per policy the smallest
  budget within ``suite_report.MATCH_POINTS`` of the full cache (``budget_to_match_full``);
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
from collections.abc import Callable, Collection

import numpy as np

from icecache_ray.config import SELECTORS, IceCacheConfig
from icecache_ray.eval.suite_report import label, markdown, summarize_suite

log = logging.getLogger(__name__)

SUITE_BUDGETS = {"icecache": (64, 128, 256, 512, 1024), "quest": (256, 512, 1024, 2048), "oracle": (128, 256)}


def suite_runs(budgets: dict[str, tuple[int, ...]] = SUITE_BUDGETS, selector: str | None = None,
               shortlist: float | None = None) -> list[tuple[str, int | None, IceCacheConfig]]:
    """(policy, budget, config): ``full`` once, then every policy at each of its budgets.
    ``selector`` (``device``/``host``) and ``shortlist`` go to every configuration; ``None`` keeps
    the config's default."""
    extra = {} if shortlist is None else {"shortlist": shortlist}
    runs = [("full", None, IceCacheConfig(policy="full"))]
    for policy, values in budgets.items():
        runs += [(policy, b, IceCacheConfig(policy=policy, budget=b, selector=selector, **extra)) for b in values]
    return runs


def select_runs(runs, labels: list[str] | None):
    """The runs named by ``labels`` (``policy@budget``; ``full`` is always kept: every ratio and
    ``budget_to_match_full`` is relative to it), in suite order; all of them for ``None``.
    Raises ValueError naming an unknown label."""
    if labels is None:
        return list(runs)
    known = [label(policy, budget) for policy, budget, _ in runs]
    unknown = [x for x in labels if x not in known]
    if unknown:
        raise ValueError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return [run for run, name in zip(runs, known) if name == "full" or name in labels]


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
    p.add_argument("--configs", default=None,
                   help="comma-separated policy@budget labels to run (default: all; full is always run)")
    p.add_argument("--selector", default=None, choices=SELECTORS,
                   help="where icecache and quest choose their pages (default: IceCacheConfig's, device)")
    p.add_argument("--shortlist", type=float, default=None,
                   help="device selector: pages re-scored exactly per retrieved slot (default: IceCacheConfig's, 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2)")
    p.add_argument("--resume", action="store_true",
                   help="keep what an earlier run finished in --json (same seed, texts, corpus, model) and run only the rest")
    p.add_argument("--report-only", action="store_true",
                   help="recompute the summary and the Markdown table of --json from all its rows; run nothing "
                        "(other options are ignored; the file keeps its own arguments)")
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
    if args.shortlist is not None:
        try:
            IceCacheConfig(shortlist=args.shortlist)
        except ValueError as exc:
            p.error(f"--shortlist={args.shortlist}: {exc}")
    if args.configs is not None:
        args.configs = [x for x in args.configs.split(",") if x]
        try:
            select_runs(suite_runs(selector=args.selector, shortlist=args.shortlist), args.configs)  # names an unknown label before any model loads
        except ValueError as exc:
            p.error(str(exc))
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
    runs, out = select_runs(suite_runs(selector=args.selector, shortlist=args.shortlist), args.configs), Path(args.json)
    if args.report_only:
        print(markdown(report_again(out)))
        return 0
    parts, wall_before = checkpoint.load_previous(out, vars(args), {(p, b) for p, b, _ in runs}) if args.resume else ({p: [] for p in checkpoint.PARTS}, 0.0)
    if any(parts.values()):
        log.info("--resume: keeping %s finished rows of %s", {p: len(r) for p, r in parts.items()}, out)
    model, tokenizer = load_model(args.model)
    context = model.config.max_position_embeddings
    if "ruler" in args.parts and max(args.lengths) > context:
        raise SystemExit(f"--lengths={max(args.lengths)} must fit the model's {context}-token context")
    if "longgen" in args.parts and args.longgen_length + args.longgen_tokens > context:
        raise SystemExit(f"--longgen-length + --longgen-tokens = {args.longgen_length + args.longgen_tokens} must fit "
                         f"the model's {context}-token context")
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


def report_again(out) -> dict:
    """``--report-only``: the summary and table of ``out`` recomputed from every row it holds (e.g.
    after a change in the statistics, or a merge of rerun rows). Runs nothing, so the file's own
    ``argv``, ``args`` and ``wall_s`` stay: they describe how its rows were made. Returns the summary."""
    from pathlib import Path

    from icecache_ray.eval import checkpoint

    out = Path(out)
    if not out.exists():
        raise SystemExit(f"--report-only: {out} does not exist")
    previous = checkpoint.read_suite(out, "--report-only")
    parts = previous["rows"]
    summary = summarize_suite(parts["ruler"], parts["longgen"], parts["summary"])
    _write(out, summary, parts, previous.get("argv"), previous["args"], float(previous.get("wall_s", 0.0)))
    return summary


def _write(out, summary: dict, parts: dict[str, list[dict]], argv, args: dict, wall_s: float) -> None:
    """Rewrite the suite JSON and its Markdown table (atomically: a reader never sees half a file)."""
    import json

    from icecache_ray.eval.checkpoint import write_atomic

    write_atomic(out, json.dumps({"summary": summary, "rows": parts, "argv": argv, "args": args, "wall_s": wall_s},
                                 indent=1, default=str))
    write_atomic(out.with_suffix(".md"), markdown(summary))


def _saver(out, parts: dict[str, list[dict]], args, wall_before: float):
    """``save(part)(rows)``: add ``rows`` to ``part`` and rewrite the JSON and its Markdown table;
    returns the summary."""
    import sys
    import time

    t0 = time.perf_counter()

    def save(part: str | None):
        def add(rows: list[dict]) -> dict:
            if part is not None:
                parts[part] += rows
            summary = summarize_suite(parts["ruler"], parts["longgen"], parts["summary"])
            _write(out, summary, parts, sys.argv[1:], vars(args), wall_before + time.perf_counter() - t0)
            return summary
        return add
    return save
