"""
The feature browser: one self-contained HTML page (no script, style or data fetched; it opens offline) with an SAE's
features ordered by density (click one: its top-activating contexts, each token shaded by the feature's activation,
a histogram of its activations, the tokens it promotes and suppresses), a search box that keeps the features whose
contexts or logit tokens hold the text typed, and the embedding space (a PCA map; click a token for its nearest
neighbours). Token text reaches the page only as JSON (inspect_html.script_json) and is set as text, never markup.
"""

from nanoforge.inspect_html import script_json


def render(title, features, embedding):
    """features: feature_survey.page_data (or None), embedding: embedding_space.page_data (or None)."""
    data = {"title": title, "features": features, "embedding": embedding}
    return PAGE.replace("{{DATA}}", script_json(data))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>features.py</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.8em; }
.tok { font-family: ui-monospace, monospace; white-space: pre; border-radius: 3px; padding: 0 1px; }
.panel { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
#list { max-height: 38em; overflow-y: auto; min-width: 22em; }
table.features td { padding: 1px 6px; font-size: 12px; white-space: nowrap; cursor: pointer; }
table.features tr.selected { background: #fdd; }
.bar { display: inline-block; height: 10px; background: #58c; vertical-align: middle; }
.ctx { margin: 3px 0; font-size: 13px; }
.ctx .at { outline: 1px solid #d33; }
.muted { color: #777; }
.mono { font-family: ui-monospace, monospace; white-space: pre; }
#map { border: 1px solid #ccc; cursor: crosshair; }
</style>
</head>
<body>
<h1 id="title"></h1>
<section id="features-view" hidden>
<p id="summary"></p>
<p><input id="search" type="search" size="30" placeholder="search by token or text">
<span id="matches" class="muted"></span></p>
<div class="panel">
  <div id="list"><table class="features" id="features"></table></div>
  <div id="feature" hidden>
    <h2 id="feature-title"></h2>
    <p id="feature-summary" class="muted"></p>
    <div id="contexts"></div>
    <h2>Activations (histogram, 0 .. the largest)</h2>
    <canvas id="histogram" width="320" height="120"></canvas>
    <h2>Through the un-embedding</h2>
    <p>promotes: <span id="promoted"></span></p>
    <p>suppresses: <span id="suppressed"></span></p>
  </div>
</div>
</section>
<section id="embedding-view" hidden>
<h2>The embedding space: a PCA map of the first tokens (click one for its nearest neighbours by cosine)</h2>
<p><select id="matrix"></select> <span id="picked" class="mono"></span></p>
<div class="panel"><canvas id="map" width="640" height="480"></canvas><div id="near" class="mono"></div></div>
</section>

<script id="data" type="application/json">{{DATA}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function shown(s) { return s.replace(/ /g, "\\u2423"); }
function shade(a, peak) { const v = Math.round(255 * (1 - Math.min(1, a / (peak || 1)) * 0.8)); return "rgb(255," + v + "," + v + ")"; }
function quoted(list) { return list.map(function (s) { return "'" + shown(s) + "'"; }).join("  "); }
document.getElementById("title").textContent = D.title;

if (D.features) {
  const F = D.features;
  document.getElementById("features-view").hidden = false;
  document.getElementById("summary").textContent = F.latents + " features (k " + F.k + ") of " + F.site + ", trained on " +
    F.tokens.toLocaleString() + " tokens; surveyed on " + F.surveyed.toLocaleString() + " val tokens, where " + F.dead +
    " never fired. Most often active first.";
  const table = document.getElementById("features"), rows = [];
  const densest = F.features.length ? F.features[0].density : 1;
  F.features.forEach(function (f, i) {
    const tr = el("tr"); tr.dataset.feature = f.id;
    tr.appendChild(el("td", "F" + f.id));
    const bar = el("span", undefined, "bar"); bar.style.width = Math.max(1, 80 * f.density / densest) + "px";
    const td = el("td"); td.appendChild(bar); td.appendChild(el("span", " " + (100 * f.density).toFixed(2) + "%")); tr.appendChild(td);
    const top = f.contexts.slice(0, 3).map(function (c) { return c.tokens[c.at]; });
    tr.appendChild(el("td", quoted(top), "mono"));
    tr.addEventListener("click", function () { select(i); });
    f.text = [].concat(f.promoted, f.contexts.map(function (c) { return c.tokens.join(""); })).join("\\n").toLowerCase();
    table.appendChild(tr); rows.push(tr);
  });
  function select(i) {
    const f = F.features[i];
    rows.forEach(function (r, j) { r.classList.toggle("selected", j === i); });
    document.getElementById("feature").hidden = false;
    document.getElementById("feature").dataset.feature = f.id;
    document.getElementById("feature-title").textContent = "Feature " + f.id;
    document.getElementById("feature-summary").textContent = "active on " + (100 * f.density).toFixed(3) +
      "% of tokens; largest activation " + f.peak + ". Top-activating contexts, each token shaded by its activation:";
    const box = document.getElementById("contexts"); box.textContent = "";
    f.contexts.forEach(function (c) {
      const line = el("div", undefined, "ctx");
      line.appendChild(el("span", c.value.toFixed(2) + "  ", "mono muted"));
      c.tokens.forEach(function (s, j) {
        const t = el("span", shown(s), "tok" + (j === c.at ? " at" : ""));
        t.style.background = shade(c.acts[j], f.peak); t.title = "activation " + c.acts[j];
        line.appendChild(t);
      });
      box.appendChild(line);
    });
    const cv = document.getElementById("histogram"), ctx = cv.getContext("2d"), most = Math.max.apply(null, f.histogram) || 1;
    ctx.clearRect(0, 0, cv.width, cv.height); ctx.fillStyle = "#58c";
    const w = cv.width / f.histogram.length;
    f.histogram.forEach(function (c, b) { const h = (cv.height - 10) * c / most; ctx.fillRect(b * w + 1, cv.height - h, w - 2, h); });
    document.getElementById("promoted").textContent = quoted(f.promoted);
    document.getElementById("suppressed").textContent = quoted(f.suppressed);
  }
  document.getElementById("search").addEventListener("input", function (e) {
    const q = e.target.value.toLowerCase();
    let n = 0;
    F.features.forEach(function (f, i) { const hit = !q || f.text.indexOf(q) >= 0; rows[i].hidden = !hit; n += hit; });
    document.getElementById("matches").textContent = q ? n + " features match" : "";
  });
  if (F.features.length) select(0);
}

if (D.embedding) {
  const E = D.embedding, names = Object.keys(E.maps);
  document.getElementById("embedding-view").hidden = false;
  const pick = document.getElementById("matrix");
  names.forEach(function (n) { pick.appendChild(el("option", n)); });
  const map = document.getElementById("map"), ctx = map.getContext("2d");
  let current = names[0], screen = [];
  function draw() {
    const pts = E.maps[current], xs = pts.map(function (p) { return p[0]; }), ys = pts.map(function (p) { return p[1]; });
    const x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    ctx.clearRect(0, 0, map.width, map.height); ctx.font = "11px monospace"; ctx.fillStyle = "#235";
    screen = pts.map(function (p) {
      return [10 + (map.width - 30) * (p[0] - x0) / ((x1 - x0) || 1), map.height - 10 - (map.height - 20) * (p[1] - y0) / ((y1 - y0) || 1)];
    });
    screen.forEach(function (s, i) { ctx.fillText(shown(E.labels[i]).slice(0, 6), s[0], s[1]); });
  }
  function near(i) {
    document.getElementById("picked").textContent = "'" + shown(E.labels[i]) + "' (" + current + "), nearest:";
    document.getElementById("near").textContent = E.neighbours[current][i].map(function (p) {
      return "'" + shown(E.labels[p[0]]) + "' " + p[1].toFixed(3); }).join("\\n");
  }
  map.addEventListener("click", function (e) {
    const r = map.getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
    let best = 0, bestD = Infinity;
    screen.forEach(function (s, i) { const d = (s[0] - x) * (s[0] - x) + (s[1] - y) * (s[1] - y); if (d < bestD) { bestD = d; best = i; } });
    near(best);
  });
  pick.addEventListener("change", function () { current = pick.value; draw(); });
  draw();
}
</script>
</body>
</html>
"""
