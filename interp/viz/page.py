"""The explorer's HTML page: one document with its CSS, script and data inline.

Why a Content-Security-Policy: the page promises to make no request. ``default-src 'none'``
makes the browser itself refuse any fetch, image, font or frame from anywhere (only inline
script and style and ``data:`` images are allowed), so a future edit that adds a remote
resource fails loudly in the browser test instead of leaking a request. The script
(``explorer.js`` beside this module) reads the JSON block and draws everything locally.
"""

from __future__ import annotations

import html
import json
from importlib import resources

__all__ = ["render_page"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1em;color:#222;
line-height:1.4}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:.6em 0 .3em}h3{font-size:1em;
margin:.6em 0 .2em}
.note{font-size:85%;color:#444;max-width:70em}
#layout{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
#grid{display:grid;gap:2px;align-items:center}
.axis{font-size:75%;color:#555;text-align:center}
.thumb{padding:0;border:3px solid #bbb;background:#fff;width:42px;height:50px;cursor:pointer;
display:flex;flex-direction:column;align-items:center}
.thumb canvas{width:36px;height:36px;image-rendering:pixelated}
.thumb .abbr{font-size:9px;line-height:10px;color:#222}
.thumb.active{outline:3px solid #D55E00;outline-offset:1px}
.thumb:focus-visible,.tok:focus-visible{outline:3px solid #000;outline-offset:1px}
.chip{display:inline-flex;align-items:center;margin:0 .8em .2em 0;font-size:85%}
.chip i,.swatch{display:inline-block;width:1em;height:1em;margin-right:.3em;border:1px solid #666}
#token-view{position:relative;display:flex;max-height:560px;overflow-y:auto;border:1px solid #ddd;
padding:.3em}
.col{display:flex;flex-direction:column;gap:1px}
.tok{font:13px monospace;white-space:pre;border:1px solid transparent;background:none;
padding:1px 4px;cursor:pointer;display:flex;gap:.5em;justify-content:space-between;min-width:9em}
.tok.q{justify-content:flex-end}.tok .w{color:inherit;font-size:11px;min-width:2.4em}
.tok.chosen{border-color:#D55E00;background:#fbe3d3}
#lines{width:120px;flex:none}
#readout{font:13px monospace;min-height:1.4em}
#text-full{white-space:pre-wrap;font-family:monospace;font-size:90%;background:#f6f6f6;
padding:.3em}
"""

_BODY = """
<header>
<h1>Attention explorer</h1>
<p>Model: <strong id="model"></strong>. Text: <select id="text-select"
aria-label="text to show"></select></p>
<p id="text-full" aria-label="the chosen text"></p>
<p class="note">Grid: one thumbnail per layer (rows) and head (columns), drawn from the chosen
text, its border and shading in the colour of the head's label from interp's head taxonomy
(colour-blind-safe palette, Paul Tol's "muted"; the abbreviation is written under each so colour
is never the only cue). Click a thumbnail (or focus the grid and use the arrow keys) to open
the head. Tokens: hover, click or focus a token on the left to shade the tokens it attends to
(right, blue: darker is more; the weight is written beside each), or a token on the right to
shade the tokens attending to it; Tab and the arrow keys move between tokens. Matrix: rows are
queries, columns keys, viridis colour scale from 0 (dark purple) to 1 (yellow); the chosen row
or column is outlined in orange.</p>
<p id="legend" class="note"></p>
</header>
<div id="layout">
<section aria-labelledby="grid-title"><h2 id="grid-title">Heads: layer &times; head</h2>
<div id="grid" role="group" aria-label="layer by head grid"></div></section>
<section aria-labelledby="head-title"><h2 id="head-title"></h2>
<div id="head-info"></div>
<h3>Tokens</h3>
<p class="note"><span id="dir"></span> <button id="dir-toggle">Reverse direction</button></p>
<div id="token-view"><div id="col-q" class="col" aria-label="queries"></div>
<svg id="lines" aria-hidden="true"></svg><div id="col-k" class="col" aria-label="keys"></div>
</div>
<h3>Pattern</h3>
<canvas id="matrix" aria-label="attention pattern matrix, queries by keys"></canvas>
<p id="readout" aria-live="polite"></p>
</section>
</div>
<footer><h2>Notes</h2><ul id="notes" class="note"></ul></footer>
"""

QUANT_NOTE = ("Weights are stored with 8 bits (round(w * 255): steps of 1/255, at most 0.002 "
              "off) and shown with two decimals; a causal model's pattern keeps only its lower "
              "triangle (the rest is zero).")


def _json_for_script(payload: dict) -> str:
    """JSON that cannot close its <script> element early (``</`` and ``<!--`` escaped)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(payload: dict) -> str:
    """The page for :meth:`interp.viz.attention.AttentionView.payload`'s ``payload``."""
    script = resources.files("interp.viz").joinpath("explorer.js").read_text(encoding="utf-8")
    payload = {**payload, "notes": [QUANT_NOTE, *payload.get("notes", [])]}
    title = html.escape(f"Attention explorer: {payload['model']}")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        _BODY,
        f'<script id="explorer-data" type="application/json">{_json_for_script(payload)}'
        "</script>",
        f"<script>{script}</script>",
        "</body></html>",
    ]) + "\n"
