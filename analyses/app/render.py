"""Rendering a report: its sections as ``index.md`` and as a self-contained ``index.html``.

:mod:`analyses.app.report` decides what a report holds and writes the folder; this module
only turns it into text. Both pages show the same things in the same order: a header (title,
model, seed, command), the report's summary (:mod:`analyses.app.summary`: the findings with
their numbers and the one figure that shows them, first, so the answer comes before the
method), a table of contents, then per section its own summary (when the report has several
sections), method, source, data, findings, figures and the tables chosen for inline display.

The HTML is self-contained and makes no request to the outside world: CSS is inline, figures
are base64 data URIs, and external links are shown as text rather than followed (see
:func:`markdown_to_html`). Rendering is deterministic, so the same sections give byte-
identical pages.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from analyses.app.summary import report_summary, section_summary

if TYPE_CHECKING:
    from analyses.app.report import Section

__all__ = ["DEFAULT_SHOW_ROWS", "markdown_to_html", "render_html", "render_markdown"]

# Rows shown inline when a section lists a table in show_tables with no explicit limit.
DEFAULT_SHOW_ROWS = 20


# --------------------------------------------------------------------------- formatting


def _fmt_cell(value: Any) -> str:
    """One table cell as text: floats to 4 significant digits, the rest as str."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def _display_frame(df: pd.DataFrame, max_rows: int) -> tuple[pd.DataFrame, bool]:
    """The rows shown inline; the index becomes columns unless it is a plain 0..n-1."""
    shown = df.head(max_rows)
    if not isinstance(df.index, pd.RangeIndex) or df.index.name is not None:
        shown = shown.reset_index()
    return shown, len(df) > max_rows


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return _fmt_cell(v).replace("|", r"\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in df.itertuples(index=False, name=None)]
    return "\n".join([header, rule, *rows])


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False, name=None):
        cells = "".join(
            f'<td class="num">{html.escape(_fmt_cell(v))}</td>'
            if isinstance(v, numbers.Real) and not isinstance(v, bool)
            else f"<td>{html.escape(_fmt_cell(v))}</td>"
            for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_INLINE_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])[*_](?![\s*_])(.+?)(?<![\s*_])[*_](?![\w*])")
_AUTOLINK = re.compile(r"&lt;(https?://[^&\s]+(?:&amp;[^&\s]+)*)&gt;")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:(//)?", re.I)


def _no_scheme(url: str) -> str:
    """``https://arxiv.org/abs/1`` -> ``arxiv.org/abs/1``: readable, copyable, and no
    string in the page that a browser or a checker could take for a remote resource."""
    return _SCHEME.sub("", url)


def _inline(text: str) -> str:
    """Inline Markdown (code, links, bold, italic) to HTML, escaping everything else.

    External links are rendered as text with the address beside it, never as an href:
    the page must make no request to the outside world, even on a click.
    """
    codes: list[str] = []

    def stash(m: re.Match) -> str:
        codes.append(f"<code>{html.escape(m.group(1))}</code>")
        return f"\x00{len(codes) - 1}\x00"

    text = _INLINE_CODE.sub(stash, text)
    text = html.escape(text, quote=False)

    def link(m: re.Match) -> str:
        label, url = m.group(1), m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I) or url.startswith("//"):
            return f'{label} (<span class="url">{_no_scheme(url)}</span>)'
        return f'<a href="{html.escape(url)}">{label}</a>'

    text = _LINK.sub(link, text)
    text = _AUTOLINK.sub(lambda m: f'<span class="url">{_no_scheme(m.group(1))}</span>', text)
    text = _BOLD.sub(r"<strong>\1</strong>", text)
    text = _ITALIC.sub(r"<em>\1</em>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], text)


def markdown_to_html(markdown: str) -> str:
    """The small Markdown subset sections use, as HTML.

    Supported: paragraphs, ``-``/``*`` bullet lists, ``1.`` numbered lists, ``#`` headings
    (shifted below the section heading), fenced code blocks, inline code, links, bold and
    italic. Why not a Markdown library: none is a dependency, and a fixed converter keeps
    the HTML byte-for-byte deterministic across versions.
    """
    out: list[str] = []
    para: list[str] = []
    list_kind: str | None = None
    in_code = False
    code: list[str] = []

    def flush_para() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    def close_list() -> None:
        nonlocal list_kind
        if list_kind:
            out.append(f"</{list_kind}>")
            list_kind = None

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("```"):
            if in_code:
                out.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
                code.clear()
                in_code = False
            else:
                flush_para()
                close_list()
                in_code = True
            continue
        if in_code:
            code.append(raw)
            continue
        stripped = line.strip()
        bullet = re.match(r"^[-*+]\s+(.*)$", stripped)
        number = re.match(r"^\d+[.)]\s+(.*)$", stripped)
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if not stripped:
            flush_para()
            close_list()
        elif heading:
            flush_para()
            close_list()
            level = min(6, len(heading.group(1)) + 3)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif bullet or number:
            flush_para()
            kind = "ul" if bullet else "ol"
            if list_kind != kind:
                close_list()
                out.append(f"<{kind}>")
                list_kind = kind
            item = (bullet or number).group(1)  # type: ignore[union-attr]
            out.append(f"<li>{_inline(item)}</li>")
        elif list_kind and raw.startswith((" ", "\t")) and out[-1].endswith("</li>"):
            # continuation line of a list item
            out[-1] = out[-1][: -len("</li>")] + " " + _inline(stripped) + "</li>"
        else:
            close_list()
            para.append(stripped)
    if in_code:
        out.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
    flush_para()
    close_list()
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.5}
h1{border-bottom:2px solid #444;padding-bottom:.2em}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2.2em}
h3{margin-bottom:.3em}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:90%}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
table{border-collapse:collapse;font-size:85%;margin:.5em 0 1em}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:85%;color:#555}
.url{font-family:monospace;font-size:85%;color:#555;word-break:break-all}
.meta td:first-child{font-weight:bold}
nav ul{columns:2}
"""



# --------------------------------------------------------------------------- the two pages


def _md_summary(heading: str, items: Sequence[str], figure: str | None) -> list[str]:
    """A summary block: its findings as a list, then its figure."""
    lines = [heading, "", *(f"- {item}" for item in items), ""]
    if figure is not None:
        lines += [f"![{figure}](figures/{figure}.png)", ""]
    return lines


def render_markdown(title: str, meta: Sequence[tuple[str, str]],
                    sections: Sequence[Section], notes: Sequence[str] = ()) -> str:
    """``index.md``: the summary, the header rows ``meta`` as a list, then every section in
    order. ``notes`` are report-level lines for the summary (sections skipped and why)."""
    lines = [f"# {title}", ""]
    lines += _md_summary("## Summary", *report_summary(sections, notes))
    for key, value in meta:
        lines.append(f"- **{key}:** `{value}`")
    lines += ["", "Versions, platform, full model config and timings: `run.json`.", ""]
    if len(sections) > 1:
        lines += ["## Contents", ""]
        lines += [f"- [{s.title}](#{s.key})" for s in sections]
        lines.append("")
    for s in sections:
        lines += [f'<a id="{s.key}"></a>', "", f"## {s.title}", ""]
        if len(sections) > 1:  # a lone section's summary is the report's, just above
            lines += _md_summary("### Summary", *section_summary(s))
        for heading, body in (("Method", s.method), ("Source", s.source), ("Data", s.data)):
            lines += [f"### {heading}", "", body.strip() or "_not stated_", ""]
        lines += ["### Findings", ""]
        lines += [f"- {f}" for f in s.findings] or ["_no findings recorded_"]
        lines.append("")
        if s.figures:
            lines += ["### Figures", ""]
            for name in s.figures:
                lines += [f"![{name}](figures/{name}.png)", ""]
        if s.files:
            lines += ["### Interactive", ""]
            lines += [f"- [{name}]({name}): opens in a browser, offline" for name in s.files]
            lines.append("")
        if s.tables:
            lines += ["### Tables", ""]
            for name, df in s.tables.items():
                lines.append(f"**{name}** ({len(df)} rows): [data/{name}.csv](data/{name}.csv)")
                lines.append("")
                if name in s.show_tables:
                    shown, cut = _display_frame(df, s.show_tables[name] or DEFAULT_SHOW_ROWS)
                    lines += [_md_table(shown), ""]
                    if cut:
                        lines += [f"_first {len(shown)} of {len(df)} rows_", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_html(title: str, meta: Sequence[tuple[str, str]], sections: Sequence[Section],
                pngs: dict[str, bytes], notes: Sequence[str] = ()) -> str:
    """``index.html``: the same content as :func:`render_markdown`, with each figure's PNG
    bytes (``pngs``, by figure name) inlined so the file stands alone.

    A figure is inlined once, where it first appears (usually a summary); later places link
    to it, so the page does not carry the same image twice.
    """
    e = html.escape
    shown: set[str] = set()

    def figure(name: str) -> str:
        if name in shown:
            return (f'<p><a href="#fig-{e(name)}">{e(name)}</a> (figures/{e(name)}.png), '
                    "shown above</p>")
        shown.add(name)
        return _html_figure(name, pngs[name])

    def summary(tag: str, items: Sequence[str], fig: str | None) -> list[str]:
        out = [f'<{tag} class="summary">Summary</{tag}>',
               "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>"]
        return out + ([figure(fig)] if fig is not None else [])

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        *summary("h2", *report_summary(sections, notes)),
        '<table class="meta">',
        *(f"<tr><td>{e(k)}</td><td><code>{e(v)}</code></td></tr>" for k, v in meta),
        "</table>",
        "<p>Versions, platform, full model config and timings: <code>run.json</code>.</p>",
    ]
    if len(sections) > 1:
        parts.append("<nav><h2>Contents</h2><ul>")
        parts += [f'<li><a href="#{e(s.key)}">{e(s.title)}</a></li>' for s in sections]
        parts.append("</ul></nav>")
    for s in sections:
        parts.append(f'<section id="{e(s.key)}"><h2>{e(s.title)}</h2>')
        if len(sections) > 1:
            parts += summary("h3", *section_summary(s))
        for heading, body in (("Method", s.method), ("Source", s.source), ("Data", s.data)):
            parts.append(f"<h3>{heading}</h3>")
            parts.append(markdown_to_html(body.strip()) or "<p><em>not stated</em></p>")
        parts.append("<h3>Findings</h3>")
        if s.findings:
            parts.append("<ul>" + "".join(f"<li>{_inline(f)}</li>" for f in s.findings)
                         + "</ul>")
        else:
            parts.append("<p><em>no findings recorded</em></p>")
        if s.figures:
            parts.append("<h3>Figures</h3>")
            parts += [figure(name) for name in s.figures]
        if s.files:
            parts.append("<h3>Interactive</h3><ul>")
            parts += [f'<li><a href="{e(name)}">{e(name)}</a>: opens in a browser, offline</li>'
                      for name in s.files]
            parts.append("</ul>")
        if s.tables:
            parts.append("<h3>Tables</h3>")
            for name, df in s.tables.items():
                parts += _html_table_block(name, df, s.show_tables)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_figure(name: str, png: bytes) -> str:
    """One figure, its PNG inlined as a data URI, captioned with the file it also went to."""
    e = html.escape
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="fig-{e(name)}"><img alt="{e(name)}" '
        f'src="data:image/png;base64,{data}">'
        f"<figcaption>{e(name)} (figures/{e(name)}.png)</figcaption></figure>"
    )


def _html_table_block(name: str, df: pd.DataFrame, show_tables: dict[str, int]) -> list[str]:
    """A table's link to its CSV and, when the section shows it inline, its first rows."""
    e = html.escape
    parts = [
        f"<p><strong>{e(name)}</strong> ({len(df)} rows): "
        f'<a href="data/{e(name)}.csv">data/{e(name)}.csv</a></p>'
    ]
    if name in show_tables:
        shown, cut = _display_frame(df, show_tables[name] or DEFAULT_SHOW_ROWS)
        parts.append(_html_table(shown))
        if cut:
            parts.append(f"<p><em>first {len(shown)} of {len(df)} rows</em></p>")
    return parts
