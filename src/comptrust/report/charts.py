"""The report's charts as inline SVG strings (matplotlib, Agg backend): the HTML stays one self-contained file."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

TITLES = {
    "mmlu": "MMLU",
    "toxicity": "Toxicity",
    "stereotype": "Stereotype",
    "advglue": "AdvGLUE++",
    "ood": "OOD",
    "adv_demo": "Adv. demo",
    "privacy": "Privacy",
    "ethics": "Ethics",
    "fairness": "Fairness",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG is inlined in HTML


def radar(perspectives: Sequence[str], series: dict[str, list[float | None]], dense: str) -> str:
    """One small radar per compressed variant, each drawn over the dense polygon."""
    plt = _plt()
    others = [n for n in series if n != dense] or [dense]
    cols = min(4, len(others))
    rows = math.ceil(len(others) / cols)
    fig = plt.figure(figsize=(3.1 * cols, 3.1 * rows))
    angles = [2 * math.pi * i / len(perspectives) for i in range(len(perspectives))] + [0.0]
    labels = [TITLES.get(p, p) for p in perspectives]
    for k, name in enumerate(others):
        ax = fig.add_subplot(rows, cols, k + 1, polar=True)
        for nm, color, fill in ((dense, "#888888", 0.08), (name, "#1f6fb4", 0.2)):
            vals = [v if v is not None else 0.0 for v in series[nm]]
            vals = vals + vals[:1]
            ax.plot(angles, vals, color=color, linewidth=1.4, label=nm)
            ax.fill(angles, vals, color=color, alpha=fill)
        ax.set_ylim(0, 100)
        ax.set_yticks([25, 50, 75, 100])
        ax.set_yticklabels(["", "50", "", "100"], fontsize=7)
        ax.set_xticks(angles[:-1])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(name, fontsize=9, pad=14)
    fig.tight_layout()
    return _svg(fig)


def delta_heatmap(variants: Sequence[str], perspectives: Sequence[str], deltas: list[list[float | None]],
                  marks: list[list[str]]) -> str:
    """Variants x perspectives, colour = mean delta vs dense (red = worse), text = delta + significance mark."""
    plt = _plt()
    import numpy as np

    data = np.array([[np.nan if d is None else d for d in row] for row in deltas], dtype=float)
    lim = max(5.0, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 5.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(perspectives), 0.9 + 0.42 * len(variants)))
    im = ax.imshow(np.ma.masked_invalid(data), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(perspectives)), [TITLES.get(p, p) for p in perspectives], rotation=30, ha="right")
    ax.set_yticks(range(len(variants)), list(variants))
    for i in range(len(variants)):
        for j in range(len(perspectives)):
            v = data[i, j]
            txt = "n/a" if np.isnan(v) else f"{v:+.1f}{marks[i][j]}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(v) and abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, label="score - dense (points)", shrink=0.8)
    ax.spines[:].set_visible(False)
    return _svg(fig)


def curves(perspectives: Sequence[str], points: dict[str, list[tuple[float, float | None, float]]],
           xlabel: str, invert: bool = False) -> str:
    """Score vs a compression axis, one line per perspective, error bars = std over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for p in perspectives:
        pts = sorted((x, y, e) for x, y, e in points.get(p, []) if y is not None)
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", markersize=4, capsize=3, linewidth=1.2, label=TITLES.get(p, p))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(0, 100)
    if invert:
        ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _svg(fig)
