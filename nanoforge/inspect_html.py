"""
One self-contained HTML page showing an inspect_model.Explanation: the layer x head grid of
attention patterns (click one to enlarge it, with token labels and the weight under the
pointer), a token view in the manner of bertviz's head view, next-token probability bars at
every position, and the logit lens; and the causal views explain.py was asked for (ablation, head
importance, direct logit attribution, activation patching) as tables, bars and heatmaps; and with an SAE
(explain.py --sae), the features active at each token and what ablating one does to each next-token probability.

All script, style and data are inline and nothing is fetched, so the page opens offline. Token
text reaches the page only as JSON (with <, >, & and / escaped) and is put into the document
as text, never as markup: a prompt holding <script> shows as text. Attention weights are
stored as one byte each (0-255, the lower triangle only), base64-encoded, so a 256-token
page of a small model stays well under a megabyte.
"""

import base64
import json

import torch


def predictions(e, top_k):
    """At each position: the top-k predictions and the actual next token's probability and rank."""
    T = len(e.ids)
    top = torch.topk(e.probs, min(top_k, e.probs.size(-1)))
    predictions = []
    for t in range(T):
        entry = {"top": [[e.label(i), round(p, 4)] for p, i in zip(top.values[t].tolist(), top.indices[t].tolist())]}
        if t + 1 < T:
            nxt = e.ids[t + 1]
            entry["next"] = [e.labels[t + 1], round(e.probs[t, nxt].item(), 4), e.rank(t, nxt)]
        predictions.append(entry)
    return predictions


def predictions_json(e, top_k):
    """explain.py --json without a causal view: the tokens, the predictions and the prompt's loss."""
    return {"tokens": e.labels, "predictions": predictions(e, top_k), "loss": e.loss()}


def page_data(explanation, title, top_k, views=None):
    """The numbers the page draws, rounded (probabilities to 4 decimals, weights to 1/255), and the
    causal views' JSON (causal_views.run) as they are."""
    e = explanation
    n_layer, n_head, T, _ = e.patterns.shape
    rows, cols = torch.tril_indices(T, T)
    weights = (e.patterns[:, :, rows, cols] * 255).round().to(torch.uint8)  # (n_layer, n_head, T(T+1)/2)
    lens = [[[[e.label(i), round(p, 4)] for i, p in zip(ids.tolist(), probs.tolist())]
             for ids, probs in zip(layer_ids, layer_probs)] for layer_ids, layer_probs in zip(e.lens_ids, e.lens_probs)]
    loss = e.loss()
    return {"title": title, "labels": e.labels, "n_layer": n_layer, "n_head": n_head,
            "weights": base64.b64encode(weights.numpy().tobytes()).decode("ascii"),
            "predictions": predictions(e, top_k), "lens": lens, "loss": None if loss is None else round(loss, 4),
            "views": views or {}}


def script_json(data):
    """JSON that is safe inside a <script> element and holds no '//' (so no text of the page can be
    read as a protocol-relative address): <, >, & and / are written as JSON escapes."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("/", "\\/")):
        text = text.replace(char, escape)
    return text


def render(explanation, title, top_k=5, views=None):
    """The page as a string; views ({name: JSON} from causal_views.run) each add a section."""
    return PAGE.replace("{{DATA}}", script_json(page_data(explanation, title, top_k, views)))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>explain.py</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.8em; }
.tok { font-family: ui-monospace, monospace; white-space: pre; background: #eef; border-radius: 3px; padding: 0 2px; margin: 1px; display: inline-block; }
table.grid td { padding: 2px; text-align: center; font-size: 12px; }
canvas.cell { border: 1px solid #ccc; cursor: pointer; image-rendering: pixelated; }
canvas.cell.selected { border: 2px solid #d33; }
#readout { font-family: ui-monospace, monospace; min-height: 1.4em; }
#enlarged p { margin: 0.3em 0; max-width: 40em; }
.panel { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
table.preds td { padding: 1px 6px; vertical-align: middle; font-size: 12px; white-space: nowrap; }
.pred { display: inline-block; width: 10em; }
.bar { display: inline-block; height: 10px; background: #58c; vertical-align: middle; margin: 0 3px; }
.mono { font-family: ui-monospace, monospace; white-space: pre; }
.lens { overflow-x: auto; max-width: 100%; }
table.lens td, table.lens th { font-family: ui-monospace, monospace; font-size: 11px; white-space: pre; padding: 1px 3px; }
.muted { color: #777; }
table.heat td, table.heat th { font-family: ui-monospace, monospace; font-size: 11px; padding: 2px 5px; text-align: right; white-space: pre; }
.neg { display: inline-block; height: 10px; background: #c55; vertical-align: middle; }
</style>
</head>
<body>
<h1 id="title"></h1>
<p id="summary"></p>
<div id="tokens"></div>

<h2>Attention patterns: one cell per layer (rows) and head (columns); click one to enlarge it</h2>
<div class="panel">
  <table class="grid" id="grid"></table>
  <div id="enlarged" hidden>
    <p id="enlarged-title"></p>
    <canvas id="big"></canvas>
    <p id="readout"></p>
  </div>
</div>
<h2>Token view: hover a token on the left to see which earlier tokens it attends to (the selected head)</h2>
<canvas id="lines"></canvas>

<h2>Next-token predictions at each position</h2>
<table class="preds" id="preds"></table>

<h2>Logit lens: each layer's residual stream through the final norm and the un-embedding (top prediction)</h2>
<div class="lens"><table class="lens" id="lens"></table></div>

<section id="ablate-view" hidden>
<h2>Ablation: the probability of each actual next token with the parts removed</h2>
<p id="ablate-summary"></p>
<table class="preds" id="ablate"></table>
</section>
<section id="importance-view" hidden>
<h2>Head importance: the rise in validation loss when one head is ablated (layers are rows)</h2>
<p id="importance-summary"></p>
<table class="heat" id="importance"></table>
</section>
<section id="attribute-view" hidden>
<h2>Direct logit attribution: what each part writes towards one logit, through the frozen final norm</h2>
<p id="attribute-summary"></p>
<table class="preds" id="attribute"></table>
</section>
<section id="patch-view" hidden>
<h2>Activation patching: percent of the answer's clean - corrupted logit difference each clean activation restores</h2>
<p id="patch-summary"></p>
<table class="heat" id="patch-residual"></table>
<p>one head's clean output, at every position:</p>
<table class="heat" id="patch-heads"></table>
</section>

<section id="features-view" hidden>
<h2>SAE features active at each token (the strongest first)</h2>
<p id="features-summary"></p>
<table class="preds" id="features"></table>
<p id="features-ablated-summary"></p>
<table class="preds" id="features-ablated"></table>
</section>

<script id="data" type="application/json">{{DATA}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const T = D.labels.length, L = D.n_layer, H = D.n_head;
const raw = atob(D.weights);
const tri = T * (T + 1) / 2;
let layer = 0, head = 0, hover = -1;

function weight(l, h, q, k) {
  if (k > q) return 0;
  return raw.charCodeAt((l * H + h) * tri + q * (q + 1) / 2 + k) / 255;
}
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function shown(s) { return s.replace(/ /g, "\u2423"); }
function shade(w) { const v = Math.round(255 * (1 - w)); return "rgb(" + v + "," + v + ",255)"; }

document.getElementById("title").textContent = D.title;
document.getElementById("summary").textContent = T + " tokens, " + L + " layers x " + H + " heads" +
  (D.loss === null ? "" : "; loss over the prompt " + D.loss.toFixed(4));
const tokens = document.getElementById("tokens");
D.labels.forEach(function (s, i) { const t = el("span", s, "tok"); t.title = "position " + i; tokens.appendChild(t); });

function drawPattern(canvas, l, h, size) {
  canvas.width = T; canvas.height = T;
  canvas.style.width = size + "px"; canvas.style.height = size + "px";
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(T, T);
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    const v = Math.round(255 * (1 - weight(l, h, q, k))), o = 4 * (q * T + k);
    img.data[o] = v; img.data[o + 1] = v; img.data[o + 2] = 255; img.data[o + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

const grid = document.getElementById("grid");
const header = el("tr"); header.appendChild(el("td"));
for (let h = 0; h < H; h++) header.appendChild(el("td", "head " + h));
grid.appendChild(header);
const cellSize = Math.max(40, Math.min(100, Math.floor(560 / H)));
for (let l = 0; l < L; l++) {
  const row = el("tr"); row.appendChild(el("td", "layer " + l));
  for (let h = 0; h < H; h++) {
    const td = el("td"), c = el("canvas", undefined, "cell");
    c.dataset.layer = l; c.dataset.head = h; c.title = "layer " + l + " head " + h;
    drawPattern(c, l, h, cellSize);
    c.addEventListener("click", function () { select(l, h); });
    td.appendChild(c); row.appendChild(td);
  }
  grid.appendChild(row);
}

const LONGEST = Math.min(10, Math.max.apply(null, D.labels.map(function (s) { return s.length; })));
const big = document.getElementById("big"), LABEL = 16 + 8 * LONGEST, CELL = Math.max(3, Math.min(20, Math.floor(600 / T)));
function drawBig() {
  big.width = LABEL + T * CELL; big.height = LABEL + T * CELL;
  const ctx = big.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, big.width, big.height);
  for (let q = 0; q < T; q++) for (let k = 0; k <= q; k++) {
    ctx.fillStyle = shade(weight(layer, head, q, k));
    ctx.fillRect(LABEL + k * CELL, LABEL + q * CELL, CELL, CELL);
  }
  if (CELL >= 7) {
    ctx.fillStyle = "#222"; ctx.font = Math.min(12, CELL) + "px monospace"; ctx.textBaseline = "middle";
    for (let i = 0; i < T; i++) {
      const s = shown(D.labels[i].slice(0, 10));
      ctx.textAlign = "right"; ctx.fillText(s, LABEL - 4, LABEL + (i + 0.5) * CELL);
      ctx.save(); ctx.translate(LABEL + (i + 0.5) * CELL, LABEL - 4); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left"; ctx.fillText(s, 0, 0); ctx.restore();
    }
  }
}
big.addEventListener("mousemove", function (ev) {
  const r = big.getBoundingClientRect();
  const k = Math.floor((ev.clientX - r.left - LABEL) / CELL), q = Math.floor((ev.clientY - r.top - LABEL) / CELL);
  const out = document.getElementById("readout");
  if (q < 0 || k < 0 || q >= T || k >= T) { out.textContent = ""; return; }
  out.textContent = "query " + q + " '" + shown(D.labels[q]) + "' -> key " + k + " '" + shown(D.labels[k]) + "': weight " +
    weight(layer, head, q, k).toFixed(3);
});

const lines = document.getElementById("lines"), ROW = 16, COLW = 150, GAP = 160;
function drawLines() {
  lines.width = 2 * COLW + GAP; lines.height = T * ROW + 4;
  const ctx = lines.getContext("2d");
  ctx.clearRect(0, 0, lines.width, lines.height);
  ctx.font = "12px monospace"; ctx.textBaseline = "middle";
  for (let q = 0; q < T; q++) {
    if (hover >= 0 && q !== hover) continue;
    for (let k = 0; k <= q; k++) {
      const w = weight(layer, head, q, k);
      if (w < 0.01) continue;
      ctx.strokeStyle = "rgba(40,90,200," + (hover >= 0 ? w : w * 0.4) + ")";
      ctx.lineWidth = hover >= 0 ? 1 + 3 * w : 1;
      ctx.beginPath(); ctx.moveTo(COLW + 4, (q + 0.5) * ROW + 2); ctx.lineTo(COLW + GAP - 4, (k + 0.5) * ROW + 2); ctx.stroke();
    }
  }
  for (let i = 0; i < T; i++) {
    const s = shown(D.labels[i].slice(0, 16));
    ctx.fillStyle = i === hover ? "#d33" : "#222";
    ctx.textAlign = "right"; ctx.fillText(s, COLW, (i + 0.5) * ROW + 2);
    ctx.fillStyle = hover >= 0 && i <= hover ? shade(weight(layer, head, hover, i)) : "#fff";
    ctx.fillRect(COLW + GAP, i * ROW + 3, 2 + ctx.measureText(s).width, ROW - 2);
    ctx.fillStyle = "#222"; ctx.textAlign = "left"; ctx.fillText(s, COLW + GAP + 1, (i + 0.5) * ROW + 2);
  }
}
lines.addEventListener("mousemove", function (ev) {
  const r = lines.getBoundingClientRect(), q = Math.floor((ev.clientY - r.top - 2) / ROW);
  const h = ev.clientX - r.left < COLW + 4 && q >= 0 && q < T ? q : -1;
  if (h !== hover) { hover = h; drawLines(); }
});
lines.addEventListener("mouseleave", function () { hover = -1; drawLines(); });

function select(l, h) {
  layer = l; head = h;
  document.querySelectorAll("canvas.cell").forEach(function (c) {
    c.classList.toggle("selected", +c.dataset.layer === l && +c.dataset.head === h);
  });
  const box = document.getElementById("enlarged");
  box.hidden = false; box.dataset.layer = l; box.dataset.head = h;
  document.getElementById("enlarged-title").textContent = "layer " + l + ", head " + h +
    ": rows are queries, columns the keys they attend to; point at a square for its weight";
  drawBig(); drawLines();
}

const preds = document.getElementById("preds");
const ph = el("tr");
["pos", "token", "actual next token: p, rank", "top predictions"].forEach(function (s) { ph.appendChild(el("th", s)); });
preds.appendChild(ph);
D.predictions.forEach(function (p, t) {
  const tr = el("tr"), token = el("td");
  token.appendChild(el("span", shown(D.labels[t]), "tok"));
  tr.appendChild(el("td", String(t))); tr.appendChild(token);
  tr.appendChild(el("td", p.next ? "'" + shown(p.next[0]) + "' " + p.next[1].toFixed(4) + ", #" + p.next[2] : "", "mono"));
  const td = el("td");
  p.top.forEach(function (c) {
    const item = el("span", undefined, "pred"), bar = el("span", undefined, "bar");
    bar.style.width = Math.max(1, Math.round(60 * c[1])) + "px";
    item.title = c[1].toFixed(4);
    item.appendChild(el("span", shown(c[0]), "mono")); item.appendChild(bar);
    item.appendChild(el("span", c[1].toFixed(2)));
    td.appendChild(item);
  });
  tr.appendChild(td); preds.appendChild(tr);
});

const lens = document.getElementById("lens");
const lh = el("tr"); lh.appendChild(el("th", ""));
D.labels.forEach(function (s) { lh.appendChild(el("th", shown(s))); });
lens.appendChild(lh);
D.lens.forEach(function (layerTop, i) {
  const tr = el("tr");
  tr.appendChild(el("th", i === 0 ? "embeddings" : "after block " + (i - 1)));
  layerTop.forEach(function (top) {
    const td = el("td", shown(top[0][0]));
    td.style.background = shade(0.6 * top[0][1]);
    td.title = top.map(function (c) { return "'" + shown(c[0]) + "' " + c[1].toFixed(4); }).join("  ");
    tr.appendChild(td);
  });
  lens.appendChild(tr);
});

select(0, 0);
document.getElementById("enlarged").hidden = true;

/* The causal views: each section is shown only when explain.py computed it. */
const V = D.views;
function show(name, summary) {
  document.getElementById(name + "-view").hidden = false;
  document.getElementById(name + "-summary").textContent = summary;
  return document.getElementById(name);
}
function row(table, cells, tag) {
  const tr = el("tr");
  cells.forEach(function (c) { tr.appendChild(c instanceof Node ? c : el(tag || "td", c)); });
  table.appendChild(tr);
  return tr;
}
function bar(value, widest, width) {
  const b = el("span", undefined, value >= 0 ? "bar" : "neg");
  b.style.width = Math.max(1, Math.round(width * Math.abs(value) / (widest || 1))) + "px";
  return b;
}
function heat(v, widest) {  /* blue for positive, red for negative, white at 0 */
  const a = Math.min(1, Math.abs(v) / (widest || 1)), c = Math.round(255 * (1 - 0.75 * a));
  return v >= 0 ? "rgb(" + c + "," + c + ",255)" : "rgb(255," + c + "," + c + ")";
}
function heatTable(table, corner, columns, rows, values, scale, format) {
  row(table, [corner].concat(columns), "th");
  values.forEach(function (r, i) {
    const tr = row(table, [el("th", rows[i])]);
    r.forEach(function (v) { const td = el("td", format(v)); td.style.background = heat(v, scale); tr.appendChild(td); });
  });
}
if (V.features) {
  const f = V.features, t = show("features", "features of " + f.site + " from " + f.sae);
  row(t, ["pos", "token", "active features (activation)"], "th");
  f.tokens.forEach(function (active, i) {
    row(t, [String(i), shown(D.labels[i]), active.map(function (p) { return "F" + p[0] + " " + p[1].toFixed(2); }).join("  ")]);
  });
  if (f.ablated) {
    const a = f.ablated, u = document.getElementById("features-ablated");
    document.getElementById("features-ablated-summary").textContent = "feature " + a.feature + " ablated: loss over the prompt " +
      a.loss.toFixed(4) + " -> " + a.ablated_loss.toFixed(4);
    row(u, ["pos", "token", "next", "p before", "p after"], "th");
    a.positions.forEach(function (p) { row(u, [String(p.position), shown(p.token), shown(p.next), p.p.toFixed(3), p.ablated_p.toFixed(3)]); });
  }
}
if (V.ablate) {
  const a = V.ablate, t = show("ablate", "ablated (" + a.ablation + "): " + a.ablate + "; loss over the prompt " +
    a.loss.toFixed(4) + " -> " + a.ablated_loss.toFixed(4));
  row(t, ["pos", "token", "next", "p before", "p after", ""], "th");
  a.positions.forEach(function (p) {
    const cell = el("td"); cell.appendChild(bar(p.p, 1, 80)); cell.appendChild(el("br")); cell.appendChild(bar(p.ablated_p, 1, 80));
    cell.lastChild.style.background = "#e93";
    row(t, [String(p.position), shown(p.token), shown(p.next), p.p.toFixed(3), p.ablated_p.toFixed(3), cell]);
  });
}
if (V.importance) {
  const m = V.importance, widest = Math.max.apply(null, m.increase.flat().map(Math.abs));
  const t = show("importance", m.ablation + " ablation over " + m.batches + " batches; the model's own loss " + m.loss.toFixed(4));
  heatTable(t, "", m.increase[0].map(function (_, h) { return "head " + h; }),
    m.increase.map(function (_, l) { return "layer " + l; }), m.increase, widest, function (v) { return (v >= 0 ? "+" : "") + v.toFixed(4); });
}
if (V.attribute) {
  const a = V.attribute, parts = a.parts.slice().sort(function (x, y) { return Math.abs(y.value) - Math.abs(x.value); });
  const widest = Math.abs(parts[0].value);
  const t = show("attribute", "logit of '" + shown(a.token) + "' at position " + a.position + ": " + a.logit.toFixed(4) +
    " (the parts sum to it; final norm's 1/sigma frozen at " + a.norm_scale.toPrecision(4) + ")");
  parts.forEach(function (p) {
    const cell = el("td"); cell.appendChild(bar(p.value, widest, 200));
    row(t, [p.name, (p.value >= 0 ? "+" : "") + p.value.toFixed(4), cell]);
  });
}
if (V.patch) {
  const p = V.patch, pct = function (v) { return (100 * v).toFixed(0); };
  show("patch", "answer '" + shown(p.answer) + "': logit " + p.clean_logit.toFixed(3) + " clean, " +
    p.corrupted_logit.toFixed(3) + " corrupted. Residual stream at each layer (rows) and position (columns; * where the prompts differ):");
  const t = document.getElementById("patch-residual");
  const columns = p.tokens.map(function (s, i) { return shown(s) + (s === p.corrupted_tokens[i] ? "" : "*"); });
  heatTable(t, "", columns, p.streams, p.residual, 1, pct);
  heatTable(document.getElementById("patch-heads"), "", p.heads[0].map(function (_, h) { return "head " + h; }),
    p.heads.map(function (_, l) { return "layer " + l; }), p.heads, 1, pct);
}
</script>
</body>
</html>
"""
