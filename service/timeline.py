"""The training timeline as SVG (POST /v1/network.svg with `train`, docs/training.md): the
dead fraction of each relu (or leaky_relu) layer against the step, read off the answer's
`training` record, one line per learning rate (a colour) and layer (a dash pattern). The
page (service/static/app.js) draws the same plot in the browser."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

PLOT_W = 560.0
PLOT_H = 200.0
LEFT = 48.0  # room for the y ticks
TOP = 28.0  # room for the title
BOTTOM = 36.0  # room for the x ticks and label
LEGEND_LINE = 16.0
# one colour per learning rate (a sweep has at most 16: the palette repeats after 8)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DASHES = ("", "6 3", "2 3", "8 3 2 3")  # one per layer

STYLE = """
.timeline .plot-title { font-weight: bold; font-size: 13px; }
.timeline .axis { stroke: #90a4ae; stroke-width: 1; }
.timeline .gridline { stroke: #eceff1; stroke-width: 1; }
.timeline .tick { font-size: 10px; fill: #5b6b7f; }
.timeline .series { fill: none; stroke-width: 1.8; }
.timeline .legend-text { font-size: 11px; fill: #1d2733; }
"""


@dataclass(frozen=True)
class Series:
    """One line: a run's (learning rate's) dead fraction of one layer, per recorded step."""

    lr: float
    layer: int
    points: list[tuple[int, float]]  # (step, dead fraction)


def timeline_series(report: Mapping[str, Any]) -> list[Series]:
    """Every (rate, dying layer) line of the report's `training` (none without it)."""
    training = report.get("training")
    if not training:
        return []
    runs: Sequence[Mapping[str, Any]] = training.get("runs") or [training]
    units = {
        layer["index"]: layer["units"]
        for layer in report.get("layers", [])
        if layer.get("activation") in ("relu", "leaky_relu") and layer.get("units")
    }
    series = []
    for run in runs:
        for index, count in units.items():
            points = [
                (int(step["step"]), entry["dead_units"] / count)
                for step in run.get("steps", [])
                for entry in step.get("layers", [])
                if entry.get("index") == index
            ]
            series.append(Series(float(run["lr"]), index, points))
    return series


def timeline_svg(report: Mapping[str, Any]) -> tuple[str, float, float] | None:
    """The plot as an SVG group at (0, 0), with its width and height; None without lines."""
    series = timeline_series(report)
    if not series:
        return None
    rates = list(dict.fromkeys(s.lr for s in series))
    layers = list(dict.fromkeys(s.layer for s in series))
    last = max((step for s in series for step, _ in s.points), default=0) or 1

    def x(step: float) -> float:
        return LEFT + step / last * PLOT_W

    def y(fraction: float) -> float:
        return TOP + (1.0 - fraction) * PLOT_H

    out = ['<g class="timeline">']
    out.append(
        f'<text class="plot-title" x="{LEFT}" y="16">dead units per layer (fraction of its '
        "units, on each step's minibatch) against the training step</text>"
    )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(
            f'<line class="gridline" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{y(tick):.1f}" '
            f'y2="{y(tick):.1f}"/><text class="tick" x="{LEFT - 6}" y="{y(tick) + 3:.1f}" '
            f'text-anchor="end">{tick:.0%}</text>'
        )
    for step in _ticks(last):
        out.append(
            f'<text class="tick" x="{x(step):.1f}" y="{TOP + PLOT_H + 14:.1f}" '
            f'text-anchor="middle">{step}</text>'
        )
    out.append(
        f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + PLOT_H}"/>'
        f'<line class="axis" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{TOP + PLOT_H}" '
        f'y2="{TOP + PLOT_H}"/>'
        f'<text class="tick" x="{LEFT + PLOT_W / 2}" y="{TOP + PLOT_H + 28:.1f}" '
        'text-anchor="middle">step</text>'
    )
    for s in series:
        colour = COLOURS[rates.index(s.lr) % len(COLOURS)]
        dash = DASHES[layers.index(s.layer) % len(DASHES)]
        points = " ".join(f"{x(step):.1f},{y(fraction):.1f}" for step, fraction in s.points)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<polyline class="series" data-lr={quoteattr(f"{s.lr:g}")} '
            f'data-layer="{s.layer}" data-last={quoteattr(_last(s))} stroke="{colour}"'
            f'{dashed} points="{points}"/>'
        )
    legend_y = TOP + PLOT_H + BOTTOM + 4
    for row, s in enumerate(series):
        colour = COLOURS[rates.index(s.lr) % len(COLOURS)]
        dash = DASHES[layers.index(s.layer) % len(DASHES)]
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        ly = legend_y + row * LEGEND_LINE
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + 28}" y1="{ly:.1f}" y2="{ly:.1f}" stroke="{colour}" '
            f'stroke-width="1.8"{dashed}/><text class="legend-text" x="{LEFT + 34}" '
            f'y="{ly + 4:.1f}">lr {s.lr:g} · layer{s.layer}: {_last(s)} dead at the last '
            "recorded step</text>"
        )
    out.append("</g>")
    height = legend_y + len(series) * LEGEND_LINE
    return "".join(out), LEFT + PLOT_W + 16, height


def _last(series: Series) -> str:
    return f"{series.points[-1][1]:.0%}" if series.points else "?"


def _ticks(last: int) -> list[int]:
    """Round steps from 0 to `last`, 1, 2 or 5 x 10^k apart, at most 6 of them."""
    spacing = 1
    while last / spacing > 5:
        # 1, 2, 5, 10, 20, 50, ...: from a 2 the next is 2.5 times as far, else twice
        spacing = spacing * 5 // 2 if str(spacing)[0] == "2" else spacing * 2
    return list(range(0, last + 1, spacing))
