"""The explorable page: the layer stack as a picture, and each layer's file trees one click away.

One self-contained HTML file (inline CSS, inline script, the data as inline JSON; nothing is
fetched), so it opens from disk, offline, and can be attached to a bug report. Clicking a layer
(its band in the picture or its row in the table) shows two trees side by side: what that layer
changed (A/M/D), and the merged view of the image up to it, which is what a container started
from the image cut at that layer would see. Directories expand on click. Whiteouts, opaque
directories, redirects and copy-ups carry a badge, and a legend says in one sentence what each is.

The stacking rules stay in Python: the page gets, per path, the spans during which each copy is
the visible one and the marks each layer put on it (:func:`trees.layer_spans`), and only filters
them. Names from layers are untrusted: they are made printable before they are embedded, the JSON
cannot close its script element, and the script inserts every name as text, never as HTML.
"""

from __future__ import annotations

import json

from lamina.inspector import trees, waste
from lamina.inspector.analysis import StackAnalysis
from lamina.inspector.render import (
    PAGE_CSS,
    escape,
    human_size,
    layer_table_html,
    percent,
    printable,
    render_svg,
)

_CSS = """
#explorer{display:flex;gap:18px;align-items:flex-start;margin-top:16px}
.pane{flex:1;background:#fff;border:1px solid #ccd;padding:8px 10px;min-width:0}
.pane h2{font-size:15px;margin:0 0 6px}
.tree{font-family:"DejaVu Sans Mono",monospace;font-size:12px;line-height:1.5}
.tree .children{margin-left:16px}
.tree summary{cursor:pointer;list-style:none}
.tree summary::before{content:"▸ ";color:#667}
.tree details[open]>summary::before{content:"▾ "}
.tree .leaf{padding-left:14px}
.mark{display:inline-block;width:14px;font-weight:bold}
.mark-A{color:#070}.mark-M{color:#a60}.mark-D{color:#b00;text-decoration:line-through}
.size{color:#557;margin-left:8px}
.badge{font-size:10px;border-radius:3px;padding:0 4px;margin-left:6px;color:#fff}
.badge-whiteout{background:#b00}.badge-opaque{background:#505}.badge-hidden{background:#c66}
.badge-redirect{background:#06a}.badge-copy-up{background:#a60}
.from{color:#889;margin-left:6px}
#legend p{margin:3px 0;font-size:12px}
g.band{cursor:pointer}
g.band[data-selected] rect{stroke:#000;stroke-width:3}
tr.layer-row{cursor:pointer}
tr.layer-row[data-selected]{background:#ffe9a8}
#selected-layer{font-weight:bold}
"""

# The page's behaviour; every name goes into the DOM as textContent.
_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("lamina-data").textContent);
const EXPLAIN = DATA.explanations;

function humanSize(n) {
  let size = n;
  for (const unit of ["B", "kB", "MB", "GB", "TB"]) {
    if (size < 1000 || unit === "TB") {
      return unit === "B" ? `${Math.trunc(size)} B` : `${Number(size.toPrecision(3))} ${unit}`;
    }
    size /= 1000;
  }
}

function spanAt(record, n) {
  for (const [layer, end, kind, size] of record.s) {
    if (layer <= n && (end < 0 || n < end)) return {layer, kind, size};
  }
  return null;
}

// Entries of layer n's tree: its changes only, or the merged view of layers 0..n.
function entries(n, changesOnly) {
  const out = [];
  for (const record of DATA.paths) {
    const mark = record.m[String(n)];
    if (mark && mark[0] === "D") {
      const gone = n > 0 ? spanAt(record, n - 1) : null;
      out.push({path: record.p, kind: gone ? gone.kind : "file", size: gone ? gone.size : 0,
                change: "D", notes: mark[1], layer: gone ? gone.layer : null});
      continue;
    }
    const shown = spanAt(record, n);
    if (!shown || (changesOnly && shown.layer !== n)) continue;
    if (changesOnly && !(mark && (mark[0] || mark[1].length))) continue;
    out.push({path: record.p, kind: shown.kind, size: shown.size, change: mark ? mark[0] : "",
              notes: mark ? mark[1] : [], layer: shown.layer});
  }
  return out;
}

function buildTree(list) {
  const root = {name: "/", path: "/", kind: "dir", size: 0, change: "", notes: [], children: new Map()};
  const byPath = new Map([["/", root]]);
  // The node of a path, creating the directories above it once each.
  function node(path) {
    let found = byPath.get(path);
    if (!found) {
      const cut = path.lastIndexOf("/");
      const parent = node(cut === 0 ? "/" : path.slice(0, cut));
      found = {name: path.slice(cut + 1), path, kind: "dir", size: 0, change: "", notes: [], children: new Map()};
      parent.children.set(found.name, found);
      byPath.set(path, found);
    }
    return found;
  }
  for (const entry of list) {
    Object.assign(node(entry.path), {kind: entry.kind, size: entry.size, change: entry.change, notes: entry.notes,
                                     layer: entry.layer});
  }
  return root;
}

function total(node) {
  if (node.total === undefined) {
    node.total = node.size;
    for (const child of node.children.values()) {
      if (node.change === "D" || child.change !== "D") node.total += total(child);
    }
  }
  return node.total;
}

function line(node) {
  const span = document.createElement("span");
  span.className = "entry";
  span.dataset.path = node.path;
  const mark = document.createElement("span");
  mark.className = "mark mark-" + (node.change || "none");
  mark.textContent = node.change || " ";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = node.name + (node.kind === "dir" ? "/" : node.kind === "symlink" ? " →" : "");
  const size = document.createElement("span");
  size.className = "size";
  size.textContent = humanSize(total(node));
  span.append(mark, name, size);
  for (const note of node.notes) {
    const key = note.split(" ")[0];
    const badge = document.createElement("span");
    badge.className = "badge badge-" + key;
    badge.textContent = note;
    badge.title = EXPLAIN[key] || "";
    span.append(badge);
  }
  if (node.layer !== null && node.layer !== undefined) {
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = "layer " + DATA.layers[node.layer].label;
    span.append(from);
  }
  return span;
}

// Directories render their children when first opened, so a large image stays quick.
function renderChildren(node, container, openDepth) {
  const names = [...node.children.keys()].sort();
  for (const name of names) {
    const child = node.children.get(name);
    if (child.children.size === 0) {
      const div = document.createElement("div");
      div.className = "leaf";
      div.append(line(child));
      container.append(div);
      continue;
    }
    const details = document.createElement("details");
    details.className = "dir";
    details.dataset.path = child.path;
    const summary = document.createElement("summary");
    summary.append(line(child));
    const inner = document.createElement("div");
    inner.className = "children";
    details.append(summary, inner);
    details.addEventListener("toggle", () => {
      if (details.open && !inner.hasChildNodes()) renderChildren(child, inner, openDepth - 1);
    });
    container.append(details);
    if (openDepth > 0) {  // opened here: rendered now, not in a later toggle task
      renderChildren(child, inner, openDepth - 1);
      details.open = true;
    }
  }
}

function show(paneId, list, openDepth) {
  const pane = document.getElementById(paneId);
  pane.replaceChildren();
  const root = buildTree(list);
  if (root.children.size === 0) {
    pane.textContent = "(nothing)";
    return [];
  }
  renderChildren(root, pane, openDepth);
  return list;
}

function select(n) {
  document.querySelectorAll("[data-layer]").forEach(el => {
    // An attribute, not a class: the bands' and rows' classes stay as the static page has them.
    el.toggleAttribute("data-selected", Number(el.dataset.layer) === n + 1);
  });
  const layer = DATA.layers[n];
  document.getElementById("selected-layer").textContent = `layer ${layer.label}: ${layer.instruction}`;
  document.getElementById("upto").textContent = layer.label;
  const changed = show("changes", entries(n, true), 8);
  const merged = show("merged", entries(n, false), 0);
  const seen = new Set();
  for (const entry of changed.concat(merged)) for (const note of entry.notes) seen.add(note.split(" ")[0]);
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const key of Object.keys(EXPLAIN)) {
    if (!seen.has(key)) continue;
    const p = document.createElement("p");
    const badge = document.createElement("span");
    badge.className = "badge badge-" + key;
    badge.textContent = key;
    p.append(badge, " " + EXPLAIN[key]);
    legend.append(p);
  }
  document.body.dataset.selected = String(n + 1);
}

document.querySelectorAll("g.band[data-layer], tr.layer-row[data-layer]").forEach(el => {
  el.addEventListener("click", () => select(Number(el.dataset.layer) - 1));
});
select(DATA.layers.length - 1);
"""


def _page_data(analysis: StackAnalysis) -> str:
    """The JSON the script reads; safe inside ``<script>`` (no ``</``, no raw U+2028/2029)."""
    records = trees.layer_spans(analysis)
    for record in records:
        record["p"] = printable(record["p"])
        for mark in record["m"].values():
            mark[1] = [printable(note) for note in mark[1]]
    layers = [{"label": "C" if layer is analysis.container_layer else str(layer.index + 1),
               "instruction": printable(layer.instruction or "(no history)")} for layer in analysis.layers]
    text = json.dumps({"layers": layers, "paths": records, "explanations": trees.EXPLANATIONS},
                      ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_explorer(analysis: StackAnalysis, title: str) -> str:
    """The explorable page for ``analysis`` (see the module docstring)."""
    score = waste.dive_score(analysis)
    summary = (f"Efficiency {percent(analysis.efficiency)}: {escape(human_size(analysis.wasted_bytes))} of "
               f"{escape(human_size(analysis.total_bytes))} in layers is hidden by later layers. dive would "
               f"score its efficiency {score.efficiency * 100:.4f}%, with {escape(human_size(score.wasted_bytes))} of potential "
               f"wasted space.")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)} — lamina layers</title>",
        f"<style>{PAGE_CSS}{_CSS}</style></head><body>",
        render_svg(analysis, title),
        f"<p>{summary} Click a layer (its band or its row) to see its changes and the image up to it.</p>",
        '<p>Selected: <span id="selected-layer"></span></p>',
        '<div id="explorer">',
        '<div class="pane"><h2>What this layer changed</h2><div id="changes" class="tree"></div></div>',
        '<div class="pane"><h2>The merged view of layers 1..<span id="upto"></span></h2>'
        '<div id="merged" class="tree"></div></div>',
        "</div>",
        '<div id="legend"></div>',
        '<p class="keys"><span class="mark mark-A">A</span> added '
        '<span class="mark mark-M">M</span> modified <span class="mark mark-D">D</span> deleted; '
        "sizes are bytes of files and symlinks, a directory's size is what is below it.</p>",
        layer_table_html(analysis),
        f'<script type="application/json" id="lamina-data">{_page_data(analysis)}</script>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ])
