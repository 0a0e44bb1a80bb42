"""Gantt chart of a simulated pipeline step (``simulate.SimResult``) as a PNG.

One row per rank (rank 0 on top), one bar per event: forward blue, full backward orange, input-grad
backward red, weight-grad backward green; later stages on the same rank (interleaved / V schedules) are
drawn lighter and hatched. Where sends hold their sender (``SimResult.send_holds``, CPUs with gloo) a thin grey
bar marks each one. Each bar is labelled with its microbatch number (``stage:microbatch`` when a rank
holds several stages), as the legend says. The title carries the schedule, step time and bubble fraction. Nothing
but the file is written: the figure is created with the Agg backend and closed, whatever pyplot state the caller has.
"""

from __future__ import annotations

from pathlib import Path

from .simulate import SimResult

__all__ = ["KIND_COLORS", "plot_gantt"]

KIND_COLORS: dict[str, str] = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868"}
SEND_COLOR = "#8C8C8C"
_KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weight)"}


def _time_unit(step_time: float) -> tuple[float, str]:
    """Scale and label so the step time reads as a number between 1 and 1000."""
    for scale, unit in ((1.0, "s"), (1e3, "ms"), (1e6, "us")):
        if step_time * scale >= 1.0:
            return scale, unit
    return 1e9, "ns"


def plot_gantt(result: SimResult, path: str | Path, *, title: str = "") -> Path:
    """Write the timeline of ``result`` to ``path`` (PNG) and return the path."""
    from matplotlib.figure import Figure  # optional dependency (the `bench` extra); Figure needs no pyplot state
    from matplotlib.patches import Patch

    path = Path(path)
    scale, unit = _time_unit(result.step_time) if result.step_time > 0 else (1.0, "s")
    ranks = result.num_ranks
    local = {}  # stage -> position among its rank's stages
    for r in range(ranks):
        for k, s in enumerate(s for s, rr in enumerate(result.stage_to_rank) if rr == r):
            local[s] = k
    multi = max(local.values(), default=0) > 0

    # Figure size: wide enough for small labels, one short row per rank.
    per_rank = len(result.events) / max(1, ranks)
    fig = Figure(figsize=(min(30.0, max(8.0, 0.35 * per_rank + 3)), 1.4 + 0.55 * ranks), layout="constrained")
    ax = fig.add_subplot()

    # Bars with labels, one row per rank (rank 0 on top).
    for e in result.events:
        y = ranks - 1 - e.rank
        x0, width = e.start * scale, (e.end - e.start) * scale
        shade = local[e.stage]
        ax.broken_barh(
            [(x0, width)],
            (y - 0.4, 0.8),
            facecolors=KIND_COLORS[e.kind],
            alpha=1.0 if shade == 0 else 0.55,
            hatch="//" if shade % 2 else None,
            edgecolor="white",
            linewidth=0.6,
        )
        label = f"{e.stage}:{e.microbatch}" if multi else str(e.microbatch)
        ax.text(x0 + width / 2, y, label, ha="center", va="center", fontsize=7, color="black", clip_on=True)

    for rank, start, end in result.send_holds:
        y = ranks - 1 - rank
        ax.broken_barh([(start * scale, (end - start) * scale)], (y - 0.2, 0.4), facecolors=SEND_COLOR, linewidth=0)

    # Axes, legend, title with step time and bubble.
    ax.set_yticks(range(ranks), [f"rank {ranks - 1 - y}" for y in range(ranks)])
    ax.set_ylim(-0.6, ranks - 0.4)
    ax.set_xlim(0, result.step_time * scale * 1.01 if result.step_time > 0 else 1.0)
    ax.set_xlabel(f"time ({unit})")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    kinds = [k for k in KIND_COLORS if any(e.kind == k for e in result.events)]
    handles = [Patch(facecolor=KIND_COLORS[k], label=_KIND_NAMES[k]) for k in kinds]
    if result.send_holds:
        handles.append(Patch(facecolor=SEND_COLOR, label="send (holds the sender)"))
    if multi:
        handles.append(Patch(facecolor="lightgray", hatch="//", label="later stage on its rank"))
    # What the numbers in the boxes are, as a legend entry without a swatch.
    ids = "box label: stage:microbatch" if multi else "box label: microbatch id"
    handles.append(Patch(facecolor="none", edgecolor="none", label=ids))
    fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    head = (
        title
        or f"{result.schedule}: {len(result.stage_to_rank)} stages on {ranks} ranks, "
        f"{result.num_microbatches} microbatches"
    )
    ax.set_title(
        f"{head}\nstep {result.step_time * scale:.4g} {unit}, bubble {result.bubble_fraction:.1%}", fontsize=10
    )
    fig.savefig(path, dpi=120, format="png")
    return path
