"""The app layer: the ``interp`` command line, the report writer, plots and report sections.

It imports :mod:`analyses` and :mod:`interp`; nothing imports it.
"""
