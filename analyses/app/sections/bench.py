"""``interp bench``: the benchmark harness of the source checkout (``bench/``), attached here.

The harness is not part of the installed package (issue 17): it lives in ``bench/`` at the top
of the repository, beside ``analyses/``. The project is installed editable from a checkout, so
the checkout is the folder above the ``analyses`` package; when ``bench/`` is there, its command
(:mod:`bench.cli`, which holds the options) becomes ``interp bench``. In a wheel install there is
no checkout, and ``interp bench`` is a stub that says in one line where to get the benchmark.

``bench`` is imported from its file, not from ``sys.path`` (an editable install maps only
``interp`` and ``analyses``), and only when the command group loads its topics; nothing else in
``analyses`` imports it, and ``interp`` never does.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import click

import analyses
from analyses.app.cli import CliError, cli

CHECKOUT = Path(analyses.__file__).resolve().parent.parent
MISSING = (
    "interp bench: the benchmark harness ships with the source checkout, not with the installed "
    "package; clone the repository, pip install -e '.[dev,peers]' in it, then run interp bench "
    "(or python -m bench) there"
)


def bench_package(root: Path = CHECKOUT) -> ModuleType:
    """The checkout's ``bench`` package, imported from ``root/bench``; CliError when absent."""
    init = root / "bench" / "__init__.py"
    if not init.is_file():
        raise CliError(MISSING)
    loaded = sys.modules.get("bench")
    if loaded is not None:  # e.g. python -m bench, or a test that put the checkout on sys.path
        if Path(getattr(loaded, "__file__", "") or "").resolve() == init.resolve():
            return loaded
        raise CliError(f"interp bench: another module named bench is imported ({loaded!r})")
    spec = importlib.util.spec_from_file_location(
        "bench", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["bench"]
        raise
    return module


def missing_command(message: str = MISSING) -> click.Command:
    """``interp bench`` without a checkout: any arguments, one error line, exit code 2."""

    @click.command(
        "bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
    )
    def bench_cmd() -> None:
        """Time interp against its peers (needs the source checkout; see BENCHMARKS.md)."""
        raise CliError(message)

    return bench_cmd


def _attach() -> None:
    """``interp bench``: the checkout's command, or the stub that says where to get it."""
    try:
        bench_package()
    except CliError as e:
        cli.add_command(missing_command(e.format_message()))
        return
    cli.add_command(importlib.import_module("bench.cli").bench_cmd)


_attach()
