"""Drawing the figures with matplotlib (the optional ``figures`` extra; Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from icecache_ray.figures.data import Curve  # noqa: E402

STYLE = {  # one colour and marker per policy, the same in every figure
    "icecache": ("tab:blue", "o"),
    "icecache@256": ("tab:blue", "o"),
    "icecache_pages": ("tab:cyan", "s"),
    "quest": ("tab:orange", "^"),
    "quest@256": ("tab:orange", "^"),
    "oracle": ("tab:green", "D"),
    "oracle_token": ("tab:green", "D"),
    "oracle_seqpage": ("tab:olive", "v"),
    "full": ("black", None),
    "streaming": ("tab:gray", "x"),
    "hf_dynamic_cache": ("tab:purple", "P"),
    "icecache@256/host": ("tab:brown", "s"),
    "floor@256": ("gray", "x"),
}
NAMES = {
    "icecache": "icecache (token slots, the default)",
    "icecache_pages": "icecache, whole pages only",
    "quest": "quest",
    "oracle": "exact-token oracle",
    "oracle_token": "exact-token oracle",
    "oracle_seqpage": "best sequential pages (oracle)",
    "full": "full cache",
    "streaming": "streaming (sink + window)",
    "hf_dynamic_cache": "transformers DynamicCache (full)",
    "icecache@256/host": "icecache@256, host selector",
    "floor@256": "floor: full cache over 256-token prompts",
}
# Slight horizontal offsets so intervals at the same budget do not hide each other (log x axis).
OFFSET = {"icecache": 0.95, "oracle": 1.0, "quest": 1.05}
# Legend order: ours first, then peers, oracles, references.
ORDER = ("icecache", "icecache_pages", "quest", "streaming", "oracle", "oracle_token", "oracle_seqpage", "full",
         "hf_dynamic_cache")


def ordered(names: Iterable[str]) -> list[str]:
    """``names`` in legend order (unknown names last, as given)."""
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(names, key=lambda name: rank.get(name.split(" ")[0].split("@")[0], len(ORDER)))


def _style(name: str) -> tuple[str, str | None]:
    return STYLE.get(name, ("tab:red", "*"))


def _name(name: str) -> str:
    return NAMES.get(name, name)


def _budget_axis(ax: Axes, budgets: list[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(int(b)) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("token budget per layer and KV head")
    ax.grid(True, alpha=0.3)


def draw_ruler(ax: Axes, curves: dict[str, Curve], length: int) -> None:
    """RULER score against budget per sparse policy with 95 % bootstrap intervals; the full cache
    as a line with its interval shaded, the exact-token oracle as points with intervals."""
    full = curves.get("full")
    budgets = sorted({x for name, c in curves.items() if name != "full" for x in c.x})
    if full is not None:
        ax.axhline(full.y[0], color="black", linestyle="--", linewidth=1.2, label=f"{_name('full')} (n={full.n[0]})")
        ax.axhspan(full.lo[0], full.hi[0], color="black", alpha=0.08, label="full cache, 95 % interval")
    for name in ordered(n for n in curves if n != "full"):
        curve = curves[name]
        colour, marker = _style(name)
        xs = [x * OFFSET.get(name, 1.0) for x in curve.x]
        errors = [[y - lo for y, lo in zip(curve.y, curve.lo)], [hi - y for y, hi in zip(curve.y, curve.hi)]]
        ax.errorbar(xs, curve.y, yerr=errors, color=colour, marker=marker, capsize=3, linewidth=1.5,
                    linestyle=":" if name == "oracle" else "-", label=f"{_name(name)} (n={curve.n[0]})")
    _budget_axis(ax, budgets)
    ax.set_ylabel("RULER score (mean, 95 % bootstrap interval)")
    ax.set_title(f"RULER at {length} tokens")
    ax.set_ylim(bottom=0)


def draw_lines(ax: Axes, curves: dict[str, Curve]) -> None:
    """One line per curve, coloured by policy."""
    for name in ordered(curves):
        curve, key = curves[name], name.split(" ")[0]
        colour, marker = _style(key)
        ax.plot(curve.x, curve.y, color=colour, marker=marker or "o", linewidth=1.5,
                linestyle="--" if key in ("full", "hf_dynamic_cache") else "-", label=_name(name))
    ax.grid(True, alpha=0.3)


def draw_throughput(ax: Axes, curves: dict[str, Curve], title: str, log_y: bool = False) -> None:
    """Steady-state decode tokens/s against running rows, one line per configuration."""
    draw_lines(ax, curves)
    rows = sorted({x for c in curves.values() for x in c.x})
    ax.set_xscale("log", base=2)
    ax.set_xticks(rows, [str(int(r)) for r in rows])
    ax.minorticks_off()
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("running rows (sequences decoding together)")
    ax.set_ylabel("decode tokens/s" + (" (log scale)" if log_y else ""))
    ax.set_title(title, fontsize=10)


def draw_recall(ax: Axes, curves: dict[str, Curve], title: str) -> None:
    """Attention-mass recall against budget, one line per policy."""
    draw_lines(ax, curves)
    _budget_axis(ax, sorted({x for c in curves.values() for x in c.x}))
    ax.set_ylabel("attention-mass recall")
    ax.set_title(title, fontsize=10)


def new_figure(panels: int, height: float = 5.0, width: float = 6.2) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` axes side by side."""
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def save(fig: Figure, path: Path, caption: str, legend_from: Axes, columns: int = 4) -> Path:
    """Write ``fig`` to ``path`` with the legend of ``legend_from`` and ``caption`` under the
    panels (PNG without a software stamp, so the same JSON gives the same file), and close it."""
    handles, labels = legend_from.get_legend_handles_labels()
    for ax in fig.axes:  # every configuration any panel draws, once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    rows = -(-len(labels) // columns)
    inch = 1 / fig.get_figheight()  # one inch as a fraction of the figure's height
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.3 * inch))
    fig.text(0.5, 0.08 * inch, caption, ha="center", va="bottom", fontsize=7.5, color="dimgray")
    fig.tight_layout(rect=(0, (0.45 + 0.22 * rows) * inch, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
