"""The report's charts as inline SVG strings (matplotlib, Agg backend): the HTML stays one self-contained file."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from comptrust.perspectives import short_title

# one colour per method family, the same in every chart
FAMILY_COLORS = {"gptq": "#1f6fb4", "awq": "#d9721c", "rtn": "#2e9e4f", "gguf": "#8c4fb0", "magnitude": "#c23b3b",
                 "sparsegpt": "#1f9fb4", "wanda": "#b48a1f"}
OTHER_COLORS = ["#555555", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
DENSE_COLOR = "#444444"


def family_color(method: str, seen: dict[str, str]) -> str:
    if method in FAMILY_COLORS:
        return FAMILY_COLORS[method]
    if method not in seen:
        seen[method] = OTHER_COLORS[len(seen) % len(OTHER_COLORS)]
    return seen[method]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # text.parse_math off: names are drawn as written, a variant named "w4$\\frac{x$" is text, not broken TeX
    plt.rcParams.update({"text.parse_math": False, "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG is inlined in HTML


def radar(perspectives: Sequence[str], series: dict[str, list[float | None]], dense: str) -> str:
    """One small radar per compressed variant, each drawn over the dense polygon. A missing score is a gap in the
    polygon (drawing it as 0 would look like a collapse); the legend says which line is which."""
    plt = _plt()
    import numpy as np
    from matplotlib.lines import Line2D

    others = [n for n in series if n != dense] or [dense]
    cols = min(4, len(others))
    rows = math.ceil(len(others) / cols)
    fig = plt.figure(figsize=(3.1 * cols, 3.1 * rows + 0.5))
    angles = [2 * math.pi * i / len(perspectives) for i in range(len(perspectives))] + [0.0]
    labels = [short_title(p) for p in perspectives]
    for k, name in enumerate(others):
        ax = fig.add_subplot(rows, cols, k + 1, polar=True)
        for nm, color, fill in ((dense, DENSE_COLOR, 0.08), (name, "#1f6fb4", 0.2)):
            vals = [np.nan if v is None else float(v) for v in series[nm]]
            vals = vals + vals[:1]
            ax.plot(angles, vals, color=color, linewidth=1.4, marker="o", markersize=2.5)
            if not any(np.isnan(vals)):
                ax.fill(angles, vals, color=color, alpha=fill)
        ax.set_ylim(0, 100)
        ax.set_yticks([25, 50, 75, 100])
        ax.set_yticklabels(["", "50", "", "100"], fontsize=7)
        ax.set_xticks(angles[:-1])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(name, fontsize=9, pad=14)
        missing = [short_title(p) for p, v in zip(perspectives, series[name]) if v is None]
        if missing and name != dense:
            ax.text(0.5, -0.16, "no score: " + ", ".join(missing), transform=ax.transAxes, ha="center", fontsize=6.5,
                    color="#8a94a3")
    handles = [Line2D([], [], color=DENSE_COLOR, lw=1.4, label=f"{dense} (baseline)"),
               Line2D([], [], color="#1f6fb4", lw=1.4, label="the variant named above each radar")]
    fig.legend(handles=handles, loc="upper center", ncol=2, frameon=False, fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.1 * rows + 0.5)))
    return _svg(fig)


def delta_heatmap(variants: Sequence[str], perspectives: Sequence[str], deltas: list[list[float | None]],
                  marks: list[list[str]], notes: list[list[str]] | None = None) -> str:
    """Variants x perspectives, colour = mean delta vs dense (red = worse), text = delta + significance mark, and
    under it the verdict and any flag (notes)."""
    plt = _plt()
    import numpy as np

    data = np.array([[np.nan if d is None else d for d in row] for row in deltas], dtype=float)
    lim = max(5.0, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 5.0)
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(perspectives), 1.0 + 0.55 * len(variants)))
    im = ax.imshow(np.ma.masked_invalid(data), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(perspectives)), [short_title(p) for p in perspectives], rotation=30, ha="right")
    ax.set_yticks(range(len(variants)), list(variants))
    for i in range(len(variants)):
        for j in range(len(perspectives)):
            v = data[i, j]
            txt = "n/a" if np.isnan(v) else f"{v:+.1f}{marks[i][j]}"
            note = notes[i][j] if notes else ""
            color = "white" if not np.isnan(v) and abs(v) > 0.6 * lim else "black"
            ax.text(j, i - (0.13 if note else 0), txt, ha="center", va="center", fontsize=8, color=color)
            if note:
                ax.text(j, i + 0.22, note, ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(im, ax=ax, label="score - dense (points)", shrink=0.8)
    ax.spines[:].set_visible(False)
    return _svg(fig)


def curves(perspectives: Sequence[str], series: dict[str, dict[str, list[tuple[float, float, float, float]]]],
           dense: dict[str, tuple[float, float, float] | None], xlabel: str, invert: bool = False) -> str:
    """Score vs a compression axis: one small chart per perspective, one line per method family (a line through
    all methods would join variants at the same x with vertical segments), a band for each point's 95% CI, the
    dense score as a dashed line with its CI, and a labelled tick at every x used.

    series[perspective][family] = [(x, score, ci_low, ci_high)]; dense[perspective] = (score, ci_low, ci_high)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    shown = [p for p in perspectives if any(series.get(p, {}).values())]
    if not shown:
        return ""
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.5 * rows + 0.4), squeeze=False)
    xs_all = sorted({x for p in shown for pts in series[p].values() for x, *_ in pts})
    seen: dict[str, str] = {}
    families = list(dict.fromkeys(f for p in shown for f in series[p]))
    # families sharing an x are drawn side by side (a small dodge), so single points do not hide each other;
    # the ticks stay at the true x
    span = (xs_all[-1] - xs_all[0]) if len(xs_all) > 1 else 0.2 * max(abs(xs_all[0]), 1.0)
    dodge = {f: (i - (len(families) - 1) / 2) * (0.012 if len(xs_all) > 1 else 0.06) * span
             for i, f in enumerate(families)}
    # colour by method, line style by what else tells a method's lines apart (N:M pattern, group size)
    styles: dict[str, str] = {}
    per_method: dict[str, int] = {}
    for f in families:
        m = f.split()[0]
        styles[f] = ["-", "--", ":", "-."][per_method.get(m, 0) % 4]
        per_method[m] = per_method.get(m, 0) + 1
    for k, p in enumerate(shown):
        ax = axes[k // cols][k % cols]
        d = dense.get(p)
        if d is not None:
            ax.axhline(d[0], color=DENSE_COLOR, lw=1, ls="--")
            if d[1] is not None and d[2] is not None:
                ax.axhspan(d[1], d[2], color=DENSE_COLOR, alpha=0.07, lw=0)
        for fam, pts in series[p].items():
            pts = sorted(pts)
            if not pts:
                continue
            color = family_color(fam.split()[0], seen)
            xs = [x + dodge[fam] for x, *_ in pts]
            ax.plot(xs, [y for _, y, _, _ in pts], color=color, marker="o", markersize=3.5, lw=1.4, ls=styles[fam])
            lo = [lo if lo is not None else y for _, y, lo, _ in pts]
            hi = [hi if hi is not None else y for _, y, _, hi in pts]
            if len(pts) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
            else:
                ax.errorbar(xs, [pts[0][1]], yerr=[[pts[0][1] - lo[0]], [hi[0] - pts[0][1]]], color=color, capsize=3,
                            lw=1)
        ax.set_title(short_title(p), fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all], fontsize=7)
        if len(xs_all) == 1:
            ax.set_xlim(xs_all[0] - span, xs_all[0] + span)
        if invert:
            ax.invert_xaxis()
        ax.grid(alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel("score (0-100)", fontsize=8)
        if k // cols == rows - 1:
            ax.set_xlabel(xlabel, fontsize=8)
    for k in range(len(shown), rows * cols):
        axes[k // cols][k % cols].axis("off")
    handles = [Line2D([], [], color=family_color(f.split()[0], seen), marker="o", lw=1.4, ls=styles[f], label=f)
               for f in families]
    handles.append(Line2D([], [], color=DENSE_COLOR, ls="--", lw=1, label="dense"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.5 * rows + 0.4)))
    return _svg(fig)
