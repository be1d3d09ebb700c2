"""Analyses on top of :mod:`interp`: head taxonomy, FFN knowledge, MoE, masking effects.

Layering (DESIGN.md): analysis modules (``analyses/<topic>.py``) take a model and data and
return tidy DataFrames; :mod:`analyses.app.plots` turns frames into figures;
:mod:`analyses.app.report` writes report folders; :mod:`analyses.app.cli` is the ``interp``
command line, and :mod:`analyses.app.sections` is where each topic registers its report
section and command. Nothing here is imported by :mod:`interp`.
"""
