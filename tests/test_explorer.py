"""The attention explorer without a browser: data, size, errors, report plumbing.

What the page shows in a real browser (clicks, hovers, no request) is
tests/test_explorer_browser.py; here the page's data is decoded the way its script decodes
it and compared with the cache, the size targets are checked on patterns of the two sizes the
issue names, and every bad input is one line that names the fix.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import interp
from analyses.app.cli import cli
from analyses.app.report import Report, ReportError, Section
from interp.errors import InterpError
from interp.viz.attention import AttentionView, Doc, quantise


def tiny(architecture: str = "decoder", n_layers: int = 2, n_heads: int = 3):
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=n_layers, d_model=36, n_heads=n_heads, d_vocab=60,
                             n_ctx=32, architecture=architecture)
    return interp.HookedTransformer(cfg).eval()


def pattern_cache(model, tokens: torch.Tensor):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))[1]


def page_data(page: str) -> dict:
    """The JSON block the page's script reads."""
    m = re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', page,
                  re.S)
    assert m
    return json.loads(m.group(1))


def decode(text: dict, n_layers: int, n_heads: int) -> np.ndarray:
    """[layer, head, q, k] weights from one text of the payload, read as explorer.js reads it."""
    raw = np.frombuffer(base64.b64decode(text["data"]), dtype=np.uint8)
    n = len(text["tokens"])
    if not text["causal"]:
        return raw.reshape(n_layers, n_heads, n, n) / 255.0
    out = np.zeros((n_layers, n_heads, n, n))
    out[..., np.tril(np.ones((n, n), dtype=bool))] = raw.reshape(n_layers, n_heads, -1) / 255.0
    return out


@pytest.mark.parametrize("architecture", ["decoder", "encoder"])
def test_page_holds_the_cache_patterns_within_8_bit_rounding(architecture: str) -> None:
    model = tiny(architecture)
    tokens = torch.randint(0, 60, (2, 7))
    cache = pattern_cache(model, tokens)
    labels = [[f"t{b}_{i}" for i in range(7)] for b in range(2)]
    view = interp.show_attention(cache, labels, layer=1, head=2, titles=["one", "two"])
    data = page_data(view.to_html())
    assert [t["title"] for t in data["texts"]] == ["one", "two"]
    assert data["start"] == {"layer": 1, "head": 2}
    for b, text in enumerate(data["texts"]):
        assert text["causal"] is (architecture == "decoder")
        got = decode(text, 2, 3)
        want = np.stack([cache["pattern", li][b].numpy() for li in range(2)])
        assert np.abs(got - want).max() <= 1 / 510 + 1e-6


def test_quantise_keeps_the_lower_triangle_only_when_causal() -> None:
    rng = np.random.default_rng(0)
    full = rng.random((2, 2, 5, 5))
    data, causal = quantise(full)
    assert not causal and len(data) == 2 * 2 * 25
    data, causal = quantise(np.tril(full))
    assert causal and len(data) == 2 * 2 * 15


def test_page_is_self_contained_and_says_what_it_shows() -> None:
    model = tiny()
    view = interp.show_attention(pattern_cache(model, torch.arange(6)[None]), list("abcdef"),
                                 model="tiny-model")
    page = view.to_html()
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    assert refs == ["data:,"]  # the empty favicon: nothing else is loaded
    assert "default-src 'none'" in page  # the browser itself refuses any request
    for call in ("fetch(", "XMLHttpRequest", "import(", "WebSocket", "@import", "url("):
        assert call not in page
    assert "tiny-model" in page and "colour-blind" in page and "8 bits" in page
    iframe = view._repr_html_()
    assert iframe.startswith("<iframe srcdoc=") and "&lt;script" in iframe


def test_labels_from_the_taxonomy_frame_give_label_confidence_and_top_scores() -> None:
    import pandas as pd

    model = tiny()
    heads = pd.DataFrame({"layer": [0, 1], "head": [1, 2], "label": ["previous-token", "sink"],
                          "confidence": [0.91, 0.5], "prev_token": [0.8, 0.1],
                          "sink": [0.05, 0.7], "induction": [np.nan, 0.2]})
    view = interp.show_attention(pattern_cache(model, torch.arange(6)[None]), list("abcdef"),
                                 labels=heads)
    data = page_data(view.to_html())
    assert data["heads"]["0,1"] == {"label": "previous-token", "confidence": 0.91,
                                   "scores": [["prev_token", 0.8], ["sink", 0.05]]}
    assert data["heads"]["1,2"]["scores"][0] == ["sink", 0.7]


def test_save_writes_the_page(tmp_path: Path) -> None:
    model = tiny()
    view = interp.show_attention(pattern_cache(model, torch.arange(5)[None]), list("abcde"))
    path = view.save(tmp_path / "x.html")
    assert path.read_text(encoding="utf-8") == view.to_html()
    with pytest.raises(InterpError, match="is a folder"):
        view.save(tmp_path)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"layer": 2}, "layer 2 is out of range: the patterns cover layers 0-1"),
    ({"layer": 0, "head": 3}, "head 3 is out of range: the model has 3 heads"),
    ({"head": 1}, "head= needs layer="),
])
def test_bad_layer_or_head_is_one_line(kwargs: dict, needle: str) -> None:
    cache = pattern_cache(tiny(), torch.arange(5)[None])
    with pytest.raises(InterpError) as e:
        interp.show_attention(cache, list("abcde"), **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cache_without_patterns_and_wrong_labels_name_the_fix() -> None:
    model = tiny()
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.arange(5)[None],
                                        names_filter=lambda n: n.endswith("hook_z"))
    with pytest.raises(InterpError, match="no attention patterns; run model.run_with_cache"):
        interp.show_attention(cache, list("abcde"))
    cache = pattern_cache(model, torch.arange(5)[None])
    with pytest.raises(InterpError, match="4 token labels but the cache has 5 positions"):
        interp.show_attention(cache, list("abcd"))
    with pytest.raises(InterpError, match="not a string"):
        interp.show_attention(cache, "abcde")


def _softmax_patterns(rng, layers: int, heads: int, n: int, causal: bool) -> np.ndarray:
    scores = rng.normal(0, 2, (layers, heads, n, n))
    if causal:
        scores = np.where(np.tril(np.ones((n, n), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize(("layers", "heads", "texts", "n", "causal", "limit_mb"), [
    (6, 12, 10, 24, False, 1.0),  # MiniLM-sized encoder on 10 sentences
    (30, 9, 3, 64, True, 4.0),    # SmolLM2-sized decoder on 3 texts of 64 tokens
])
def test_page_size_targets(layers: int, heads: int, texts: int, n: int, causal: bool,
                           limit_mb: float) -> None:
    rng = np.random.default_rng(0)
    docs = [Doc(f"text {i}", [f"w{j}" for j in range(n)],
                _softmax_patterns(rng, layers, heads, n, causal), list(range(layers)))
            for i in range(texts)]
    size = len(AttentionView(docs).to_html().encode())
    assert size < limit_mb * 1e6, size


def test_report_writes_and_links_extra_pages(tmp_path: Path) -> None:
    def section(files: dict[str, str]) -> Section:
        return Section(key="s", title="S", method="m", source="s", data="d", files=files)

    report = Report("t", model_source="m", model_config={}, seed=0, command="interp x")
    report.add(section({"explorer.html": "<p>page</p>"}))
    out = report.write(tmp_path / "rep")
    assert (out / "explorer.html").read_text() == "<p>page</p>"
    assert '<a href="explorer.html">explorer.html</a>' in (out / "index.html").read_text()
    assert "[explorer.html](explorer.html)" in (out / "index.md").read_text()
    with pytest.raises(ReportError, match="taken"):
        Report("t", model_source="m", model_config={}, seed=0,
               command="x").add(section({"index.html": ""}))


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"n_layers": 2, "d_model": 32, "n_heads": 2, "d_vocab": 300,
                               "n_ctx": 32}))
    _one_line_error(_invoke("explore", cfg, "--text", "hi", "--layer", "5", "--out",
                            tmp_path / "a"), "layer 5 is out of range")
    _one_line_error(_invoke("explore", cfg, "--text", "hi", "--out", tmp_path / "b"),
                    "has no tokenizer")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_heads_report_of_a_model_without_tokenizer_explores_random_tokens(
        tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"n_layers": 2, "d_model": 32, "n_heads": 2, "d_vocab": 300,
                               "n_ctx": 64}))
    result = _invoke("heads", cfg, "--n-random", "2", "--out", tmp_path / "r", "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    data = page_data((tmp_path / "r" / "explorer.html").read_text())
    assert data["texts"][0]["title"].startswith("repeated random tokens")
    assert len(data["heads"]) == 4  # every head labelled by the report's taxonomy
    assert "explorer.html" in (tmp_path / "r" / "index.md").read_text()



def test_heads_report_of_a_word_list_model_explores_random_tokens(tmp_path: Path) -> None:
    """The shipped induction model's tokenizer is a 65-word list that cannot read the sample
    text: the report still carries an explorer (random tokens), saying why."""
    model = Path(__file__).resolve().parent.parent / "interp" / "data" / "induction.pt"
    result = _invoke("heads", model, "--n-random", "2", "--out", tmp_path / "r", "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    page = (tmp_path / "r" / "explorer.html").read_text()
    data = page_data(page)
    assert data["texts"][0]["title"].startswith("repeated random tokens")
    assert "cannot be read by this model" in page
    assert "No attention explorer" not in (tmp_path / "r" / "index.md").read_text()

@pytest.mark.slow
def test_interp_explore_on_minilm_end_to_end(tmp_path: Path) -> None:
    """The command on the packaged MiniLM: a text past its 512-token context is refused in
    one line; two texts give a report whose page holds the model's own patterns and the
    taxonomy's label for every head."""
    long_text = "word " * 600
    _one_line_error(_invoke("explore", "minilm", "--text", long_text, "--out", tmp_path / "x"),
                    "longer than the model's context of 512; shorten it or pass --max-tokens")
    texts = ["The cat sat on the mat.", "The keys to the cabinet are on the table."]
    result = _invoke("explore", "minilm", "--text", texts[0], "--text", texts[1],
                     "--n-random", "2", "--layer", "1", "--head", "8", "--out", tmp_path / "r",
                     "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    data = page_data((tmp_path / "r" / "explorer.html").read_text(encoding="utf-8"))
    assert data["model"] == "minilm" and data["start"] == {"layer": 1, "head": 8}
    assert len(data["heads"]) == 72 and (tmp_path / "r" / "data" / "explorer_heads.csv").exists()
    model = interp.load_pretrained("minilm").eval()
    for text, page_text in zip(texts, data["texts"], strict=True):
        assert page_text["tokens"] == model.to_str_tokens(text)
        _, cache = model.run_with_cache(text, names_filter=lambda n: n.endswith("hook_pattern"))
        want = np.stack([cache["pattern", li][0].detach().numpy() for li in range(6)])
        assert np.abs(decode(page_text, 6, 12) - want).max() <= 1 / 510 + 1e-5
