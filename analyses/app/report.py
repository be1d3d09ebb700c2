"""The report writer: one folder per run, readable offline, reproducible, never half-written.

Layout of a report folder::

    index.md          every section: method, source, data, findings, figures, tables
    index.html        the same, self-contained (inline CSS, PNGs as base64 data URIs)
    figures/*.png     one per figure (+ *.svg with svg=True)
    data/*.csv        every table, in full (the figures can be redrawn from these)
    run.json          versions, platform, model source and config, seed, command, timings

Why this shape: a report is evidence. The CSVs let anyone recompute a number, run.json
says exactly what produced them, and the HTML opens from an e-mail attachment or an air-
gapped machine (no external URL anywhere, so nothing can fail to load or leak a request).

Atomicity: :meth:`Report.write` builds everything in a hidden temporary folder next to
the target and renames it into place at the end, so an interrupted or failing run
(Ctrl-C, a plotting error, a full disk) leaves either the previous report or nothing.

Determinism: the same sections give byte-identical ``index.md``, ``index.html``, CSVs and
PNGs; only ``run.json`` carries the date and timings.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.metadata
import json
import math
import numbers
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["Report", "ReportError", "Section", "markdown_to_html"]

# Distributions whose versions go into run.json (interp is this package).
VERSIONED_PACKAGES = (
    "interp", "torch", "transformers", "transformer_lens", "pandas", "numpy",
    "matplotlib", "seaborn", "click",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Rows shown inline when a section lists a table in show_tables with no explicit limit.
DEFAULT_SHOW_ROWS = 20


class ReportError(ValueError):
    """A report cannot be written as asked (existing folder, bad names, unwritable place).

    The message is one line, meant to be shown to a user as is.
    """


@dataclass
class Section:
    """One analysis' contribution to a report.

    ``key`` names the section's anchor (``#heads``) and should prefix its table and
    figure names. ``tables`` maps a full file stem to a frame (``"heads"`` ->
    ``data/heads.csv``); ``figures`` likewise (``figures/<name>.png``). ``show_tables``
    picks tables to render inline and the maximum rows to show (the CSV is always
    complete). ``method``, ``source`` and ``data`` are Markdown; ``source`` carries full
    citations, ``data`` the corpus and its licence (UD EWT is CC BY-SA 4.0).
    """

    key: str
    title: str
    method: str
    source: str
    data: str
    findings: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    show_tables: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ReportError(
            f"{kind} name {name!r} is not a safe file stem (letters, digits, '_', '-', '.')"
        )


def _json_safe(value: Any) -> Any:
    """Configs hold tuples, dtypes, paths, nested dataclasses: make them JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _version(dist: str) -> str | None:
    for name in (dist, dist.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


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


# --------------------------------------------------------------------------- the report


class Report:
    """Collects sections and writes them as one report folder (see module docstring).

    ``model_source`` is what the user named (``"minilm"``, a path); ``model_config`` the
    resolved config (e.g. ``dataclasses.asdict(model.cfg)``); ``command`` the command
    line that reproduces the run; ``extra`` any further facts for run.json.
    """

    def __init__(
        self,
        title: str,
        *,
        model_source: str,
        model_config: dict,
        seed: int,
        command: list[str] | str,
        extra: dict | None = None,
    ) -> None:
        self.title = title
        self.model_source = model_source
        self.model_config = dict(model_config)
        self.seed = seed
        self.command = command
        self.extra = dict(extra or {})
        self.sections: list[Section] = []

    def add(self, section: Section) -> None:
        """Append a section, checking its names now rather than at write time."""
        if any(s.key == section.key for s in self.sections):
            raise ReportError(f"two sections share the key {section.key!r}")
        _check_name("section", section.key)
        for kind, names in (("table", section.tables), ("figure", section.figures)):
            taken = {n for s in self.sections for n in getattr(s, kind + "s")}
            for name in names:
                _check_name(kind, name)
                if name in taken:
                    raise ReportError(f"{kind} name {name!r} is used by two sections")
        unknown = sorted(set(section.show_tables) - set(section.tables))
        if unknown:
            raise ReportError(
                f"section {section.key!r} shows table(s) {unknown} it does not have"
            )
        self.sections.append(section)

    @property
    def command_line(self) -> str:
        if isinstance(self.command, str):
            return self.command
        return shlex.join(str(c) for c in self.command)

    # ----------------------------------------------------------------- write

    def write(self, out_dir: Path | str, *, force: bool = False, svg: bool = False) -> Path:
        """Write the report folder atomically and return its path.

        Refuses an existing ``out_dir`` unless ``force``, in which case the old folder is
        replaced only once the new one is complete. Figures are closed after saving.
        """
        out_dir = Path(out_dir).expanduser().absolute()
        if out_dir.exists() and not force:
            raise ReportError(f"{out_dir} already exists; use --force to replace it")
        if out_dir.exists() and not out_dir.is_dir():
            raise ReportError(f"{out_dir} exists and is not a folder")
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        except OSError as e:
            raise ReportError(
                f"cannot write to {out_dir.parent}: {e.strerror or e}"
            ) from e
        try:
            self._write_into(tmp, svg=svg)
            self._swap_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._close_figures()
            raise
        return out_dir

    def _close_figures(self) -> None:
        import matplotlib.pyplot as plt

        for section in self.sections:
            for fig in section.figures.values():
                plt.close(fig)

    @staticmethod
    def _swap_into_place(tmp: Path, out_dir: Path) -> None:
        # mkdtemp makes 0700 folders; a report is meant to be shared like any output.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)  # put the previous report back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)

    def _write_into(self, root: Path, *, svg: bool) -> None:
        from analyses.app.plots import save_figure

        (root / "figures").mkdir()
        (root / "data").mkdir()
        pngs: dict[str, bytes] = {}
        for section in self.sections:
            for name, df in section.tables.items():
                keep_index = not isinstance(df.index, pd.RangeIndex) or df.index.name is not None
                df.to_csv(root / "data" / f"{name}.csv", index=keep_index, lineterminator="\n")
            for name, fig in section.figures.items():
                save_figure(fig, root / "figures" / name, svg=svg)
                pngs[name] = (root / "figures" / f"{name}.png").read_bytes()
        (root / "index.md").write_text(self._markdown(), encoding="utf-8")
        (root / "index.html").write_text(self._html(pngs), encoding="utf-8")
        (root / "run.json").write_text(
            json.dumps(self.run_info(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    def run_info(self) -> dict:
        """Everything needed to reproduce the run (what goes into run.json)."""
        return _json_safe({
            "title": self.title,
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.command_line,
            "argv": self.command if isinstance(self.command, list) else shlex.split(self.command),
            "seed": self.seed,
            "model": {"source": self.model_source, "config": self.model_config},
            "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "sections": [s.key for s in self.sections],
            "timings": {s.key: dict(s.timings) for s in self.sections},
            "tables": {name: {"rows": len(df), "columns": [str(c) for c in df.columns]}
                       for s in self.sections for name, df in s.tables.items()},
            "extra": self.extra,
        })

    # ----------------------------------------------------------------- markdown

    def _meta_rows(self) -> list[tuple[str, str]]:
        return [
            ("model", self.model_source),
            ("seed", str(self.seed)),
            ("command", self.command_line),
        ]

    def _markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for key, value in self._meta_rows():
            lines.append(f"- **{key}:** `{value}`")
        lines += ["", "Versions, platform, full model config and timings: `run.json`.", ""]
        if len(self.sections) > 1:
            lines += ["## Contents", ""]
            lines += [f"- [{s.title}](#{s.key})" for s in self.sections]
            lines.append("")
        for s in self.sections:
            lines += [f'<a id="{s.key}"></a>', "", f"## {s.title}", ""]
            for heading, body in (("Method", s.method), ("Source", s.source), ("Data", s.data)):
                lines += [f"### {heading}", "", body.strip() or "_not stated_", ""]
            lines += ["### Findings", ""]
            lines += [f"- {f}" for f in s.findings] or ["_no findings recorded_"]
            lines.append("")
            if s.figures:
                lines += ["### Figures", ""]
                for name in s.figures:
                    lines += [f"![{name}](figures/{name}.png)", ""]
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

    # ----------------------------------------------------------------- html

    def _html(self, pngs: dict[str, bytes]) -> str:
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
            '<table class="meta">',
            *(f"<tr><td>{e(k)}</td><td><code>{e(v)}</code></td></tr>"
              for k, v in self._meta_rows()),
            "</table>",
            "<p>Versions, platform, full model config and timings: <code>run.json</code>.</p>",
        ]
        if len(self.sections) > 1:
            parts.append("<nav><h2>Contents</h2><ul>")
            parts += [f'<li><a href="#{e(s.key)}">{e(s.title)}</a></li>' for s in self.sections]
            parts.append("</ul></nav>")
        for s in self.sections:
            parts.append(f'<section id="{e(s.key)}"><h2>{e(s.title)}</h2>')
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
                for name in s.figures:
                    data = base64.b64encode(pngs[name]).decode("ascii")
                    parts.append(
                        f'<figure id="fig-{e(name)}"><img alt="{e(name)}" '
                        f'src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(name)} (figures/{e(name)}.png)</figcaption></figure>"
                    )
            if s.tables:
                parts.append("<h3>Tables</h3>")
                for name, df in s.tables.items():
                    parts.append(
                        f"<p><strong>{e(name)}</strong> ({len(df)} rows): "
                        f'<a href="data/{e(name)}.csv">data/{e(name)}.csv</a></p>'
                    )
                    if name in s.show_tables:
                        shown, cut = _display_frame(df, s.show_tables[name] or DEFAULT_SHOW_ROWS)
                        parts.append(_html_table(shown))
                        if cut:
                            parts.append(f"<p><em>first {len(shown)} of {len(df)} rows</em></p>")
            parts.append("</section>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"
