"""Server-side pictures for POST /v1/graph.svg and POST /v1/network.svg.

The JSON report (the very dict the JSON twin answers) becomes a `Drawing` (boxes and
wires with their labels), a kept layout library places it left to right, and `render`
writes the SVG:

- Graphviz's `dot` when it is on PATH: the DOT text goes on stdin (never a user string on
  the command line), `-Tjson` comes back with node centres and edge splines; a timeout
  bounds it.
- otherwise (or when `dot` fails or times out) the pure-Python Sugiyama layout of the PyPI
  package `grandalf`, the same layered algorithm family as `dot`, with polyline wires.

Each wire shows, as in the CS231n lecture, the forward value of its source above it (green)
and the gradient d(output)/d(source) below it (red); every sink gets a short outgoing wire
so the output's own value and gradient show too. Large graphs keep the `MAX_DRAWN_NODES`
nodes nearest the output (breadth-first over operands); the rest collapse into one
summary box. docs/page.md describes all of it.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import shutil
import subprocess
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import orjson

from gradiag.service.timeline import STYLE as TIMELINE_STYLE
from gradiag.service.timeline import timeline_svg

log = logging.getLogger("gradiag.svg")

MAX_DRAWN_NODES = 200
DOT_TIMEOUT_S = 10.0

FONT_SIZE = 12
CHAR_W = 7.0  # a generous average advance of 12 px Helvetica/Arial/DejaVu Sans
LINE_H = 15
NODE_PAD_X = 10
NODE_PAD_Y = 6
NODE_SEP = 40.0  # between boxes of one rank, px
MARGIN = 16
HEADER_H = 40
FINDING_LINE_H = 18
MAX_LABEL_CHARS = 40
MAX_FINDING_CHARS = 140

HIDDEN_KEY = "hidden"

STYLE = """
.title { font-weight: bold; font-size: 14px; }
.legend { font-size: 11px; fill: #555; }
.node rect { fill: #f5f7fa; stroke: #5b6b7f; stroke-width: 1.2; }
.node .id { font-weight: bold; fill: #1d2733; }
.node .op, .node .line { fill: #4a5563; font-size: 11px; }
.node.sev-warn rect { fill: #fff4d6; stroke: #c98a00; stroke-width: 2; }
.node.sev-fail rect { fill: #fde2e1; stroke: #c62828; stroke-width: 2.4; }
.node.nonfinite rect { fill: #fde2e1; stroke: #8e0000; stroke-width: 2.4;
  stroke-dasharray: 5 3; }
.node.hidden rect { fill: #eceff1; stroke: #90a4ae; stroke-dasharray: 4 3; }
.wire { fill: none; stroke: #6b7785; stroke-width: 1.3; }
.wire.hidden { stroke-dasharray: 4 3; }
.value { fill: #1b7f1b; font-size: 11px; }
.grad { fill: #c62828; font-size: 11px; }
.finding { font-size: 11px; fill: #1d2733; }
.sev-ok { fill: #1b7f1b; } .sev-warn-text { fill: #a66f00; } .sev-fail-text { fill: #c62828; }
"""


# --- the drawing -------------------------------------------------------------------------


@dataclass
class Box:
    key: str
    lines: list[str]  # first line bold (the id), the rest smaller
    classes: list[str] = field(default_factory=list)
    title: str = ""
    node_id: str | None = None
    point: bool = False  # the invisible end of a sink's outgoing wire

    @property
    def size(self) -> tuple[float, float]:
        if self.point:
            return 1.0, 1.0
        chars = max((len(line) for line in self.lines), default=1)
        return chars * CHAR_W + 2 * NODE_PAD_X, len(self.lines) * LINE_H + 2 * NODE_PAD_Y


@dataclass
class Wire:
    src: str
    dst: str
    value: str = ""
    grad: str = ""
    source_id: str | None = None  # the node whose value and gradient the wire carries
    classes: list[str] = field(default_factory=list)

    @property
    def label_width(self) -> float:
        return max(len(self.value), len(self.grad)) * CHAR_W


@dataclass
class Drawing:
    title: str
    boxes: list[Box]
    wires: list[Wire]
    notes: list[str] = field(default_factory=list)
    findings: list[Mapping[str, Any]] = field(default_factory=list)
    # a plot below the boxes (the training timeline): SVG markup at (0, 0), width, height
    appendix: tuple[str, float, float] | None = None


@dataclass
class Layout:
    width: float
    height: float
    centres: dict[str, tuple[float, float]]
    paths: list[str]  # SVG path data, one per wire, in the drawing's wire order
    midpoints: list[tuple[float, float]]
    engine: str


# --- numbers as labels -------------------------------------------------------------------

_NONFINITE = {"NaN": "NaN", "Infinity": "∞", "-Infinity": "-∞"}

# Characters XML 1.0 cannot hold at all, not even as character references. Ids are refused
# with them at validation (schemas.common.NodeId); this keeps the picture well-formed XML
# whatever text reaches it, by writing each as a visible \uXXXX.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    return _XML_ILLEGAL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def fmt_number(value: Any) -> str:
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    if value == 0:
        return "0"
    return format(float(value), ".4g")


def _flatten(wire: Any) -> Iterator[Any]:
    stack = [wire]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            yield item


def fmt_tensor(wire: Any, shape: Sequence[int]) -> str:
    """A scalar as a number; up to 3 elements of a vector listed; else shape and 2-norm (a
    summary, `{"shape", ..., "norm"}`, brings its norm: service.summary)."""
    if wire is None:
        return ""
    dims = "×".join(str(d) for d in shape)
    if isinstance(wire, Mapping):
        return (
            f"[{dims}] ‖·‖={fmt_number(wire.get('norm'))}"
            if shape
            else fmt_number(wire.get("mean"))
        )
    if not shape:
        return fmt_number(wire)
    flat = list(_flatten(wire))
    if len(shape) == 1 and len(flat) <= 3:
        return "[" + ", ".join(fmt_number(x) for x in flat) + "]"
    norm: float | str
    if any(isinstance(x, str) for x in flat):
        norm = "NaN" if "NaN" in flat else "Infinity"
    else:
        norm = math.sqrt(math.fsum(float(x) * float(x) for x in flat))
    return f"[{dims}] ‖·‖={fmt_number(norm)}"


def _clip_text(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the large-graph rule ----------------------------------------------------------------


def visible_ids(nodes: Mapping[str, Mapping[str, Any]], output: str) -> list[str]:
    """Every node when there are at most MAX_DRAWN_NODES; else the MAX_DRAWN_NODES nodes
    nearest the output, found breadth-first over operands (the output first). The answer
    keeps the report's (topological) order."""
    if len(nodes) <= MAX_DRAWN_NODES:
        return list(nodes)
    kept: set[str] = {output}
    queue = deque([output])
    while queue and len(kept) < MAX_DRAWN_NODES:
        for operand in nodes[queue.popleft()].get("inputs") or []:
            if operand not in kept and len(kept) < MAX_DRAWN_NODES:
                kept.add(operand)
                queue.append(operand)
    return [node_id for node_id in nodes if node_id in kept]


def _op_summary(ops: Iterable[str]) -> str:
    counts = Counter(ops).most_common()
    text = ", ".join(f"{op}×{n}" for op, n in counts[:3])
    return text + (", …" if len(counts) > 3 else "")


# --- reports to drawings -----------------------------------------------------------------


def _severity_by_location(findings: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    rank = {"ok": 0, "warn": 1, "fail": 2}
    worst: dict[str, str] = {}
    for finding in findings:
        where, severity = str(finding.get("location", "")), str(finding.get("severity", "ok"))
        if rank.get(severity, 0) > rank.get(worst.get(where, "ok"), 0):
            worst[where] = severity
    return worst


def _messages_by_location(findings: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    messages: dict[str, list[str]] = {}
    for finding in findings:
        location = str(finding.get("location", ""))
        messages.setdefault(location, []).append(str(finding.get("message", "")))
    return messages


def graph_drawing(report: Mapping[str, Any]) -> Drawing:
    """The /v1/graph report (its nodes carry `inputs`) as boxes and labelled wires."""
    nodes: Mapping[str, Mapping[str, Any]] = report["nodes"]
    output = report["output"]["id"]
    findings = list(report.get("health", {}).get("findings", []))
    severity = _severity_by_location(findings)
    messages = _messages_by_location(findings)
    nonfinite = set(report.get("diagnostics", {}).get("nonfinite_nodes", []))
    shown = visible_ids(nodes, output)
    shown_set = set(shown)
    key = {node_id: f"n{i}" for i, node_id in enumerate(shown)}

    boxes: list[Box] = []
    wires: list[Wire] = []
    consumers: Counter[str] = Counter()
    feeds_hidden: list[str] = []
    for node_id in shown:
        node = nodes[node_id]
        classes = ["node"]
        if node_id in severity:
            classes.append(f"sev-{severity[node_id]}")
        if node_id in nonfinite:
            classes.append("nonfinite")
        title = f"{node_id} ({node.get('op')}) shape {node.get('shape')}"
        if node_id in messages:
            title += "\n" + "\n".join(messages[node_id])
        boxes.append(
            Box(
                key[node_id],
                [_clip_text(node_id), str(node.get("op", ""))],
                classes,
                title,
                node_id,
            )
        )
        seen: set[str] = set()
        for operand in node.get("inputs") or []:
            if operand in seen:
                continue
            seen.add(operand)
            if operand in shown_set:
                consumers[operand] += 1
                wires.append(_value_wire(key[operand], key[node_id], operand, nodes[operand]))
            elif key[node_id] not in feeds_hidden:
                feeds_hidden.append(key[node_id])
    for node_id in shown:  # sinks (the output first of all) get an outgoing stub wire
        if consumers[node_id] == 0:
            stub = f"{key[node_id]}_out"
            boxes.append(Box(stub, [], point=True))
            wires.append(_value_wire(key[node_id], stub, node_id, nodes[node_id]))

    notes = []
    hidden = [node_id for node_id in nodes if node_id not in shown_set]
    if hidden:
        ops = _op_summary(str(nodes[h].get("op", "")) for h in hidden)
        boxes.append(
            Box(
                HIDDEN_KEY,
                [f"{len(hidden)} more nodes", ops],
                ["node", "hidden"],
                f"{len(hidden)} nodes farther from the output are not drawn",
            )
        )
        wires.extend(Wire(HIDDEN_KEY, dst, classes=["hidden"]) for dst in feeds_hidden)
        notes.append(
            f"{len(nodes)} nodes: showing the {len(shown)} nearest the output "
            f"(limit {MAX_DRAWN_NODES}); {len(hidden)} collapsed into one box"
        )
    value = fmt_tensor(report["output"].get("value"), report["output"].get("shape", []))
    title = f"gradiag graph: output {_clip_text(output)} = {value}"
    return Drawing(title, boxes, wires, notes, findings)


def _value_wire(src: str, dst: str, source_id: str, node: Mapping[str, Any]) -> Wire:
    shape = node.get("shape", [])
    return Wire(
        src,
        dst,
        fmt_tensor(node.get("value"), shape),
        fmt_tensor(node.get("grad"), shape) if "grad" in node else "",
        source_id,
    )


def network_drawing(report: Mapping[str, Any], input_dim: int | None = None) -> Drawing:
    """The /v1/network report as its layer chain: input, one box per layer with its health
    (dead and saturated fractions, gradient norms), the loss. Image layers show C×H×W."""
    layers: Sequence[Mapping[str, Any]] = report.get("layers", [])
    findings = list(report.get("health", {}).get("findings", []))
    severity = _severity_by_location(findings)
    messages = _messages_by_location(findings)
    shape = report.get("input_shape") or ([input_dim] if input_dim else [])
    boxes = [Box("input", ["input", _shape_text(shape, "features") if shape else "X"], ["node"])]
    for layer in layers:
        name = f"layer{layer.get('index')}"
        classes = ["node"] + ([f"sev-{severity[name]}"] if name in severity else [])
        boxes.append(
            Box(name, _layer_lines(name, layer), classes, "\n".join(messages.get(name, [])), name)
        )
    loss = report.get("loss")
    boxes.append(Box("loss", ["loss", fmt_number(loss)], ["node"], node_id="loss"))
    keys = [box.key for box in boxes]
    wires = [Wire(a, b) for a, b in itertools.pairwise(keys)]
    params = report.get("parameters", {})
    notes = [
        f"parameters: {params.get('total')} ({params.get('weights')} weights, "
        f"{params.get('biases')} biases, {params.get('neurons')} neurons)"
    ]
    title = f"gradiag {report.get('name', 'network')}: loss {fmt_number(loss)}"
    return Drawing(title, boxes, wires, notes, findings)


def _layer_lines(name: str, layer: Mapping[str, Any]) -> list[str]:
    """A layer box: its kind and output shape, then the health lines that apply to it."""
    kind, activation = layer.get("type", "dense"), layer.get("activation")
    shape = layer.get("shape") or [layer.get("units")]
    what = _shape_text(shape, "units") + (f" {activation}" if activation else "")
    lines = [f"{name} {kind}", what]
    if activation:
        noun = "filters" if len(shape) == 3 else "units"
        lines.append(
            f"dead {_percent(layer.get('dead_fraction'))} · "
            f"saturated {_percent(layer.get('saturated_fraction'))} {noun}"
        )
    grad = layer.get("grad_norm", {})
    norms = [f"‖d{k}‖ {fmt_number(grad[k])}" for k in ("W", "b", "gamma") if k in grad]
    if norms:
        lines.append(" · ".join(norms))
    return lines


def _shape_text(shape: Sequence[Any], noun: str) -> str:
    """[C, H, W] as "C×H×W", [n] as "n units"."""
    return "×".join(map(str, shape)) if len(shape) > 1 else f"{shape[0]} {noun}"


def _percent(fraction: Any) -> str:
    if isinstance(fraction, int | float) and not isinstance(fraction, bool):
        return f"{fraction:.0%}"
    return "?"


# --- layout ------------------------------------------------------------------------------


def _rank_sep(drawing: Drawing) -> float:
    """Room between ranks for the widest wire label, px."""
    widest = max((wire.label_width for wire in drawing.wires), default=0.0)
    return max(60.0, widest + 24.0)


def dot_source(drawing: Drawing) -> str:
    """The DOT text: node names are our own keys; labels are escaped DOT strings."""
    inch = 72.0
    lines = [
        "digraph gradiag {",
        f'  graph [rankdir=LR, charset="UTF-8", ranksep={_rank_sep(drawing) / inch:.3f}, '
        f"nodesep={NODE_SEP / inch:.3f}];",
        '  node [shape=box, fixedsize=true, fontname="Helvetica", fontsize=12];',
    ]
    for box in drawing.boxes:
        width, height = box.size
        label = dot_string("\n".join(map(xml_safe, box.lines)))
        shape = ", shape=point" if box.point else ""
        lines.append(
            f"  {box.key} [label={label}, width={width / inch:.3f}, "
            f"height={height / inch:.3f}{shape}];"
        )
    lines.extend(f"  {wire.src} -> {wire.dst};" for wire in drawing.wires)
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_string(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped (so no `\\N`-style escape
    of Graphviz's survives), newlines as DOT's centred line break."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\r", "").replace("\n", "\\n")
    return f'"{escaped}"'


def layout(drawing: Drawing, deadline: float | None = None) -> Layout:
    """`dot` when installed and working, else grandalf's Sugiyama layout. `dot` gets what is
    left of the request's `deadline` (a `time.monotonic()` value), at most DOT_TIMEOUT_S;
    grandalf's time is bounded by MAX_DRAWN_NODES."""
    dot = shutil.which("dot")
    if dot:
        try:
            return dot_layout(drawing, dot, _seconds_left(deadline))
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as err:
            log.warning("dot failed (%s); falling back to grandalf", err)
    return grandalf_layout(drawing)


def _seconds_left(deadline: float | None) -> float:
    if deadline is None:
        return DOT_TIMEOUT_S
    return max(0.1, min(DOT_TIMEOUT_S, deadline - time.monotonic()))


def dot_layout(drawing: Drawing, dot: str, timeout: float = DOT_TIMEOUT_S) -> Layout:
    done = subprocess.run(  # a fixed argument list; the DOT text goes on stdin
        [dot, "-Tjson"],
        input=dot_source(drawing).encode(),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise ValueError(done.stderr.decode(errors="replace")[:300])
    data = orjson.loads(done.stdout)
    _, _, right, top = (float(v) for v in data["bb"].split(","))
    names: dict[int, str] = {}
    centres: dict[str, tuple[float, float]] = {}
    for obj in data.get("objects", []):
        x, y = (float(v) for v in obj["pos"].split(","))
        names[int(obj["_gvid"])] = obj["name"]
        centres[obj["name"]] = (x, top - y)
    routes: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for edge in data.get("edges", []):
        routes[(names[int(edge["tail"])], names[int(edge["head"])])] = _dot_points(edge["pos"], top)
    paths, midpoints = [], []
    for wire in drawing.wires:
        points = routes[(wire.src, wire.dst)]
        paths.append(_bezier_path(points))
        midpoints.append(_bezier_midpoint(points))
    return Layout(right, top, centres, paths, midpoints, "dot")


def _dot_points(pos: str, top: float) -> list[tuple[float, float]]:
    """A Graphviz spline ("e,x,y p1 p2 ..."): the B-spline points, then the arrow tip."""
    points, end = [], None
    for token in pos.split():
        parts = token.split(",")
        if parts[0] == "e":
            end = (float(parts[1]), top - float(parts[2]))
        elif parts[0] != "s":
            points.append((float(parts[0]), top - float(parts[1])))
    if end is not None:
        points.append(end)
    return points


def _bezier_path(points: list[tuple[float, float]]) -> str:
    (x0, y0), rest = points[0], points[1:]
    path = [f"M{x0:.1f},{y0:.1f}"]
    curves = (len(rest) // 3) * 3
    for i in range(0, curves, 3):
        (a, b), (c, d), (e, f) = rest[i : i + 3]
        path.append(f"C{a:.1f},{b:.1f} {c:.1f},{d:.1f} {e:.1f},{f:.1f}")
    path.extend(f"L{x:.1f},{y:.1f}" for x, y in rest[curves:])  # the arrow tip
    return " ".join(path)


def _bezier_midpoint(points: list[tuple[float, float]]) -> tuple[float, float]:
    segments = (len(points) - 1) // 3
    if segments == 0:
        return _polyline_midpoint(points)
    if segments % 2 == 0:
        return points[3 * (segments // 2)]
    p0, p1, p2, p3 = points[3 * (segments // 2) : 3 * (segments // 2) + 4]
    return (
        (p0[0] + 3 * p1[0] + 3 * p2[0] + p3[0]) / 8,
        (p0[1] + 3 * p1[1] + 3 * p2[1] + p3[1]) / 8,
    )


class _VertexView:
    def __init__(self, w: float, h: float) -> None:
        self.w, self.h = w, h
        self.xy = (0.0, 0.0)


class _EdgeView:
    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def setpath(self, points: list[tuple[float, float]]) -> None:
        self.points = list(points)


def grandalf_layout(drawing: Drawing) -> Layout:
    """grandalf's Sugiyama layout runs top to bottom: sizes go in swapped and coordinates
    come out swapped, for left to right. Connected components are stacked."""
    from grandalf.graphs import Edge, Graph, Vertex
    from grandalf.layouts import SugiyamaLayout

    vertices: dict[str, Any] = {}
    for box in drawing.boxes:
        width, height = box.size
        vertex = Vertex(box.key)
        vertex.view = _VertexView(height, width)
        vertices[box.key] = vertex
    edges = []
    for wire in drawing.wires:
        edge = Edge(vertices[wire.src], vertices[wire.dst])
        edge.view = _EdgeView()
        edges.append(edge)
    graph = Graph(list(vertices.values()), edges)
    rank_sep = _rank_sep(drawing)
    centres: dict[str, tuple[float, float]] = {}
    routes: dict[int, list[tuple[float, float]]] = {}
    offset = 0.0
    width = 0.0
    for component in graph.C:
        sugiyama = SugiyamaLayout(component)
        sugiyama.xspace, sugiyama.yspace = NODE_SEP, rank_sep
        sugiyama.init_all()
        sugiyama.draw()
        comp_vertices = list(component.sV)
        low_x = min(v.view.xy[1] - v.view.h / 2 for v in comp_vertices)
        low_y = min(v.view.xy[0] - v.view.w / 2 for v in comp_vertices)
        high_x = max(v.view.xy[1] + v.view.h / 2 for v in comp_vertices)
        high_y = max(v.view.xy[0] + v.view.w / 2 for v in comp_vertices)
        for v in comp_vertices:
            centres[v.data] = (v.view.xy[1] - low_x, v.view.xy[0] - low_y + offset)
        for edge in component.sE:
            routes[id(edge)] = [(y - low_x, x - low_y + offset) for x, y in edge.view.points]
        offset += high_y - low_y + NODE_SEP
        width = max(width, high_x - low_x)
    sizes = {box.key: box.size for box in drawing.boxes}
    paths, midpoints = [], []
    for wire, edge in zip(drawing.wires, edges, strict=True):
        points = list(routes[id(edge)])
        points[0] = _clip(centres[wire.src], sizes[wire.src], points[1])
        points[-1] = _clip(centres[wire.dst], sizes[wire.dst], points[-2])
        paths.append("M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points))
        midpoints.append(_polyline_midpoint(points))
    return Layout(width, max(offset - NODE_SEP, 0.0), centres, paths, midpoints, "grandalf")


def _clip(
    centre: tuple[float, float], size: tuple[float, float], toward: tuple[float, float]
) -> tuple[float, float]:
    """Where the segment from a box's centre toward a point leaves the box."""
    (cx, cy), (w, h) = centre, size
    dx, dy = toward[0] - cx, toward[1] - cy
    if dx == 0 and dy == 0:
        return centre
    scale = min(
        (w / 2) / abs(dx) if dx else math.inf,
        (h / 2) / abs(dy) if dy else math.inf,
    )
    return cx + dx * min(scale, 1.0), cy + dy * min(scale, 1.0)


def _polyline_midpoint(points: list[tuple[float, float]]) -> tuple[float, float]:
    lengths = [math.dist(a, b) for a, b in itertools.pairwise(points)]
    half = sum(lengths) / 2
    for (a, b), length in zip(itertools.pairwise(points), lengths, strict=True):
        if length >= half and length > 0:
            t = half / length
            return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t
        half -= length
    return points[len(points) // 2]


# --- SVG ---------------------------------------------------------------------------------


def render(drawing: Drawing, placed: Layout) -> str:
    findings_h = FINDING_LINE_H * (len(drawing.findings) + 1) + 8
    notes_h = LINE_H * len(drawing.notes)
    longest = max((len(_finding_text(f)) for f in drawing.findings), default=0)
    longest = max([longest, *(len(note) for note in drawing.notes)])
    plot_w, plot_h = drawing.appendix[1:] if drawing.appendix else (0.0, 0.0)
    width = max(placed.width + 2 * MARGIN, longest * 6.2 + 70, 640.0, plot_w + 2 * MARGIN)
    height = HEADER_H + notes_h + placed.height + 2 * MARGIN + findings_h + plot_h
    top = HEADER_H + notes_h + MARGIN
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="{FONT_SIZE}" '
        f"data-layout={quoteattr(placed.engine)}>",
        f"<title>{escape(drawing.title)}</title>",
        f"<style>{STYLE}</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#6b7785"/></marker></defs>',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text class="title" x="{MARGIN}" y="20">{escape(drawing.title)}</text>',
        f'<text class="legend" x="{MARGIN}" y="35"><tspan class="value">value above the '
        'wire (green)</tspan> · <tspan class="grad">gradient d(output)/d(node) below '
        "(red)</tspan> · orange: warn · red: fail · dashed red: non-finite</text>",
    ]
    for i, note in enumerate(drawing.notes):
        out.append(
            f'<text class="legend" x="{MARGIN}" y="{HEADER_H + LINE_H * (i + 1) - 3}">'
            f"{escape(note)}</text>"
        )
    out.append(f'<g transform="translate({MARGIN},{top:.0f})">')
    out.append('<g class="wires">')
    for wire, path, (mx, my) in zip(drawing.wires, placed.paths, placed.midpoints, strict=True):
        out.append(_wire_svg(wire, path, mx, my))
    out.append('</g><g class="nodes">')
    for box in drawing.boxes:
        if not box.point:
            out.append(_box_svg(box, placed.centres[box.key]))
    out.append("</g></g>")
    if drawing.appendix:
        out.append(f"<style>{TIMELINE_STYLE}</style>")
        out.append(
            f'<g transform="translate({MARGIN},{top + placed.height + MARGIN:.0f})">'
            f"{drawing.appendix[0]}</g>"
        )
    out.append(_findings_svg(drawing.findings, top + placed.height + MARGIN + plot_h))
    out.append("</svg>")
    return xml_safe("\n".join(out) + "\n")


def _wire_svg(wire: Wire, path: str, mx: float, my: float) -> str:
    classes = " ".join(["wire", *wire.classes])
    parts = [f'<g class="edge" data-from={quoteattr(wire.src)} data-to={quoteattr(wire.dst)}>']
    parts.append(f'<path class="{classes}" d="{path}" marker-end="url(#arrow)"/>')
    source = quoteattr(wire.source_id or "")
    if wire.value:
        parts.append(
            f'<text class="value" data-value-for={source} x="{mx:.1f}" y="{my - 5:.1f}" '
            f'text-anchor="middle">{escape(wire.value)}</text>'
        )
    if wire.grad:
        parts.append(
            f'<text class="grad" data-grad-for={source} x="{mx:.1f}" y="{my + 14:.1f}" '
            f'text-anchor="middle">{escape(wire.grad)}</text>'
        )
    parts.append("</g>")
    return "".join(parts)


def _box_svg(box: Box, centre: tuple[float, float]) -> str:
    (cx, cy), (w, h) = centre, box.size
    node = quoteattr(box.node_id or box.key)
    parts = [f'<g class="{" ".join(box.classes)}" data-node={node}>']
    if box.title:
        parts.append(f"<title>{escape(box.title)}</title>")
    parts.append(
        f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5"/>'
    )
    for i, line in enumerate(box.lines):
        y = cy - h / 2 + NODE_PAD_Y + LINE_H * (i + 1) - 4
        css = "id" if i == 0 else ("op" if len(box.lines) == 2 else "line")
        parts.append(
            f'<text class="{css}" x="{cx:.1f}" y="{y:.1f}" text-anchor="middle">'
            f"{escape(line)}</text>"
        )
    parts.append("</g>")
    return "".join(parts)


def _findings_svg(findings: Sequence[Mapping[str, Any]], top: float) -> str:
    parts = [f'<g class="findings" transform="translate({MARGIN},{top:.0f})">']
    if not findings:
        parts.append(
            '<text class="finding" y="12"><tspan class="sev-ok">● ok</tspan> no findings</text>'
        )
    else:
        parts.append('<text class="finding" y="12" font-weight="bold">Health findings</text>')
    for i, finding in enumerate(findings):
        severity = str(finding.get("severity", ""))
        text = _finding_text(finding)
        parts.append(
            f'<text class="finding" y="{12 + FINDING_LINE_H * (i + 1)}" '
            f"data-severity={quoteattr(severity)}>"
            f'<tspan class="sev-{escape(severity)}-text">● {escape(severity)}</tspan> '
            f"{escape(text)}</text>"
        )
    parts.append("</g>")
    return "".join(parts)


def _finding_text(finding: Mapping[str, Any]) -> str:
    message = _clip_text(str(finding.get("message", "")), MAX_FINDING_CHARS)
    return f"{finding.get('code')} @ {finding.get('location')}: {message}"


# --- entry points ------------------------------------------------------------------------


def graph_svg(report: Mapping[str, Any], *, deadline: float | None = None) -> str:
    drawing = graph_drawing(report)
    return render(drawing, layout(drawing, deadline))


def network_svg(
    report: Mapping[str, Any], input_dim: int | None = None, *, deadline: float | None = None
) -> str:
    """The layer chain; with `train`, the training timeline below it (service.timeline)."""
    drawing = network_drawing(report, input_dim)
    drawing.appendix = timeline_svg(report)
    training = report.get("training")
    if training:
        runs = training.get("runs") or [training]
        rates = ", ".join(f"{run['lr']:g}" for run in runs)
        which = (
            "initial weights (the start of every run)" if "runs" in training else "final weights"
        )
        drawing.notes.append(f"trained at lr {rates}; the layers show the {which}")
    return render(drawing, layout(drawing, deadline))
