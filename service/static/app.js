/* gradiag's page: run a body against this service's own API and draw the answer.
 *
 * Plain JS and SVG DOM; the layout is dagre's (vendor/dagre.min.js, left to right).
 * docs/page.md describes what is drawn and the large-graph rule (MAX_DRAWN_NODES).
 */
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_DRAWN_NODES = 200; // the same rule as service/svg.py
  const FONT = "12px Helvetica, Arial, 'DejaVu Sans', sans-serif";
  const SMALL_FONT = "12px Helvetica, Arial, 'DejaVu Sans', sans-serif";
  const MAX_LABEL_CHARS = 40;

  // --- examples --------------------------------------------------------------------------

  function chain(n) {
    const nodes = [{ id: "x", op: "input", value: 0.5 }];
    let prev = "x";
    for (let i = 1; i < n; i++) {
      const id = "t" + i;
      nodes.push({ id: id, op: i % 3 === 0 ? "sigmoid" : "tanh", inputs: [prev] });
      prev = id;
    }
    return { nodes: nodes, output: prev };
  }

  /** A seeded uniform [0, 1) generator (mulberry32): the same example on every load. */
  function mulberry32(seed) {
    let a = seed >>> 0;
    return function () {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  /** The seed's dead-ReLU set-up, small: inputs in [0, 1), random labels, SGD at four
   * learning rates from the same He start (docs/training.md). */
  function trainingSweep() {
    const rand = mulberry32(7);
    const x = [];
    const y = [];
    for (let i = 0; i < 128; i++) {
      const row = [];
      for (let j = 0; j < 16; j++) row.push(Math.round(rand() * 1000) / 1000);
      x.push(row);
      y.push(Math.floor(rand() * 4));
    }
    return {
      input_dim: 16,
      layers: [{ units: 64 }, { units: 64 }, { units: 4, activation: "linear" }],
      loss: "softmax_cross_entropy",
      init: { scheme: "he", seed: 0 },
      batch: { x: x, y: y },
      train: { lr: [0.1, 0.5, 1.0, 2.0], steps: 100, batch_size: 32, seed: 0, record_every: 2 },
    };
  }

  const EXAMPLES = [
    {
      name: "CS231n example 1: (x + y) * z (expression)",
      body: { expression: "(x + y) * z", values: { x: -2, y: 5, z: -4 } },
    },
    {
      name: "CS231n example 2: a sigmoid neuron (graph JSON)",
      body: {
        nodes: [
          { id: "w0", op: "param", value: 2 },
          { id: "x0", op: "input", value: -1 },
          { id: "w1", op: "param", value: -3 },
          { id: "x1", op: "input", value: -2 },
          { id: "w2", op: "param", value: -3 },
          { id: "w0x0", op: "mul", inputs: ["w0", "x0"] },
          { id: "w1x1", op: "mul", inputs: ["w1", "x1"] },
          { id: "dot", op: "add", inputs: ["w0x0", "w1x1"] },
          { id: "z", op: "add", inputs: ["dot", "w2"] },
          { id: "f", op: "sigmoid", inputs: ["z"] },
        ],
        output: "f",
      },
    },
    {
      name: "Dead ReLU and saturated sigmoid units (graph JSON, a batch of 2)",
      body: {
        nodes: [
          { id: "x", op: "input", value: [[-1.5, -0.5, 9.0], [-1.0, -0.2, 8.0]] },
          { id: "W", op: "param", value: [[1, 0, 0], [0, 1, 0], [0, 0, 1]] },
          { id: "z", op: "matmul", inputs: ["x", "W"] },
          { id: "h", op: "relu", inputs: ["z"] },
          { id: "V", op: "param", value: [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]] },
          { id: "hv", op: "matmul", inputs: ["h", "V"] },
          { id: "s", op: "sigmoid", inputs: ["hv"] },
          { id: "f", op: "sum", inputs: ["s"] },
        ],
        output: "f",
      },
    },
    {
      name: "A ReLU neuron below its kink (expression)",
      body: { expression: "relu(w * x + b) * 3", values: { w: 0.5, x: -2, b: -1 } },
    },
    {
      name: "Network: 3 -> relu 8 -> sigmoid 6 -> linear 2, MSE",
      body: {
        input_dim: 3,
        layers: [
          { units: 8, activation: "relu" },
          { units: 6, activation: "sigmoid" },
          { units: 2, activation: "linear" },
        ],
        loss: "mse",
        init: { scheme: "he", seed: 0 },
        batch: { random: { size: 32, seed: 0 } },
        include: ["gradients"],
      },
    },
    {
      name: "Network: a deep tanh stack with small weights (vanishing gradient)",
      body: {
        input_dim: 4,
        layers: [
          { units: 16, activation: "tanh" },
          { units: 16, activation: "tanh" },
          { units: 16, activation: "tanh" },
          { units: 16, activation: "tanh" },
          { units: 3, activation: "linear" },
        ],
        loss: "softmax_cross_entropy",
        init: { scheme: "small", seed: 1 },
        batch: { random: { size: 16, seed: 1 } },
      },
    },
    {
      name: "Conv net: 1x12x12 -> conv 4 relu -> maxpool -> dense 3, softmax",
      body: {
        input_shape: [1, 12, 12],
        layers: [
          { type: "conv2d", filters: 4, kernel: 3, padding: 1, activation: "relu" },
          { type: "maxpool2d", kernel: 2, stride: 2 },
          { type: "flatten" },
          { units: 3, activation: "linear" },
        ],
        loss: "softmax_cross_entropy",
        init: { scheme: "he", seed: 0 },
        batch: { random: { size: 8, seed: 0 } },
      },
    },
    {
      name: "Training sweep: SGD at lr 0.1, 0.5, 1, 2 for 100 steps (dead ReLUs over time)",
      body: trainingSweep(),
    },
    { name: "Large graph: a 300-node tanh/sigmoid chain (collapsed)", body: chain(300) },
  ];

  // --- numbers as labels (the same as service/svg.py) ----------------------------------

  function fmtNumber(v) {
    if (typeof v === "string") {
      return { NaN: "NaN", Infinity: "∞", "-Infinity": "-∞" }[v] || v;
    }
    if (typeof v !== "number") return "?";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e6 || a < 1e-4) return v.toExponential(3).replace(/\.?0+e/, "e");
    return String(Number(v.toPrecision(4)));
  }

  function flatten(wire) {
    return Array.isArray(wire) ? wire.flat(Infinity) : [wire];
  }

  function fmtTensor(wire, shape) {
    if (wire === undefined || wire === null) return "";
    if (!shape || shape.length === 0) return fmtNumber(wire);
    const flat = flatten(wire);
    if (shape.length === 1 && flat.length <= 3) return "[" + flat.map(fmtNumber).join(", ") + "]";
    let norm;
    if (flat.some((x) => typeof x === "string")) {
      norm = flat.includes("NaN") ? "NaN" : "Infinity";
    } else {
      norm = Math.sqrt(flat.reduce((s, x) => s + x * x, 0));
    }
    return "[" + shape.join("×") + "] ‖·‖=" + fmtNumber(norm);
  }

  function clip(text, limit) {
    return text.length <= limit ? text : text.slice(0, limit - 1) + "…";
  }

  const measureCtx = document.createElement("canvas").getContext("2d");
  function textWidth(text, font) {
    measureCtx.font = font || FONT;
    return measureCtx.measureText(text).width;
  }

  // --- DOM helpers -----------------------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function html(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // --- the large-graph rule --------------------------------------------------------------

  /** Every node when there are at most MAX_DRAWN_NODES; else the MAX_DRAWN_NODES nearest
   * the output, breadth-first over operands. Keeps the report's (topological) order. */
  function visibleIds(nodes, output) {
    const ids = Object.keys(nodes);
    if (ids.length <= MAX_DRAWN_NODES) return ids;
    const kept = new Set([output]);
    const queue = [output];
    for (let head = 0; head < queue.length && kept.size < MAX_DRAWN_NODES; head++) {
      for (const operand of nodes[queue[head]].inputs || []) {
        if (!kept.has(operand) && kept.size < MAX_DRAWN_NODES) {
          kept.add(operand);
          queue.push(operand);
        }
      }
    }
    return ids.filter((id) => kept.has(id));
  }

  function opSummary(ops) {
    const counts = new Map();
    for (const op of ops) counts.set(op, (counts.get(op) || 0) + 1);
    const sorted = [...counts.entries()].sort((a, b) => b[1] - a[1]);
    const text = sorted.slice(0, 3).map(([op, n]) => op + "×" + n).join(", ");
    return sorted.length > 3 ? text + ", …" : text;
  }

  // --- the graph -------------------------------------------------------------------------

  function worstByLocation(findings) {
    const rank = { ok: 0, warn: 1, fail: 2 };
    const worst = {};
    const messages = {};
    for (const f of findings) {
      if ((rank[f.severity] || 0) > (rank[worst[f.location]] || 0)) worst[f.location] = f.severity;
      (messages[f.location] = messages[f.location] || []).push(f.message);
    }
    return { worst: worst, messages: messages };
  }

  /** Boxes and wires of a report whose nodes carry `inputs` (the graph's edges). */
  function graphDrawing(report) {
    const nodes = report.nodes;
    const output = report.output ? report.output.id : Object.keys(nodes).slice(-1)[0];
    const findings = (report.health && report.health.findings) || [];
    const { worst, messages } = worstByLocation(findings);
    const nonfinite = new Set((report.diagnostics && report.diagnostics.nonfinite_nodes) || []);
    const shown = visibleIds(nodes, output);
    const shownSet = new Set(shown);
    const key = {};
    shown.forEach((id, i) => (key[id] = "n" + i));
    const boxes = [];
    const wires = [];
    const consumers = {};
    const feedsHidden = [];
    const valueWire = (src, dst, sourceId) => {
      const node = nodes[sourceId];
      return {
        src: src, dst: dst, sourceId: sourceId,
        value: fmtTensor(node.value, node.shape),
        grad: "grad" in node ? fmtTensor(node.grad, node.shape) : "",
        classes: [],
      };
    };
    for (const id of shown) {
      const node = nodes[id];
      const classes = ["node"];
      if (worst[id]) classes.push("sev-" + worst[id]);
      if (nonfinite.has(id)) classes.push("nonfinite");
      let title = id + " (" + node.op + ") shape [" + (node.shape || []).join(", ") + "]";
      if (messages[id]) title += "\n" + messages[id].join("\n");
      boxes.push({ key: key[id], lines: [clip(id, MAX_LABEL_CHARS), node.op], classes: classes,
        title: title, nodeId: id });
      const seen = new Set();
      for (const operand of node.inputs || []) {
        if (seen.has(operand)) continue;
        seen.add(operand);
        if (shownSet.has(operand)) {
          consumers[operand] = (consumers[operand] || 0) + 1;
          wires.push(valueWire(key[operand], key[id], operand));
        } else if (!feedsHidden.includes(key[id])) {
          feedsHidden.push(key[id]);
        }
      }
    }
    for (const id of shown) {
      if (!consumers[id]) {
        const stub = key[id] + "_out";
        boxes.push({ key: stub, lines: [], point: true, classes: [] });
        wires.push(valueWire(key[id], stub, id));
      }
    }
    let note = "";
    const hidden = Object.keys(nodes).filter((id) => !shownSet.has(id));
    if (hidden.length) {
      boxes.push({
        key: "hidden",
        lines: [hidden.length + " more nodes", opSummary(hidden.map((h) => nodes[h].op))],
        classes: ["node", "hidden"],
        title: hidden.length + " nodes farther from the output are not drawn",
      });
      for (const dst of feedsHidden) {
        wires.push({ src: "hidden", dst: dst, value: "", grad: "", classes: ["hidden"] });
      }
      note = Object.keys(nodes).length + " nodes: showing the " + shown.length +
        " nearest the output (limit " + MAX_DRAWN_NODES + "); " + hidden.length +
        " collapsed into one box.";
    }
    return { boxes: boxes, wires: wires, note: note };
  }

  function boxSize(box) {
    if (box.point) return { width: 1, height: 1 };
    const w = Math.max(...box.lines.map((l, i) => textWidth(l, i === 0 ? "bold " + FONT : SMALL_FONT)));
    return { width: Math.ceil(w) + 22, height: box.lines.length * 15 + 12 };
  }

  function drawGraph(svg, drawing) {
    clear(svg);
    const g = new dagre.graphlib.Graph();
    g.setGraph({ rankdir: "LR", nodesep: 28, ranksep: 36, edgesep: 16, marginx: 16, marginy: 16 });
    g.setDefaultEdgeLabel(() => ({}));
    const sizes = {};
    for (const box of drawing.boxes) {
      sizes[box.key] = boxSize(box);
      g.setNode(box.key, { width: sizes[box.key].width, height: sizes[box.key].height });
    }
    for (const wire of drawing.wires) {
      const labelWidth = Math.max(textWidth(wire.value, SMALL_FONT), textWidth(wire.grad, SMALL_FONT));
      const label = wire.value || wire.grad
        ? { width: Math.ceil(labelWidth) + 12, height: 34, labelpos: "c" }
        : {};
      g.setEdge(wire.src, wire.dst, label);
    }
    dagre.layout(g);
    const graphInfo = g.graph();
    const width = Math.ceil(graphInfo.width) + 4;
    const height = Math.ceil(graphInfo.height) + 4;
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);

    const defs = el("defs");
    const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5",
      markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" });
    marker.appendChild(el("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" }));
    defs.appendChild(marker);
    svg.appendChild(defs);

    const wiresLayer = el("g", { class: "wires" });
    for (const wire of drawing.wires) {
      const edge = g.edge(wire.src, wire.dst);
      const group = el("g", { class: "edge", "data-from": wire.src, "data-to": wire.dst });
      group.appendChild(el("path", { class: ["wire"].concat(wire.classes).join(" "),
        d: smoothPath(edge.points), "marker-end": "url(#arrow)" }));
      if (edge.x !== undefined && (wire.value || wire.grad)) {
        if (wire.value) {
          group.appendChild(el("text", { class: "value", "data-value-for": wire.sourceId,
            x: edge.x, y: edge.y - 5, "text-anchor": "middle" }, wire.value));
        }
        if (wire.grad) {
          group.appendChild(el("text", { class: "grad", "data-grad-for": wire.sourceId,
            x: edge.x, y: edge.y + 13, "text-anchor": "middle" }, wire.grad));
        }
      }
      wiresLayer.appendChild(group);
    }
    svg.appendChild(wiresLayer);

    const nodesLayer = el("g", { class: "nodes" });
    for (const box of drawing.boxes) {
      if (box.point) continue;
      const pos = g.node(box.key);
      const size = sizes[box.key];
      const group = el("g", { class: box.classes.join(" "), "data-node": box.nodeId || box.key });
      group.appendChild(el("title", {}, box.title || ""));
      group.appendChild(el("rect", { x: pos.x - size.width / 2, y: pos.y - size.height / 2,
        width: size.width, height: size.height, rx: 5 }));
      box.lines.forEach((line, i) => {
        group.appendChild(el("text", { class: i === 0 ? "id" : "op", x: pos.x,
          y: pos.y - size.height / 2 + 6 + 15 * (i + 1) - 4, "text-anchor": "middle" }, line));
      });
      nodesLayer.appendChild(group);
    }
    svg.appendChild(nodesLayer);
  }

  /** dagre's points joined by straight segments with rounded corners (quadratic curves). */
  function smoothPath(points) {
    let d = "M" + points[0].x + "," + points[0].y;
    for (let i = 1; i < points.length - 1; i++) {
      const p = points[i];
      const q = points[i + 1];
      d += " Q" + p.x + "," + p.y + " " + (p.x + q.x) / 2 + "," + (p.y + q.y) / 2;
    }
    const last = points[points.length - 1];
    return d + " L" + last.x + "," + last.y;
  }

  // --- networks: the per-layer chart and the tables -------------------------------------

  function drawLayerChart(svg, layers) {
    clear(svg);
    const rowH = 34;
    const top = 36;
    const labelW = 120;
    const panelW = 280;
    const gap = 60;
    const height = top + rowH * layers.length + 40;
    const width = labelW + panelW * 2 + gap + 40;
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    const x0 = labelW;
    const x1 = labelW + panelW + gap;
    svg.appendChild(el("text", { class: "panel-title", x: x0, y: 14 },
      "dead / saturated units (fraction)"));
    svg.appendChild(el("text", { class: "panel-title", x: x1, y: 14 },
      "gradient norms ‖dW‖, ‖db‖ (log scale)"));

    // fractions, linear 0..1
    for (const t of [0, 0.25, 0.5, 0.75, 1]) {
      const x = x0 + t * panelW;
      svg.appendChild(el("line", { class: "gridline", x1: x, x2: x, y1: top - 6, y2: top + rowH * layers.length }));
      svg.appendChild(el("text", { class: "tick", x: x, y: top + rowH * layers.length + 14,
        "text-anchor": "middle" }, Math.round(t * 100) + "%"));
    }
    // norms, log10 over the decades the data spans
    const norms = [];
    for (const layer of layers) {
      for (const k of ["W", "b"]) {
        const v = layer.grad_norm && layer.grad_norm[k];
        if (typeof v === "number" && v > 0 && isFinite(v)) norms.push(v);
      }
    }
    let lo = norms.length ? Math.floor(Math.log10(Math.min(...norms))) : -3;
    let hi = norms.length ? Math.ceil(Math.log10(Math.max(...norms))) : 1;
    if (hi <= lo) hi = lo + 1;
    lo = Math.max(lo, hi - 12);
    const logX = (v) => x1 + ((Math.log10(v) - lo) / (hi - lo)) * panelW;
    const step = Math.max(1, Math.ceil((hi - lo) / 6));
    for (let e = lo; e <= hi; e += step) {
      const x = x1 + ((e - lo) / (hi - lo)) * panelW;
      svg.appendChild(el("line", { class: "gridline", x1: x, x2: x, y1: top - 6, y2: top + rowH * layers.length }));
      svg.appendChild(el("text", { class: "tick", x: x, y: top + rowH * layers.length + 14,
        "text-anchor": "middle" }, "1e" + e));
    }
    layers.forEach((layer, i) => {
      const y = top + i * rowH;
      const group = el("g", { class: "layer-row", "data-layer": "layer" + layer.index });
      group.appendChild(el("text", { class: "axis-label", x: labelW - 8, y: y + 16, "text-anchor": "end" },
        layerLabel(layer)));
      const bars = [
        ["dead", layer.dead_fraction, "dead"],
        ["saturated", layer.saturated_fraction, "sat"],
      ];
      bars.forEach(([cls, value, short], j) => {
        const v = typeof value === "number" ? value : 0;
        const by = y + 3 + j * 13;
        group.appendChild(el("rect", { class: "bar " + cls, "data-value": v, x: x0, y: by,
          width: Math.max(v * panelW, 0.5), height: 11 }));
        group.appendChild(el("text", { class: "bar-label", x: x0 + Math.max(v * panelW, 0) + 4, y: by + 9 },
          short + " " + Math.round(v * 100) + "%"));
      });
      ["W", "b"].forEach((k, j) => {
        const v = layer.grad_norm ? layer.grad_norm[k] : undefined;
        const by = y + 3 + j * 13;
        const ok = typeof v === "number" && v > 0 && isFinite(v);
        const w = ok ? Math.max(logX(Math.max(v, Math.pow(10, lo))) - x1, 0.5) : 0.5;
        group.appendChild(el("rect", { class: "bar grad" + k, "data-value": String(v), x: x1, y: by,
          width: w, height: 11 }));
        group.appendChild(el("text", { class: "bar-label", x: x1 + w + 4, y: by + 9 },
          "‖d" + k + "‖ " + fmtNumber(v)));
      });
      svg.appendChild(group);
    });
    svg.appendChild(el("line", { class: "axis", x1: x0, x2: x0, y1: top - 6, y2: top + rowH * layers.length }));
    svg.appendChild(el("line", { class: "axis", x1: x1, x2: x1, y1: top - 6, y2: top + rowH * layers.length }));
  }

  // "layer1 relu" for a dense layer, "layer1 conv2d relu" and its C×H×W for the others
  function layerLabel(layer) {
    const kind = layer.type && layer.type !== "dense" ? " " + layer.type : "";
    return "layer" + layer.index + kind + (layer.activation ? " " + layer.activation : "");
  }

  function shapeText(layer) {
    return Array.isArray(layer.shape) ? layer.shape.join("×") : String(layer.units);
  }

  function fillTable(table, caption, head, rows) {
    clear(table);
    table.appendChild(html("caption", {}, caption));
    const tr = html("tr");
    head.forEach((h) => tr.appendChild(html("th", {}, h)));
    table.appendChild(tr);
    for (const row of rows) {
      const r = html("tr");
      row.forEach((cell) => r.appendChild(html("td", {}, String(cell))));
      table.appendChild(r);
    }
  }

  function pct(v) {
    return typeof v === "number" ? (100 * v).toFixed(0) + "%" : "";
  }

  // --- training: the timeline (the same plot as service/timeline.py) ------------------

  const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const DASHES = ["", "6 3", "2 3", "8 3 2 3"];

  /** One line per (learning rate, relu layer): its dead fraction at each recorded step. */
  function timelineSeries(report) {
    const training = report.training;
    if (!training) return [];
    const runs = training.runs || [training];
    const units = {};
    for (const layer of report.layers || []) {
      if ((layer.activation === "relu" || layer.activation === "leaky_relu") && layer.units) {
        units[layer.index] = layer.units;
      }
    }
    const series = [];
    for (const run of runs) {
      for (const index of Object.keys(units).map(Number)) {
        const points = [];
        for (const step of run.steps || []) {
          for (const entry of step.layers || []) {
            if (entry.index === index) points.push([step.step, entry.dead_units / units[index]]);
          }
        }
        series.push({ lr: run.lr, layer: index, points: points });
      }
    }
    return series;
  }

  function niceTicks(last) {
    let spacing = 1;
    while (last / spacing > 5) spacing = String(spacing)[0] === "2" ? spacing * 5 / 2 : spacing * 2;
    const ticks = [];
    for (let t = 0; t <= last; t += spacing) ticks.push(t);
    return ticks;
  }

  function drawTimeline(svg, report) {
    clear(svg);
    const series = timelineSeries(report);
    const left = 48;
    const top = 12;
    const plotW = 560;
    const plotH = 200;
    const legendTop = top + plotH + 40;
    const width = left + plotW + 260;
    const height = legendTop + Math.ceil(series.length / 2) * 16 + 8;
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    const rates = [...new Set(series.map((s) => s.lr))];
    const layers = [...new Set(series.map((s) => s.layer))];
    let last = 1;
    for (const s of series) for (const [step] of s.points) last = Math.max(last, step);
    const x = (step) => left + (step / last) * plotW;
    const y = (fraction) => top + (1 - fraction) * plotH;
    for (const t of [0, 0.25, 0.5, 0.75, 1]) {
      svg.appendChild(el("line", { class: "gridline", x1: left, x2: left + plotW, y1: y(t), y2: y(t) }));
      svg.appendChild(el("text", { class: "tick", x: left - 6, y: y(t) + 3, "text-anchor": "end" },
        Math.round(t * 100) + "%"));
    }
    for (const step of niceTicks(last)) {
      svg.appendChild(el("text", { class: "tick", x: x(step), y: top + plotH + 14, "text-anchor": "middle" },
        String(step)));
    }
    svg.appendChild(el("text", { class: "tick", x: left + plotW / 2, y: top + plotH + 30,
      "text-anchor": "middle" }, "step"));
    svg.appendChild(el("line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotH }));
    svg.appendChild(el("line", { class: "axis", x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH }));
    series.forEach((s, i) => {
      const colour = COLOURS[rates.indexOf(s.lr) % COLOURS.length];
      const dash = DASHES[layers.indexOf(s.layer) % DASHES.length];
      const final = s.points.length ? s.points[s.points.length - 1][1] : 0;
      const attrs = { class: "series", "data-lr": String(s.lr), "data-layer": String(s.layer),
        "data-last": String(final), stroke: colour,
        points: s.points.map(([step, f]) => x(step).toFixed(1) + "," + y(f).toFixed(1)).join(" ") };
      if (dash) attrs["stroke-dasharray"] = dash;
      svg.appendChild(el("polyline", attrs));
      const lx = left + (i % 2) * 300;
      const ly = legendTop + Math.floor(i / 2) * 16;
      const key = { x1: lx, x2: lx + 28, y1: ly, y2: ly, stroke: colour, "stroke-width": 1.8 };
      if (dash) key["stroke-dasharray"] = dash;
      svg.appendChild(el("line", key));
      svg.appendChild(el("text", { class: "legend-text", x: lx + 34, y: ly + 4 },
        "lr " + s.lr + " · layer" + s.layer + ": " + Math.round(final * 100) + "% dead"));
    });
  }

  function showTraining(report) {
    const section = document.getElementById("training-section");
    section.hidden = !report.training;
    if (!report.training) return;
    drawTimeline(document.getElementById("timeline"), report);
    const table = report.training.table;
    const runs = report.training.runs || [report.training];
    const dying = table ? table.layers : [];
    const rows = table
      ? table.rows.map((r) => [r.lr, r.status, fmtNumber(r.loss)].concat(r.dead_fraction.map(pct)))
      : [[report.training.lr, report.health.status, fmtNumber(report.loss)]];
    const runCells = runs.map((run) => [run.updates, run.died.length, run.revived.length]);
    fillTable(document.getElementById("training-table"), "final weights per learning rate",
      ["lr", "status", "loss"].concat(dying.map((i) => "dead layer" + i), ["updates", "died", "revived"]),
      rows.map((row, i) => row.concat(runCells[i])));
  }

  // --- findings --------------------------------------------------------------------------

  function showFindings(health) {
    const list = document.getElementById("findings");
    clear(list);
    const badge = document.getElementById("health");
    badge.textContent = health.status;
    badge.className = "badge " + health.status;
    if (!health.findings.length) {
      list.appendChild(html("li", { class: "finding none" }, "No findings: the gradients look healthy."));
    }
    for (const f of health.findings) {
      const li = html("li", { class: "finding", "data-severity": f.severity, "data-code": f.code });
      li.appendChild(html("span", { class: "sev " + f.severity }, f.severity));
      li.appendChild(html("span", { class: "code" }, f.code));
      li.appendChild(document.createTextNode(" "));
      li.appendChild(html("span", { class: "location" }, "@ " + f.location + ": "));
      li.appendChild(document.createTextNode(f.message));
      list.appendChild(li);
    }
    document.getElementById("findings-section").hidden = false;
  }

  // --- running a body --------------------------------------------------------------------

  function endpointFor(body) {
    const chosen = document.getElementById("endpoint").value;
    if (chosen !== "auto") return "/v1/" + chosen;
    return body && typeof body === "object" && "layers" in body ? "/v1/network" : "/v1/graph";
  }

  function setStatus(text, error) {
    const status = document.getElementById("status");
    status.textContent = text;
    status.className = error ? "error" : "";
    status.dataset.state = error ? "error" : "done";
  }

  function problemText(problem) {
    let text = problem.status + " " + problem.title + ": " + problem.detail;
    for (const e of problem.errors || []) text += "\n  at " + (e.loc || []).join(".") + ": " + e.msg;
    return text;
  }

  function parseBody() {
    const text = document.getElementById("body").value;
    try {
      return { text: text, body: JSON.parse(text) };
    } catch (err) {
      return { text: text, body: null };
    }
  }

  // The page draws the graph's edges: it asks for them (`explain`) unless the body says.
  function explained(text, body) {
    if (!body || typeof body !== "object" || Array.isArray(body) || "explain" in body) return text;
    return JSON.stringify(Object.assign({}, body, { explain: true }));
  }

  async function run() {
    const { text, body } = parseBody();
    const url = endpointFor(body);
    setStatus("running " + url + " …", false);
    document.getElementById("status").dataset.state = "running";
    let response;
    try {
      const sent = explained(text, body);
      response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: sent });
    } catch (err) {
      setStatus("the service did not answer: " + err, true);
      return;
    }
    const answer = await response.json().catch(() => null);
    if (!response.ok) {
      setStatus(answer ? problemText(answer) : response.status + " " + response.statusText, true);
      return;
    }
    show(url, answer, body);
    setStatus(url + ": " + answer.health.status, false);
  }

  function show(url, report, body) {
    showFindings(report.health);
    const networkSection = document.getElementById("network-section");
    const graphSection = document.getElementById("graph-section");
    const isNetwork = url === "/v1/network";
    networkSection.hidden = !isNetwork;
    if (isNetwork) {
      drawLayerChart(document.getElementById("layer-chart"), report.layers || []);
      const p = report.parameters || {};
      fillTable(document.getElementById("param-table"), (report.name || "network") + ": parameters",
        ["", "count"], [["neurons", p.neurons], ["weights", p.weights], ["biases", p.biases],
          ["total", p.total], ["loss", fmtNumber(report.loss)]]);
      fillTable(document.getElementById("layer-table"), "per layer",
        ["layer", "type", "shape", "activation", "weights", "biases", "dead", "saturated", "‖dW‖", "‖db‖"],
        (report.layers || []).map((l) => [
          "layer" + l.index, l.type || "dense", shapeText(l), l.activation || "",
          l.parameters ? l.parameters.weights : "", l.parameters ? l.parameters.biases : "",
          pct(l.dead_fraction), pct(l.saturated_fraction),
          fmtNumber(l.grad_norm && l.grad_norm.W), fmtNumber(l.grad_norm && l.grad_norm.b),
        ]));
    }
    showTraining(isNetwork ? report : {});
    const nodes = report.nodes || {};
    const hasEdges = Object.values(nodes).some((n) => Array.isArray(n.inputs));
    graphSection.hidden = !hasEdges;
    if (hasEdges) {
      const drawing = graphDrawing(isNetwork ? Object.assign({ output: { id: "loss" } }, report) : report);
      document.getElementById("graph-note").textContent = drawing.note;
      drawGraph(document.getElementById("graph"), drawing);
    }
  }

  async function downloadSvg() {
    const { text, body } = parseBody();
    const url = endpointFor(body) + ".svg";
    const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: text });
    if (!response.ok) {
      const problem = await response.json().catch(() => null);
      setStatus(problem ? problemText(problem) : String(response.status), true);
      return;
    }
    const blob = await response.blob();
    const link = html("a", { href: URL.createObjectURL(blob), download: "gradiag.svg" });
    document.body.appendChild(link);
    link.click();
    link.remove();
  }

  // --- wiring ----------------------------------------------------------------------------

  function init() {
    const select = document.getElementById("example");
    EXAMPLES.forEach((example, i) => select.appendChild(html("option", { value: String(i) }, example.name)));
    const bodyArea = document.getElementById("body");
    const load = () => {
      bodyArea.value = JSON.stringify(EXAMPLES[Number(select.value)].body, null, 2);
    };
    select.addEventListener("change", load);
    load();
    document.getElementById("run").addEventListener("click", run);
    document.getElementById("svg").addEventListener("click", downloadSvg);
    document.getElementById("file").addEventListener("change", (event) => {
      const file = event.target.files[0];
      if (!file) return;
      file.text().then((text) => {
        bodyArea.value = text;
      });
    });
    document.body.dataset.ready = "true";
  }

  window.gradiag = { visibleIds: visibleIds, fmtTensor: fmtTensor, MAX_DRAWN_NODES: MAX_DRAWN_NODES };
  init();
})();
