"""The attention explorer in a real browser, offline: clicks, hovers, keys, and no request.

Debian's headless Chromium (installed by .ci/run) is driven over the DevTools protocol
(bench/browser.py) with every host name unresolvable and every proxy pointing nowhere.
The test clicks a head in the grid and hovers tokens, then reads the weights the page shows
and compares them with the cache's pattern for that (layer, head, query): two decimals on
screen, 8-bit data behind them, so within 0.005 + 1/510. Only the absence of chromium skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import interp
from bench.browser import CHROMIUM, Browser

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium not installed (apt-get install chromium)")

SHOWN = 0.005 + 1 / 510  # two decimals on screen, one byte per weight in the page


def _cache(architecture: str, tokens: torch.Tensor):
    torch.manual_seed(1)
    cfg = interp.ModelConfig(n_layers=3, d_model=32, n_heads=4, d_vocab=60, n_ctx=32,
                             architecture=architecture)
    model = interp.HookedTransformer(cfg).eval()
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))[1]


def _shown(b: Browser, column: str) -> tuple[list[float], list[float]]:
    """(the weights written beside each token of a column, their data-weight values)."""
    rows = b.eval(f"""Array.from(document.querySelectorAll('#col-{column} .tok')).map(e =>
        [e.querySelector('.w').textContent, e.dataset.weight || ''])""")
    return [float(t) for t, _ in rows], [float(w) for _, w in rows]


@pytest.mark.parametrize("architecture", ["decoder", "encoder"])
def test_click_head_hover_token_shows_the_cache_weights(tmp_path: Path,
                                                        architecture: str) -> None:
    tokens = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = _cache(architecture, tokens)
    labels = [[f"tok{b}_{i}" for i in range(9)] for b in range(2)]
    heads = [{"layer": li, "head": h, "label": ["sink", "previous-token", "induction",
                                                  "syntactic:nsubj"][h], "confidence": 0.5}
             for li in range(3) for h in range(4)]
    page = interp.show_attention(cache, labels, labels=heads, model="tiny <model>",
                                 titles=["first", "second"]).save(tmp_path / "explorer.html")
    with Browser(tmp_path / "profile") as b:
        b.open(page.as_uri())
        b.click("#thumb-2-1")
        assert b.eval("document.getElementById('head-title').textContent") == "Layer 2, head 1"
        assert b.eval("document.querySelector('#thumb-2-1').classList.contains('active')")
        info = b.eval("document.getElementById('head-info').textContent")
        assert "previous-token" in info and "0.50" in info
        want = cache["pattern", 2][0, 1].numpy()  # [q, k]
        b.hover("#tok-q-5")  # query 5: its attention to every key
        text, data = _shown(b, "k")
        assert np.abs(np.array(text) - want[5]).max() <= SHOWN
        assert np.abs(np.array(data) - want[5]).max() <= 1 / 510 + 1e-6
        b.click("#dir-toggle")  # the button reverses it: every query's attention to token 5
        text, _ = _shown(b, "q")
        assert np.abs(np.array(text) - want[:, 5]).max() <= SHOWN
        b.hover("#tok-k-3")  # hovering a key does too: every query's attention to key 3
        text, _ = _shown(b, "q")
        assert np.abs(np.array(text) - want[:, 3]).max() <= SHOWN
        # keyboard: from the focused thumbnail, ArrowUp opens layer 1, ArrowLeft head 0
        b.click("#thumb-2-1")
        b.key("ArrowUp")
        b.key("ArrowLeft")
        assert b.eval("document.activeElement.id") == "thumb-1-0"
        b.hover("#tok-q-7")
        text, _ = _shown(b, "k")
        assert np.abs(np.array(text) - cache["pattern", 1][0, 0, 7].numpy()).max() <= SHOWN
        # the second text, through the selector
        b.eval("(() => { const s = document.getElementById('text-select'); s.value = '1';"
               " s.dispatchEvent(new Event('change')); })()")
        b.hover("#tok-q-4")
        text, _ = _shown(b, "k")
        assert np.abs(np.array(text) - cache["pattern", 1][1, 0, 4].numpy()).max() <= SHOWN
        assert b.eval("document.getElementById('model').textContent") == "tiny <model>"
        assert b.eval("document.querySelectorAll('.thumb').length") == 12
        assert not b.errors(), b.errors()
        requests = b.requests()
        assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests


def test_a_remote_resource_would_be_refused_and_reported(tmp_path: Path) -> None:
    """The checks above can fail: a page that asks for a remote image gets a console error
    from the Content-Security-Policy and the request is logged."""
    cache = _cache("decoder", torch.arange(4)[None])
    html = interp.show_attention(cache, list("abcd")).to_html()
    bad = tmp_path / "bad.html"
    bad.write_text(html.replace("</body>", '<img src="http://example.invalid/x.png"></body>'))
    with Browser(tmp_path / "profile") as b:
        b.open(bad.as_uri())
        b.eval("new Promise(r => setTimeout(r, 300))")
        assert any("Content Security Policy" in e or "Refused" in e for e in b.errors()), \
            json.dumps(b.events)[:2000]
