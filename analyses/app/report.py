"""The report writer: one folder per run, readable offline, reproducible, never half-written.

Layout of a report folder::

    index.md          the summary first, then every section: its summary, method, source,
                      data, findings, figures, tables
    index.html        the same, self-contained (inline CSS, PNGs as base64 data URIs)
    figures/*.png     one per figure (+ *.svg with svg=True)
    data/*.csv        every table, in full (the figures can be redrawn from these)
    run.json          versions, platform, CPU product kernel and threads, model source and
                      config, seed, command, timings

Why this shape: a report is evidence. The CSVs let anyone recompute a number, run.json
says exactly what produced them, and the HTML opens from an e-mail attachment or an air-
gapped machine (no external URL anywhere, so nothing can fail to load or leak a request).

Atomicity: :meth:`Report.write` builds everything in a hidden temporary folder next to
the target and renames it into place at the end, so an interrupted or failing run
(Ctrl-C, SIGTERM, a plotting error, a full disk) leaves either the previous report or
nothing, and removes its temporary folder. The write holds a lock on the target, so two
runs on one folder cannot both write it, and signals wait while folders are renamed; a
SIGKILLed run's temporary folder is removed by the next run on that folder
(:mod:`analyses.app.outdir`).

Determinism: the same sections give byte-identical ``index.md``, ``index.html``, CSVs and
PNGs; only ``run.json`` carries the date and timings.

No machine paths: the header and ``run.json`` show every absolute path in the model source,
the command line and the config as :mod:`analyses.app.paths` does (relative to its package
or the working directory, else its base name), so a report can be shared as it is. Titles
and section text are the caller's: :func:`analyses.app.common.write_report` cleans the
titles it makes. How the pages look is :mod:`analyses.app.render`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
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
import torch
from matplotlib.figure import Figure

from analyses.app.outdir import ReportError, out_lock, pause_point, swap_folders
from analyses.app.paths import scrub_paths, shown_argv, shown_path
from analyses.app.render import markdown_to_html, render_html, render_markdown
from analyses.app.signals import signals_held
from interp.perf import kernels

__all__ = ["Report", "ReportError", "Section", "markdown_to_html"]

# Distributions whose versions go into run.json (interp is this package).
VERSIONED_PACKAGES = (
    "interp", "torch", "transformers", "transformer_lens", "pandas", "numpy",
    "matplotlib", "seaborn", "click",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = frozenset({"index.md", "index.html", "run.json", "figures", "data"})


@dataclass
class Section:
    """One analysis' contribution to a report.

    ``key`` names the section's anchor (``#heads``) and should prefix its table and
    figure names. ``tables`` maps a full file stem to a frame (``"heads"`` ->
    ``data/heads.csv``); ``figures`` likewise (``figures/<name>.png``). ``show_tables``
    picks tables to render inline and the maximum rows to show (the CSV is always
    complete). ``method``, ``source`` and ``data`` are Markdown; ``source`` carries full
    citations, ``data`` the corpus and its licence (UD EWT is CC BY-SA 4.0).

    ``summary`` holds the three to five findings a reader needs first, with their numbers,
    computed from the section's tables; ``summary_figure`` names the one figure (a key of
    ``figures``) that shows them. Both are shown above the method
    (:mod:`analyses.app.summary`).
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
    summary: list[str] = field(default_factory=list)
    summary_figure: str | None = None
    # extra self-contained pages written beside index.html (e.g. "explorer.html" -> its HTML,
    # the attention explorer) and linked from both pages
    files: dict[str, str] = field(default_factory=dict)


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


# --------------------------------------------------------------------------- the report


class Report:
    """Collects sections and writes them as one report folder (see module docstring).

    ``model_source`` is what the user named (``"minilm"``, a path); ``model_config`` the
    resolved config (e.g. ``dataclasses.asdict(model.cfg)``); ``command`` the command
    line that reproduces the run; ``extra`` any further facts for run.json. Absolute paths
    among them are written as :func:`analyses.app.paths.shown_path` shows them.
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
        notes: list[str] | None = None,
    ) -> None:
        self.title = title
        self.model_source = model_source
        self.model_config = dict(model_config)
        self.seed = seed
        self.command = command
        self.extra = dict(extra or {})
        # report-level lines for the summary: sections that did not run, and why
        self.notes = list(notes or [])
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
        for name in section.files:
            _check_name("file", name)
            if name in _RESERVED or any(name in s.files for s in self.sections):
                raise ReportError(f"file name {name!r} is taken; pick another")
        if section.summary_figure is not None and section.summary_figure not in section.figures:
            raise ReportError(f"section {section.key!r} summarises with figure "
                              f"{section.summary_figure!r} it does not have")
        unknown = sorted(set(section.show_tables) - set(section.tables))
        if unknown:
            raise ReportError(
                f"section {section.key!r} shows table(s) {unknown} it does not have"
            )
        self.sections.append(section)

    @property
    def argv(self) -> list[str]:
        """The command as a list of arguments, absolute paths shown without the machine."""
        args = self.command if isinstance(self.command, list) else shlex.split(self.command)
        return shown_argv(args)

    @property
    def command_line(self) -> str:
        """The command as one line; a string command is kept as given unless it has a path
        to hide."""
        if isinstance(self.command, str) and self.argv == shlex.split(self.command):
            return self.command
        return shlex.join(self.argv)

    # ----------------------------------------------------------------- write

    def write(self, out_dir: Path | str, *, force: bool = False, svg: bool = False) -> Path:
        """Write the report folder atomically and return its path.

        Refuses an existing ``out_dir`` unless ``force``, in which case the old folder is
        replaced only once the new one is complete. The lock on ``out_dir`` is held
        throughout (and the "already exists" check made under it), so a concurrent run on
        the same folder fails rather than being silently replaced. Figures are closed after
        saving.
        """
        out_dir = Path(out_dir).expanduser().absolute()
        with out_lock(out_dir):
            if out_dir.exists() and not force:
                raise ReportError(f"{out_dir} already exists; use --force to replace it")
            if out_dir.exists() and not out_dir.is_dir():
                raise ReportError(f"{out_dir} exists and is not a folder")
            pause_point("locked")
            tmp: Path | None = None
            try:
                with signals_held():  # the folder is made and ``tmp`` names it, or neither
                    tmp = self._make_temp(out_dir)
                self._write_into(tmp, svg=svg)
                pause_point("renaming")
                self._swap_into_place(tmp, out_dir)
            except BaseException:
                with signals_held():
                    if tmp is not None:
                        shutil.rmtree(tmp, ignore_errors=True)
                self._close_figures()
                raise
        return out_dir

    @staticmethod
    def _make_temp(out_dir: Path) -> Path:
        try:
            return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        except OSError as e:
            raise ReportError(f"cannot write to {out_dir.parent}: {e.strerror or e}") from e

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
        swap_folders(tmp, out_dir)

    def _write_into(self, root: Path, *, svg: bool) -> None:
        from analyses.app.plots import save_figure

        (root / "figures").mkdir()
        (root / "data").mkdir()
        pngs: dict[str, bytes] = {}
        for section in self.sections:
            for name, df in section.tables.items():
                keep_index = not isinstance(df.index, pd.RangeIndex) or df.index.name is not None
                df.to_csv(root / "data" / f"{name}.csv", index=keep_index, lineterminator="\n")
            for name, text in section.files.items():
                (root / name).write_text(text, encoding="utf-8")
        pause_point("writing")
        for section in self.sections:
            for name, fig in section.figures.items():
                save_figure(fig, root / "figures" / name, svg=svg)
                pngs[name] = (root / "figures" / f"{name}.png").read_bytes()
        meta = self._meta_rows()
        (root / "index.md").write_text(
            render_markdown(self.title, meta, self.sections, self.notes), encoding="utf-8"
        )
        (root / "index.html").write_text(
            render_html(self.title, meta, self.sections, pngs, self.notes), encoding="utf-8"
        )
        (root / "run.json").write_text(
            json.dumps(self.run_info(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    def run_info(self) -> dict:
        """Everything needed to reproduce the run (what goes into run.json)."""
        return scrub_paths(_json_safe({
            "title": self.title,
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.command_line,
            "argv": self.argv,
            "seed": self.seed,
            "model": {"source": self.model_source, "config": self.model_config},
            "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu": {"linear_kernel": kernels.cpu_linear_kernel(),
                    "threads": torch.get_num_threads()},
            "sections": [s.key for s in self.sections],
            "timings": {s.key: dict(s.timings) for s in self.sections},
            "tables": {name: {"rows": len(df), "columns": [str(c) for c in df.columns]}
                       for s in self.sections for name, df in s.tables.items()},
            "extra": self.extra,
        }))

    def _meta_rows(self) -> list[tuple[str, str]]:
        """The header both pages show above the sections."""
        return [
            ("model", shown_path(self.model_source)),
            ("seed", str(self.seed)),
            ("command", self.command_line),
        ]
