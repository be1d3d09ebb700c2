"""Registry of report sections and CLI commands contributed by the analysis modules.

How a topic plugs in (one file, ``analyses/app/sections/<topic>.py``, nothing else to edit)::

    import click
    from analyses.app.cli import cli, common_options, model_argument, load_model, write_report
    from analyses.app.report import Section
    from analyses.app.sections import register

    def build(model, opts: dict, progress) -> Section:
        ...                       # call analyses/<topic>.py, return a Section whose
                                  # summary (3-5 findings with numbers read from its
                                  # tables) and summary_figure open the report

    def applies(model) -> bool:   # e.g. MoE only when model.cfg has experts
        return True

    register("heads", title="Head taxonomy", build=build, applies=applies)

    @cli.command("heads")
    @model_argument()
    @common_options
    def heads_cmd(model, **opts): ...

(``@cli.command`` is ``cli.add_command`` as a decorator; either works.)

Discovery: the first time the ``interp`` command group lists or looks up a command,
:func:`load_topics` imports every module in this package in sorted name order. A topic
whose file does not exist yet is simply not there; one whose import fails (a half-written
file, a missing optional dependency) is skipped with one warning line on stderr, recorded
in :data:`FAILED`, so one broken topic never takes the whole CLI down. Set
``INTERP_DEBUG=1`` to get the traceback instead.

Why imports happen lazily: ``analyses.app.cli`` defines ``cli`` before any topic imports it,
so topics can ``from analyses.app.cli import cli`` without an import cycle, and
``import analyses.app.cli`` alone stays cheap.

What a builder gets: ``model`` (an ``interp.HookedTransformer``, eval mode, on the chosen
device), ``opts`` (a dict with keys ``model_source``, ``batch_size``, ``max_tokens``
(None = the analysis' default), ``device``, ``dtype``, ``seed``, ``quiet``, ``svg``), and
``progress(iterable, desc="", total=None)``, an :class:`interp.progress.Progress` (the tqdm
bar of :func:`interp.progress.progress_bar`, silent under --quiet).
``interp report`` runs every registered section whose ``applies(model)`` is true, in
``order`` then key order, and writes them all into one report.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["FAILED", "SECTIONS", "SectionSpec", "load_topics", "register", "select"]

Builder = Callable[[Any, dict, Callable[..., Iterable]], Any]


def _always(model: Any) -> bool:
    return True


@dataclass(frozen=True)
class SectionSpec:
    """One registered report section.

    ``default_model`` is the model ``interp report`` uses for this section when the user
    names none (e.g. a packaged MoE checkpoint for the MoE section, since the default
    MiniLM has no experts); ``None`` means the CLI's default model. ``order`` sorts
    sections in the report (lower first; ties by key).
    """

    key: str
    title: str
    build: Builder
    applies: Callable[[Any], bool] = _always
    default_model: str | None = None
    order: int = 100


SECTIONS: dict[str, SectionSpec] = {}
# topic module name -> one-line reason it failed to import
FAILED: dict[str, str] = {}
_loaded = False
_IMPORTED: list[str] = []


def register(
    key: str,
    *,
    title: str,
    build: Builder,
    applies: Callable[[Any], bool] = _always,
    default_model: str | None = None,
    order: int = 100,
) -> SectionSpec:
    """Register (or re-register, e.g. on module reload) a report section under ``key``."""
    spec = SectionSpec(key=key, title=title, build=build, applies=applies,
                       default_model=default_model, order=order)
    SECTIONS[key] = spec
    return spec


def load_topics() -> list[str]:
    """Import every topic module in this package once; return the names that imported."""
    global _loaded
    if _loaded:
        return list(_IMPORTED)
    _loaded = True
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        module = f"{__name__}.{name}"
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken topic must not break every other command
            if os.environ.get("INTERP_DEBUG"):
                raise
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            FAILED[name] = reason
            print(f"warning: skipped {module} ({reason})", file=sys.stderr)
            continue
        _IMPORTED.append(name)
    return list(_IMPORTED)


def select(only: Iterable[str] = (), skip: Iterable[str] = ()) -> list[SectionSpec]:
    """Registered sections in report order, filtered by ``only``/``skip`` keys.

    Whether a section applies is decided by the caller, per model (``spec.applies``).
    """
    load_topics()
    only, skip = set(only), set(skip)
    unknown = sorted((only | skip) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"unknown section(s) {unknown}; registered: {sorted(SECTIONS) or 'none'}"
        )
    specs = sorted(SECTIONS.values(), key=lambda s: (s.order, s.key))
    return [s for s in specs if (not only or s.key in only) and s.key not in skip]
