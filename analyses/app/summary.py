"""The one-screen summary every report and every section opens with.

A reader wants the answer before the method: each section carries three to five findings
with their numbers (``Section.summary``, computed by its builder from the same frames that go
into its CSVs) and the one figure that shows them (``Section.summary_figure``). A report with
several sections opens with a summary of those summaries, plus a line for every section that
did not run and why (``notes``). This module only chooses what goes into the two summaries;
:mod:`analyses.app.render` lays them out.

Why the fallbacks: a section written before summaries existed (or a test's) still gets a
summary, made of its first findings and its first figure, rather than none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analyses.app.report import Section

__all__ = ["MAX_ITEMS", "report_summary", "section_summary"]

MAX_ITEMS = 5  # one screen: more than five findings is no longer a summary


def section_summary(section: Section) -> tuple[list[str], str | None]:
    """(the section's summary findings, the name of the figure that shows them or None)."""
    items = list(section.summary or section.findings[:3])[:MAX_ITEMS]
    if not items:
        items = ["No findings: the section recorded none."]
    figure = section.summary_figure
    if figure is None and section.figures:
        figure = next(iter(section.figures))
    return items, figure


def report_summary(sections: Sequence[Section],
                   notes: Sequence[str] = ()) -> tuple[list[str], str | None]:
    """The report's summary: a lone section's own, else the lead of each section's summary.

    With several sections each gets one line, its title and its first two summary findings;
    ``notes`` (sections skipped and why) follow. The figure is the first analysis section's
    (the model overview comes first but shows the least).
    """
    if len(sections) == 1:
        items, figure = section_summary(sections[0])
        return items + list(notes), figure
    items, figures = [], []
    for s in sections:
        lead, fig = section_summary(s)
        items.append(f"**{s.title}**: " + " ".join(_sentence(x) for x in lead[:2]))
        if fig is not None:
            figures.append((s.key == "model", fig))
    items += list(notes)
    figure = min(figures, key=lambda f: f[0])[1] if figures else None
    return items, figure


def _sentence(text: str) -> str:
    """A finding as a sentence, so two of them read as one line."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."
