"""Every documented example runs: the README's ``python`` blocks and ``interp`` command lines,
and the ``Example:`` lines of every command's ``--help``.

The examples are what a new user types first, so they are the spec users read: each one is
found automatically (no hand-kept list, so a new example cannot be added without being run)
and run as a user would, in a fresh process (``python -c`` for a block, the ``interp``
console script for a command line), offline, on the embedded models. A failure names the
example, where it is written and the end of its output.

How each runs:

- **Working folder.** A fresh temporary folder per source (the README's bash block, one
  command's ``--help``), holding links to the repository's shipped top-level entries
  (``interp/``, ``analyses/``, ``tests/``, ``README.md``, ...) but not to the folders the
  examples write into (``reports/``): an example reads shipped data by its path in the
  checkout, as a user in the checkout would, and writes only into the temporary folder.
- **Order.** The examples of one source share that folder and run in the order written, so
  ``interp train ... --resume induction.pt`` finds the checkpoint the line before it wrote;
  selecting one example (``-k``) runs the examples before it in its source first.
- **Smaller, not different.** Options that make a run cheaper are appended to a command
  line (click keeps the last value of an option): ``--max-tokens`` where the command has it,
  and the per-command sizes in :data:`SMALLER` (fewer facts, steps, random sequences,
  permutations...; a ``--resume`` example gets a few more steps than the checkpoint it
  continues). ``interp bench`` runs with a reduced argument set (``--rounds 1 --workloads
  no_hooks --tools transformers,interp``): its full run takes many minutes by design. The
  example's own arguments, models and files are otherwise exactly as written.
- **Once.** Two examples that parse to the same command and options (the default report is
  shown in ``interp --help`` and ``interp report --help``) and read only shipped files run
  once; the second passes or fails with the first.
- **Marks.** Every analysis, training, benchmark and report example, and every example that
  loads SmolLM2, is ``slow``; the fast subset (``-m "not slow"``) runs the Python blocks and
  the ``info``/``plot`` lines on the small models (seconds each).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: one example's limit (the default report takes minutes on a loaded 2-core machine); a hung
#: example fails with its text instead of hanging CI
TIMEOUT_S = 1200

#: Cheaper sizes appended per command (options checked to exist by a test below).
SMALLER: dict[str, list[str]] = {
    "ffn": ["--max-facts", "2", "--samples", "2", "--ig-steps", "2", "--kv-layers", "0",
            "--top-k", "3"],
    "heads": ["--n-random", "2", "--half-len", "8"],
    "explore": ["--n-random", "2"],
    "masking": ["--seq-len", "32", "--pruning-steps", "2", "--random-orders", "1"],
    "moe": ["--n-perm", "9", "--ablation-tokens", "256"],
    "train": ["--steps", "20"],
    "patch": ["--pairs", "8"],
    "sae": ["--steps", "20"],
    "steer": ["--max-new-tokens", "6"],
    "bench": ["--rounds", "1", "--workloads", "no_hooks", "--tools", "transformers,interp"],
}
RESUMED_STEPS = "40"  # a --resume example continues the 20-step checkpoint before it
MAX_TOKENS = "256"  # appended as --max-tokens where the command has that option
#: Commands whose examples take seconds when they do not load SmolLM2 (the rest are slow).
LIGHT_COMMANDS = frozenset({"info", "plot"})
#: Folders and files an example may write into; never linked into the working folder.
OUTPUT_OPTIONS = ("--out", "--json", "--save")


@dataclass(frozen=True)
class Example:
    """One documented example: what a user would type, and where it is written."""

    source: str  # "README.md" or "interp heads --help": examples of one source share a folder
    where: str  # "README.md line 42", "interp heads --help"
    text: str  # as written (continuation lines joined); a python block's code
    kind: str  # "python" or "interp"
    args: tuple[str, ...] = field(default=())  # an interp line's words after "interp"

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0] if self.kind == "python" else self.text
        return f"{self.where}: {first}"[:110]

    @property
    def slow(self) -> bool:
        if "smollm2" in self.text:
            return True
        if self.kind == "python":
            return False
        return not self.args or self.args[0] not in LIGHT_COMMANDS


# --------------------------------------------------------------------------- collection


def _all_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first body line number, body) of every fenced block of a Markdown text,
    fences paired in order (a bare ``` opens a block as well as closing one)."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("```"):
            language, start, body = lines[i].strip()[3:].strip(), i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((language, start, "\n".join(body)))
        i += 1
    return blocks


def _fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```language fenced block of a Markdown text."""
    return [(start, body) for lang, start, body in _all_blocks(text) if lang == language]


def _interp_lines(text: str) -> list[tuple[int, str]]:
    """(line offset, command) of every line that starts with ``interp `` in a text, with
    backslash continuation lines joined."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("interp "):
            start = i
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            out.append((start, line))
        i += 1
    return out


def _words(line: str) -> tuple[str, ...]:
    """The words after ``interp``, as the shell splits them (quotes, ``# comment``)."""
    words = shlex.split(line, comments=True)
    assert words[0] == "interp", line
    return tuple(words[1:])


def readme_examples() -> list[Example]:
    text = README.read_text(encoding="utf-8")
    found = [Example("README.md", f"README.md line {n}", body, "python")
             for n, body in _fenced_blocks(text, "python")]
    for n, body in _fenced_blocks(text, "bash"):
        found += [Example("README.md", f"README.md line {n + k}", line, "interp", _words(line))
                  for k, line in _interp_lines(body)]
    return found


def _commands(group: click.Group, path: str = "interp") -> list[tuple[str, click.Command]]:
    """(command path, command) for the group and everything under it."""
    ctx = click.Context(group, info_name=path.rsplit(" ", 1)[-1])
    found: list[tuple[str, click.Command]] = [(path, group)]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        if isinstance(cmd, click.Group):
            found += _commands(cmd, f"{path} {name}")
        else:
            found.append((f"{path} {name}", cmd))
    return found


def help_examples() -> list[Example]:
    """The ``interp ...`` lines of every command's ``--help`` text (its docstring)."""
    from analyses.app.cli import cli

    found = []
    for path, cmd in _commands(cli):
        where = f"{path} --help"
        found += [Example(where, where, line, "interp", _words(line))
                  for _, line in _interp_lines(cmd.help or "")]
    return found


def all_examples() -> list[Example]:
    return readme_examples() + help_examples()


EXAMPLES = all_examples()


# --------------------------------------------------------------------------- running


def _command(args: tuple[str, ...]) -> click.Command | None:
    """The command an example's words name (walking into subgroups), or None."""
    from analyses.app.cli import cli

    cmd: click.Command | None = cli
    for word in args:
        if not isinstance(cmd, click.Group):
            break
        cmd = cmd.get_command(click.Context(cmd, info_name=word), word)
    return None if cmd is cli else cmd


def _option_names(cmd: click.Command) -> set[str]:
    return {opt for p in cmd.params for opt in getattr(p, "opts", ())}


def smaller(args: tuple[str, ...]) -> list[str]:
    """The cheaper options appended to an example's command line."""
    cmd = _command(args)
    if cmd is None or "--help" in args or "-h" in args or "--list" in args:
        return []
    extra = list(SMALLER.get(args[0], []))
    if args[0] == "train" and "--resume" in args:  # it must train past the checkpoint's steps
        extra[extra.index("--steps") + 1] = RESUMED_STEPS
    if "--max-tokens" in _option_names(cmd):
        extra += ["--max-tokens", MAX_TOKENS]
    return extra


def _outputs(args: tuple[str, ...]) -> list[str]:
    """The paths an example writes (the values of its output options)."""
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in OUTPUT_OPTIONS]


def _written_top_level() -> set[str]:
    """First path components any example writes into (kept out of the working folder)."""
    return {Path(p).parts[0] for ex in EXAMPLES for p in _outputs(ex.args) if Path(p).parts}


def _working_folder(root: Path) -> Path:
    """A folder that looks like the checkout for reading (links to its shipped entries) and
    holds nothing an example writes into."""
    root.mkdir(parents=True)
    skip = _written_top_level()
    for entry in sorted(REPO.iterdir()):
        if entry.name.startswith(".") or entry.name in skip or entry.name.endswith(".egg-info"):
            continue
        (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return root


def _interp_exe() -> list[str]:
    exe = shutil.which("interp", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "analyses.app.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_example(ex: Example, cwd: Path) -> None:
    """Run one example in ``cwd``; fail with its text, where it is written and its output."""
    if ex.kind == "python":
        argv = [sys.executable, "-c", ex.text]
    else:
        for out in _outputs(ex.args):
            target = (cwd / out).resolve()
            assert not target.is_relative_to(REPO), (
                f"{ex.where}: `{ex.text}` writes into the repository ({target})")
        argv = [*_interp_exe(), *ex.args, *smaller(ex.args)]
    try:
        proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"{ex.where}: example ran past {TIMEOUT_S} s:\n{ex.text}\n"
                    f"{_tail(err or '')}", pytrace=False)
    if proc.returncode != 0:
        ran = "" if ex.kind == "python" else f"\n(run as: interp {shlex.join(argv[1:])})"
        pytest.fail(
            f"{ex.where}: example exited {proc.returncode}:\n{ex.text}{ran}\n--- output:\n"
            f"{_tail(proc.stdout, 10)}\n{_tail(proc.stderr)}", pytrace=False)


class _Sources:
    """One working folder per source; an example runs after those written before it (whose
    files it may read), and fails only for its own failure."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.folders: dict[str, Path] = {}
        self.done: dict[Example, str | None] = {}  # example -> None (passed) or why it failed

    def run(self, ex: Example) -> None:
        if ex.source not in self.folders:
            name = re.sub(r"[^A-Za-z0-9]+", "_", ex.source).strip("_")
            self.folders[ex.source] = _working_folder(self.base / name)
        failed_before = []
        for before in [e for e in EXAMPLES if e.source == ex.source]:
            if before == ex:
                break
            self._record(before)  # it may write a file this one reads
            if self.done[before] is not None:
                failed_before.append(before.where)
        self._record(ex)
        if self.done[ex] is not None:
            note = (f"\n(examples before it in {ex.source} failed too: "
                    f"{', '.join(failed_before)})" if failed_before else "")
            pytest.fail(self.done[ex] + note, pytrace=False)

    def _record(self, ex: Example) -> None:
        if ex in self.done:
            return
        key = _same_run(ex)
        twin = next((e for e in self.done if key is not None and _same_run(e) == key), None)
        if twin is not None:
            self.done[ex] = self.done[twin] and f"{self.done[twin]}\n(also {ex.where})"
            return
        try:
            run_example(ex, self.folders[ex.source])
            self.done[ex] = None
        except pytest.fail.Exception as e:
            self.done[ex] = str(e)


def _reads(ex: Example) -> list[str]:
    """The files an example's command line names as input (path options, a MODEL file)."""
    cmd = _command(ex.args)
    if cmd is None:
        return []
    path_opts = {o for p in cmd.params if isinstance(p.type, click.Path)
                 for o in p.opts} - set(OUTPUT_OPTIONS)
    reads = [ex.args[i + 1] for i, a in enumerate(ex.args[:-1]) if a in path_opts]
    return reads + [a for a in ex.args[1:2] if re.search(r"\.(pt|json|gguf|jsonl|txt)$|/", a)]


def _same_run(ex: Example) -> str | None:
    """What an example runs (command and parsed options) when that depends on nothing but
    shipped files; None otherwise (it then always runs)."""
    cmd = _command(ex.args)
    if ex.kind != "interp" or cmd is None or not all((REPO / p).exists() for p in _reads(ex)):
        return None
    try:
        ctx = cmd.make_context(ex.args[0], [*ex.args[1:], *smaller(ex.args)],
                               resilient_parsing=True)
    except (click.ClickException, click.exceptions.Exit):
        return None
    return f"{ex.args[0]} {sorted(ctx.params.items(), key=lambda kv: kv[0])!r}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> _Sources:
    return _Sources(tmp_path_factory.mktemp("examples"))


# --------------------------------------------------------------------------- the tests


def test_examples_are_found() -> None:
    """The collector sees the README's blocks and every command's examples; a command
    without an example in its --help fails here (CONTRIBUTING: every --help shows one)."""
    from analyses.app.cli import cli

    text = README.read_text(encoding="utf-8")
    blocks = _all_blocks(text)
    languages = {lang for lang, _, _ in blocks}  # a ```sh or ```py block would go unrun
    assert languages <= {"python", "bash", ""}, languages
    n_python = sum(lang == "python" for lang, _, _ in blocks)
    assert sum(e.kind == "python" for e in EXAMPLES) == n_python >= 1
    in_blocks = [line for lang, _, body in blocks if lang != "python"
                 for line in body.splitlines() if line.strip().startswith("interp ")]
    assert sum(e.where.startswith("README") and e.kind == "interp" for e in EXAMPLES) \
        == len(in_blocks) >= 1
    with_examples = {e.source for e in EXAMPLES}
    for path, _ in _commands(cli):
        assert f"{path} --help" in with_examples, f"`{path} --help` shows no example"
    for ex in EXAMPLES:
        if ex.kind == "interp":
            assert _command(ex.args) is not None, f"{ex.where}: unknown command in `{ex.text}`"


def test_example_files_are_shipped() -> None:
    """Every file an example reads is in the repository (tests/data, interp/data, ...), or
    written by an example before it in the same source."""
    written: dict[str, set[str]] = {}
    for ex in EXAMPLES:
        if ex.kind != "interp":
            continue
        for path in _reads(ex):
            assert (REPO / path).exists() or path in written.get(ex.source, set()), (
                f"{ex.where}: `{ex.text}` needs {path}, which the repository does not ship")
        written.setdefault(ex.source, set()).update(_outputs(ex.args))


def test_smaller_options_exist() -> None:
    """The cheaper options appended to examples are real options of their commands (a
    renamed option must not silently stop shrinking the runs)."""
    for name, extra in SMALLER.items():
        cmd = _command((name,))
        assert cmd is not None, name
        opts = [a for a in extra if a.startswith("--")]
        assert set(opts) <= _option_names(cmd), (name, set(opts) - _option_names(cmd))


@pytest.mark.parametrize(
    "example",
    [pytest.param(ex, id=ex.id, marks=[pytest.mark.slow] if ex.slow else [])
     for ex in EXAMPLES])
def test_example_runs(example: Example, sources: _Sources) -> None:
    sources.run(example)
