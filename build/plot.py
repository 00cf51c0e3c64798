"""The card's trade-off plot: quality against batch-1 latency and against size, one point
per measured form, the served form ringed; optionally a training curve beside them.

matplotlib on the Agg backend (no display); build-time only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLOT_NAME = "tradeoff.png"


def tradeoff_plot(
    out: Path,
    forms: Sequence[dict[str, Any]],
    *,
    quality: str,
    quality_label: str,
    latency: str,
    latency_label: str,
    served: str | None = None,
    floor: float | None = None,
    curve: Sequence[tuple[float, float]] | None = None,
    curve_label: tuple[str, str] = ("epoch", "validation accuracy"),
    title: str = "",
) -> Path:
    """Write the PNG to `out`; forms need `form`, `model`, `megabytes`, `quality`, `latency`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points = [f for f in forms if f.get(quality) is not None and f.get(latency)]
    panels = 3 if curve else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), dpi=110)
    models = sorted({str(f["model"]) for f in points}, key=lambda m: (m != "teacher", m))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    marks = {"torch": "s", "fp32": "o", "dynamic": "^", "static": "v"}

    def marker(form: dict[str, Any]) -> str:
        if form["backend"] == "torch":
            return marks["torch"]
        q = str(form.get("quantization") or "")
        return marks["static"] if q.startswith("static") else marks["dynamic"] if q else "o"

    for ax, x_key, x_label in (
        (axes[0], latency, latency_label),
        (axes[1], "megabytes", "size (MB)"),
    ):
        for f in points:
            ax.scatter(
                f[x_key],
                f[quality],
                color=colours[str(f["model"])],
                marker=marker(f),
                s=46,
                edgecolor="black",
                linewidth=0.4,
                zorder=3,
            )
            if f["form"] == served:
                ax.scatter(
                    f[x_key],
                    f[quality],
                    s=260,
                    facecolor="none",
                    edgecolor="red",
                    linewidth=1.6,
                    zorder=4,
                )
        if floor is not None:
            ax.axhline(floor, color="red", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(quality_label)
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], color=colours[m], marker="o", linestyle="", label=m) for m in models
    ]
    handles += [
        Line2D([], [], color="grey", marker=v, linestyle="", label=k) for k, v in marks.items()
    ]
    if served:
        handles.append(
            Line2D(
                [],
                [],
                color="red",
                marker="o",
                markerfacecolor="none",
                markersize=12,
                linestyle="",
                label="served",
            )
        )
    axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    if curve:
        ax = axes[2]
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", color="black")
        ax.set_xlabel(curve_label[0])
        ax.set_ylabel(curve_label[1])
        ax.set_title("teacher training", fontsize=9)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
