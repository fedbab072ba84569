"""Writes every figure from the committed result JSON: ``python -m icecache_ray.figures``
(``make figures``). Each function reads its JSON, draws, and returns the PNG's path."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from icecache_ray.figures import data, plots

log = logging.getLogger(__name__)

RULER_PNG = "ruler_vs_budget.png"
THROUGHPUT_PNG = "throughput_vs_rows.png"
RECALL_PNG = "recall_vs_budget.png"


def shown(paths: list[Path]) -> str:
    """The source files for a caption, relative to the working directory."""
    return "; ".join(os.path.relpath(path) for path in paths)


def ruler_figure(results: Path, out: Path) -> Path:
    """RULER score vs budget per policy, one panel per prompt length (``suite.json``)."""
    suite = data.read_json(results / "suite.json")
    lengths = data.ruler_lengths(suite)
    fig, axes = plots.new_figure(len(lengths))
    for ax, length in zip(axes, lengths):
        plots.draw_ruler(ax, data.ruler_curves(data.ruler_table(suite, length)), length)
    model = suite.get("args", {}).get("model") or "bundled SmolLM2-135M-Instruct"
    caption = (f"{shown([results / 'suite.json'])} ({model}): mean score over the prompts of each configuration; bars and "
               "shading: 95 % percentile-bootstrap interval over prompts (icecache_ray.eval.suite_report)")
    return plots.save(fig, out / RULER_PNG, caption, legend_from=axes[0], columns=5)


def throughput_figure(results: Path, out: Path) -> Path:
    """Steady decode tokens/s vs running rows: the CPU runs (``throughput.json``, the host-driven
    engine of 2026-12-03, and ``throughput-device-*.json``, the device decode step) and every GPU
    run (``gpu/*/throughput.json``), one panel each."""
    cpu = [results / "throughput.json", *sorted(results.glob("throughput-device-*.json"))]
    sources = [path for path in cpu if path.exists()] + data.gpu_throughput_files(results)
    fig, axes = plots.new_figure(len(sources))
    for ax, path in zip(axes, sources):
        result = data.read_json(path)
        gpu = path.parent != results
        title = f"{data.run_caption(result)}\n{path.relative_to(results)}"  # two runs of a day differ in file
        plots.draw_throughput(ax, data.throughput_curves(result), title, log_y=gpu)
    caption = shown(sources) + f" (steady phase: every row decoding, no prefill; budget {data.read_json(sources[0]).get('budget')})"
    return plots.save(fig, out / THROUGHPUT_PNG, caption, legend_from=axes[0])


def recall_figure(results: Path, out: Path) -> Path:
    """Attention-mass recall vs budget per policy on the real workload (``retrieval.json``, plus
    icecache with token slots from any newer ``retrieval-*.json`` that has it)."""
    curves = data.recall_curves(data.read_json(results / "retrieval.json"))
    used = [results / "retrieval.json"]
    for path in sorted(results.glob("retrieval-*.json")):
        extra = {k: c for k, c in data.recall_curves(data.read_json(path)).items() if k not in curves}
        if extra:
            curves.update(extra)
            used.append(path)
    fig, axes = plots.new_figure(1, height=5.4, width=7.6)
    plots.draw_recall(axes[0], curves, "attention-mass recall, SmolLM2-135M keys, 8192-token prompt")
    caption = shown(used)
    return plots.save(fig, out / RECALL_PNG, caption, legend_from=axes[0], columns=2)


def make_all(results: Path, out: Path) -> list[Path]:
    """Every figure; returns the PNG paths written."""
    written = [build(Path(results), Path(out)) for build in (ruler_figure, throughput_figure, recall_figure)]
    for path in written:
        log.info("wrote %s", path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--results`` (the JSON folder) and ``--out`` (the PNG folder)."""
    parser = argparse.ArgumentParser(prog="python -m icecache_ray.figures", description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("docs/results"), help="folder of the result JSON")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"), help="folder the PNGs are written to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_all(args.results, args.out)
    return 0
