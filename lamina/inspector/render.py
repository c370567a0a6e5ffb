"""The picture of an image's layer stack: a standalone SVG, and an HTML page around it.

Both are self-contained (inline CSS and SVG, no script, no font or image to fetch), so the file
opens in any browser straight from disk and can be mailed or attached to a bug report.

The stack is drawn as a union filesystem is explained on a whiteboard: the base layer at the
bottom, each layer a band on top of the one it changes, and the container's writable layer on top
of them all (empty for an image: it is what ``lamina run`` adds). A band's height grows with the
logarithm of its bytes, so a 1 KiB COPY layer stays readable under a 100 MiB base layer. A layer
that deletes files carries a red whiteout mark with the deleted paths; a layer with opaque
directories says so.
"""

from __future__ import annotations

import math
from html import escape as _html_escape

from lamina.inspector.analysis import LayerReport, StackAnalysis

WIDTH = 960
MARGIN = 16
MIN_BAND = 46           # px: room for two lines of text even for an empty layer
BAND_PER_DECADE = 14    # px added per factor of 10 in bytes
GAP = 4
CONTAINER_BAND = 40
MAX_LISTED = 3          # whiteout paths named in a band before "and N more"


def printable(text: str) -> str:
    """Text safe for a terminal, HTML and XML alike.

    File names in a layer are bytes: undecodable ones arrive as surrogate escapes, and a name may
    hold control characters (even a newline). Both are shown as ``\\xNN``, so a hostile layer can
    neither break the page's XML nor move a terminal's cursor.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:          # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def escape(text: str) -> str:
    return _html_escape(printable(text))


def human_size(n: int) -> str:
    """Bytes as docker prints them: 0 B, 512 B, 1.5 kB ... (powers of 1000)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def percent(fraction: float) -> str:
    """An efficiency as a percentage that never rounds a loss up to 100%."""
    text = f"{fraction * 100:.1f}%"
    return "99.9%" if text == "100.0%" and fraction < 1 else text


def band_height(size: int) -> int:
    return MIN_BAND + round(BAND_PER_DECADE * math.log10(1 + size))


def _fill(index: int, count: int) -> str:
    # Cool (base) to warm (recent), so the eye reads time upwards.
    hue = 210 - (170 * index / max(1, count - 1))
    return f"hsl({hue:.0f}, 55%, 78%)"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _digest_short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _layer_band(layer: LayerReport, count: int, y: int, height: int) -> str:
    number = layer.index + 1
    title = f"layer {number}: {layer.instruction or '(no history)'}"
    counts = f"+{layer.added} added  ~{layer.changed} changed  -{layer.deleted} deleted"
    waste = f"  ·  {human_size(layer.wasted)} wasted" if layer.wasted else ""
    parts = [
        f'<g class="band layer" data-layer="{number}" data-size="{layer.size}" '
        f'data-added="{layer.added}" data-changed="{layer.changed}" data-deleted="{layer.deleted}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{MARGIN}" y="{y}" width="{WIDTH - 2 * MARGIN}" height="{height}" rx="4" '
        f'fill="{_fill(layer.index, count)}" stroke="#445" stroke-width="1"/>',
        f'<text x="{MARGIN + 10}" y="{y + 20}" class="title">{number}  '
        f"{escape(_short(layer.instruction or '(no history)', 78))}</text>",
        f'<text x="{WIDTH - MARGIN - 10}" y="{y + 20}" class="size" text-anchor="end">'
        f"{escape(human_size(layer.size))}</text>",
        f'<text x="{MARGIN + 10}" y="{y + height - 9}" class="meta">{escape(counts + waste)}  ·  '
        f"{escape(_digest_short(layer.digest))}</text>",
    ]
    marks = []
    if layer.whiteouts:
        # A red edge, so a deleting layer stands out even when its text is too long to read.
        parts.insert(3, f'<rect class="whiteout-edge" x="{MARGIN}" y="{y}" width="7" height="{height}" '
                        f'fill="#c00"/>')
        listed = ", ".join(layer.whiteouts[:MAX_LISTED])
        more = f" and {len(layer.whiteouts) - MAX_LISTED} more" if len(layer.whiteouts) > MAX_LISTED else ""
        marks.append(f'<tspan class="whiteout">✕ whiteout: {escape(_short(listed, 60) + more)}</tspan>')
    if layer.opaque_dirs:
        marks.append(f'<tspan class="opaque">▣ opaque: {escape(_short(", ".join(layer.opaque_dirs), 40))}</tspan>')
    if marks:
        parts.append(f'<text x="{WIDTH - MARGIN - 10}" y="{y + height - 9}" text-anchor="end" class="marks">'
                     + "  ".join(marks) + "</text>")
    parts.append("</g>")
    return "\n".join(parts)


def _container_band(container: LayerReport | None, y: int, height: int) -> str:
    base = (f'<g class="band container-layer"><title>container layer: the writable upper directory a '
            f'container adds</title><rect x="{MARGIN}" y="{y}" width="{WIDTH - 2 * MARGIN}" '
            f'height="{height}" rx="4" fill="#ffffff" stroke="#667" stroke-dasharray="6 4"/>')
    if container is None:
        return (base + f'<text x="{MARGIN + 10}" y="{y + 25}" class="title">container layer (upperdir, '
                f"read-write; empty until a container writes: copy-up lands here)</text></g>")
    counts = f"+{container.added} added  ~{container.changed} changed  -{container.deleted} deleted"
    base = base.replace('<g class="band container-layer">',
                        f'<g class="band container-layer" data-layer="{container.index + 1}">')
    parts = [base,
             f'<text x="{MARGIN + 10}" y="{y + 20}" class="title">'
             f"{escape(_short(container.instruction, 80))}</text>",
             f'<text x="{WIDTH - MARGIN - 10}" y="{y + 20}" class="size" text-anchor="end">'
             f"{escape(human_size(container.size))}</text>",
             f'<text x="{MARGIN + 10}" y="{y + height - 9}" class="meta">{escape(counts)}</text>']
    if container.whiteouts:
        listed = ", ".join(container.whiteouts[:MAX_LISTED])
        more = f" and {len(container.whiteouts) - MAX_LISTED} more" if len(container.whiteouts) > MAX_LISTED else ""
        parts.append(f'<text x="{WIDTH - MARGIN - 10}" y="{y + height - 9}" text-anchor="end" class="marks">'
                     f'<tspan class="whiteout">✕ whiteout: {escape(_short(listed, 60) + more)}</tspan></text>')
    parts.append("</g>")
    return "".join(parts)


def render_svg(analysis: StackAnalysis, title: str = "") -> str:
    """A standalone SVG of the stack; one ``<g class="band layer">`` per image layer, bottom drawn
    last, under one ``<g class="band container-layer">`` (the container's, or an empty one)."""
    layers = analysis.image_layers
    container = analysis.container_layer
    heights = [band_height(layer.size) for layer in layers]
    container_height = band_height(container.size) if container is not None else CONTAINER_BAND
    header = 54
    footer = 30
    total_height = header + container_height + GAP + sum(h + GAP for h in heights) + footer
    count = len(layers)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total_height}" '
        f'viewBox="0 0 {WIDTH} {total_height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
        f'role="img" aria-label="{escape(title or "image layers")}">',
        "<style>.title{font-size:14px;font-weight:bold;fill:#112}.size{font-size:14px;fill:#112}"
        ".meta{font-size:11px;fill:#334}.marks{font-size:11px}.whiteout{fill:#b00;font-weight:bold}"
        ".opaque{fill:#505;font-weight:bold}.caption{font-size:12px;fill:#333}"
        ".heading{font-size:16px;font-weight:bold;fill:#111}</style>",
        f'<rect width="{WIDTH}" height="{total_height}" fill="#fbfbf8"/>',
        f'<text x="{MARGIN}" y="24" class="heading">{escape(title or "image layers")}</text>',
        f'<text x="{MARGIN}" y="44" class="caption">{count} image layer{"" if count == 1 else "s"}'
        f'{" + the container layer" if container is not None else ""}, '
        f"{escape(human_size(analysis.total_bytes))} in layers, "
        f"{escape(human_size(analysis.wasted_bytes))} wasted, efficiency "
        f"{percent(analysis.efficiency)}  (top = newest; band height ~ log of bytes)</text>",
    ]
    y = header
    out.append(_container_band(container, y, container_height))
    y += container_height + GAP
    for layer, height in zip(reversed(layers), reversed(heights), strict=True):
        out.append(_layer_band(layer, count, y, height))
        y += height + GAP
    out.append(f'<text x="{MARGIN}" y="{y + 18}" class="caption">image layers are lowerdirs '
               f"(read-only), stacked bottom to top; the merged view shows the topmost copy of each "
               f"path</text>")
    out.append("</svg>")
    return "\n".join(out)


PAGE_CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;margin:24px;background:#f4f4ef;color:#111}
h1{font-size:20px;margin:0 0 12px}
table{border-collapse:collapse;margin-top:18px;font-size:13px;background:#fff}
th,td{border:1px solid #ccd;padding:4px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px}
.whiteouts{color:#b00}
"""


def layer_table_html(analysis: StackAnalysis) -> str:
    """Every layer's figures as an HTML table, newest first; rows carry ``data-layer`` (1-based)."""
    rows = []
    for layer in reversed(analysis.layers):
        number = "C" if layer is analysis.container_layer else str(layer.index + 1)
        deleted = "<br>".join(escape(p) for p in layer.whiteouts[:20])
        if len(layer.whiteouts) > 20:
            deleted += f"<br>… {len(layer.whiteouts) - 20} more"
        rows.append(
            f'<tr class="layer-row" data-layer="{layer.index + 1}"><td class="num">{number}</td>'
            f"<td><code>{escape(layer.instruction or '(no history)')}</code></td>"
            f'<td class="num">{escape(human_size(layer.size))}</td><td class="num">{layer.added}</td>'
            f'<td class="num">{layer.changed}</td><td class="num">{layer.deleted}</td>'
            f'<td class="num">{escape(human_size(layer.wasted))}</td>'
            f'<td class="whiteouts">{deleted}</td><td><code>{escape(_digest_short(layer.digest))}</code></td></tr>')
    return "\n".join([
        "<table><thead><tr><th>#</th><th>instruction</th><th>size</th><th>added</th><th>changed</th>"
        "<th>deleted</th><th>wasted</th><th>whiteouts</th><th>diff id</th></tr></thead><tbody>",
        *rows,
        "</tbody></table>",
    ])


def render_html(analysis: StackAnalysis, title: str) -> str:
    """A self-contained page: the SVG stack, then a table with every layer's figures."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)} — lamina layers</title>",
        f"<style>{PAGE_CSS}</style></head><body>",
        render_svg(analysis, title),
        layer_table_html(analysis),
        f"<p>Efficiency {percent(analysis.efficiency)} ({escape(human_size(analysis.wasted_bytes))} of "
        f"{escape(human_size(analysis.total_bytes))} in layers is hidden by later layers).</p>",
        "</body></html>",
    ])
