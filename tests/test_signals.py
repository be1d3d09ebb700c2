"""Stop signals and concurrent runs against real ``interp`` processes (issue 24).

Every run here is a real ``python -m analyses.app.cli plot <tiny .json model> --out DIR``
(or the ``interp`` console script). To land a signal at an exact point of the report write,
a run is started with ``INTERP_TEST_PAUSE_AT=<point>`` (:func:`analyses.app.outdir.
pause_point`): it prints ``paused at <point>`` on stderr and waits until the file named by
``INTERP_TEST_PAUSE_UNTIL`` exists, and the test sends its signal meanwhile. The points:
``locked`` (the ``--out`` lock held, no temporary folder yet), ``writing`` (the temporary
folder half written), ``renaming`` (complete, not yet in place) and ``swapped`` (the new
report in place, signals held).

What must hold (issue 24, "Signals and concurrency"):

- after SIGINT or SIGTERM at any point: exit 130 (SIGINT) or 143 (SIGTERM), the one line
  ``interrupted`` on stderr, no temporary folder or lock file left, and the previous report
  at ``--out`` byte for byte as it was;
- after SIGKILL (which nothing can handle): the previous report intact all the same, and the
  next run on that folder removes what the killed one left;
- Ctrl-C (and SIGTERM) while the command line starts: ``interrupted``, never a traceback;
- two runs on one ``--out``, with or without ``--force``: exactly one succeeds, the other
  exits 2 with one ``error:`` line, and the report at ``--out`` is the first run's, whole.

Each start costs seconds (torch and friends load), so the cases of a test run side by side,
at most :data:`PARALLEL` processes at a time (each holds ~300 MB); the file takes about a
minute on two idle cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX signals and flock; Windows has neither"
)

ROOT = Path(__file__).resolve().parent.parent
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_vocab": 300, "n_ctx": 64}
TIMEOUT = 300  # seconds for one run to reach a point or finish, on a busy machine
MODULE = (sys.executable, "-m", "analyses.app.cli")
CONSOLE = Path(sys.executable).with_name("interp")  # the console script of this environment
PARALLEL = 4  # processes alive at once: enough to keep two cores busy, light on memory
_STARTED: list[subprocess.Popen] = []  # every process started here, killed if left running


@pytest.fixture(autouse=True, scope="module")
def _no_process_left() -> Iterable[None]:
    """A failed case must not leave a paused run behind (it would wait a minute)."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True, scope="module")
def _sigint_not_ignored() -> Iterable[None]:
    """The runs here stand for a user at a terminal. A suite started in the background by a
    shell without job control (``make test &``, ``nohup``) has SIGINT ignored, every child
    inherits that, and interp leaves an ignored signal ignored on purpose (see
    :func:`~analyses.app.signals.handle_stop_signals`), so no SIGINT case could pass there.
    Handled signals are reset to the default in a child, ignored ones are not: handle it
    here while the module runs."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def side_by_side(cases: Iterable[Any], one: Callable[[Any], Any]) -> list[Any]:
    """``one(case)`` for every case, :data:`PARALLEL` at a time; results in case order."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(one, cases))


# --------------------------------------------------------------------------- one real run


class Run:
    """One real ``interp plot`` process writing ``out``; its stderr is read as it comes."""

    def __init__(self, model: Path, out: Path, *extra: str, pause: str = "",
                 until: Path | None = None, entry: tuple[str, ...] = MODULE) -> None:
        env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "INTERP_TEST_PAUSE_AT": pause,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        for name in ("INTERP_DEBUG", "PYTHONWARNINGS", "INTERP_TEST_PAUSE_UNTIL"):
            env.pop(name, None)
        if until is not None:
            env["INTERP_TEST_PAUSE_UNTIL"] = str(until)
        self.args = [*entry, "plot", str(model), "--text", "the cat sat", "--layer", "1",
                     "--out", str(out), "-q", "--device", "cpu", *extra]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=out.parent)
        _STARTED.append(self.proc)
        self.stderr: list[str] = []
        self.paused = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr.append(line.rstrip("\n"))
            if line.startswith("paused at "):
                self.paused.set()

    def wait_paused(self) -> None:
        """Until the run stops at its pause point; fail if it ends or never gets there."""
        deadline = time.monotonic() + TIMEOUT
        while not self.paused.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                rc, lines = self.finish()
                pytest.fail(f"{self.args} never paused (exit {rc}): {lines}")

    def finish(self) -> tuple[int, list[str]]:
        """The exit code and stderr lines (without the ``paused at`` line)."""
        try:
            rc = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(10)
        self.proc.stdout.close()  # type: ignore[union-attr]
        return rc, [line for line in self.stderr if not line.startswith("paused at ")]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a report folder, by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_whole_new_report(now: dict[str, bytes], baseline: dict[str, bytes]) -> None:
    """``now`` (a :func:`snapshot`) is one complete report of the same run as the baseline:
    the same files, the data and figures byte-identical, the pages too but for ``--force``
    in the command line they show, and a run.json (date and timings differ) that parses."""
    assert sorted(now) == sorted(baseline)
    for name, data in now.items():
        if name == "run.json":
            assert json.loads(data)["argv"][:2] == ["interp", "plot"]
        else:
            assert data.replace(b" --force", b"") == baseline[name].replace(b" --force", b""), name


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Path:
    """A report written by a first, undisturbed run: the "previous report" of every case."""
    out = tmp_path_factory.mktemp("baseline") / "rep"
    rc, lines = Run(model, out).finish()
    assert rc == 0 and lines == [], (rc, lines)
    return out


# --------------------------------------------------------------------------- signals in a write

CASES = [(sig, point) for sig in ("SIGINT", "SIGTERM")
         for point in ("locked", "writing", "renaming")]
CASES += [("SIGKILL", "writing"), ("SIGKILL", "renaming")]
HELD = ("SIGINT", "swapped")  # the case where the signal must wait


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory, model: Path, baseline: Path) -> dict:
    """Run every case side by side: each run replaces a copy of the baseline report with
    ``--force``, stops at its point and gets its signal. In the :data:`HELD` case the run is
    let go half a second after its signal (whether it was still running then is recorded).
    After the SIGKILLs, one more run on a killed run's folder. Returns, by case, the exit
    code, the stderr lines, the folder's entries and the report as they were at its end."""
    root = tmp_path_factory.mktemp("signals")

    def one(case: tuple[str, str]) -> dict:
        sig, point = case
        folder = root / f"{sig}-{point}"
        shutil.copytree(baseline, folder / "rep")
        run = Run(model, folder / "rep", "--force", pause=point, until=folder / "go")
        run.wait_paused()
        run.proc.send_signal(getattr(signal, sig))
        held = None
        if case == HELD:
            time.sleep(0.5)
            held = run.proc.poll() is None
            (folder / "go").touch()
        rc, lines = run.finish()
        (folder / "go").unlink(missing_ok=True)
        # what a test checks, taken now: a later run may write this folder again
        return {"rc": rc, "stderr": lines, "held": held, "left": names(folder),
                "report": snapshot(folder / "rep")}

    cases = [HELD, *CASES]
    outcomes: dict = dict(zip(cases, side_by_side(cases, one), strict=True))
    # The next run on a folder a SIGKILL left dirty: it takes the lock and cleans first.
    folder = root / "SIGKILL-renaming"
    rc, lines = Run(model, folder / "rep", "--force").finish()
    outcomes["next run"] = {"rc": rc, "stderr": lines, "left": names(folder),
                            "report": snapshot(folder / "rep")}
    return outcomes


@pytest.mark.parametrize(("sig", "point"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_signal_during_a_report_write(signalled: dict, baseline: Path, sig: str,
                                      point: str) -> None:
    got = signalled[sig, point]
    # the previous report is untouched whatever the signal
    assert got["report"] == snapshot(baseline)
    if sig == "SIGKILL":
        assert got["rc"] == -signal.SIGKILL
        # a killed run may leave its temporary folder and its (unlocked) lock file, no more
        assert all(n in ("rep", ".rep.lock") or n.startswith(".rep.tmp-")
                   for n in got["left"]), got["left"]
        return
    assert got["rc"] == 128 + getattr(signal, sig), got
    assert got["stderr"] == ["interrupted"]
    assert got["left"] == ["rep"]  # no .rep.tmp-*, no .rep.lock


def test_next_run_cleans_what_a_killed_run_left(signalled: dict, baseline: Path) -> None:
    killed, after = signalled["SIGKILL", "renaming"], signalled["next run"]
    assert any(n.startswith(".rep.tmp-") for n in killed["left"]), killed["left"]
    assert after["rc"] == 0 and after["stderr"] == [], after
    assert after["left"] == ["rep"]
    assert_whole_new_report(after["report"], snapshot(baseline))


def test_a_signal_waits_while_the_report_is_swapped(signalled: dict, baseline: Path) -> None:
    """SIGINT between "the new report is in place" and "the previous one is removed" is
    held until that step is done: the run then stops, the new report whole at --out."""
    got = signalled[HELD]
    assert got["held"], "the signal was not held"
    assert got["rc"] == 130 and got["stderr"] == ["interrupted"], got
    assert got["left"] == ["rep"]
    assert_whole_new_report(got["report"], snapshot(baseline))


# --------------------------------------------------------------------------- two runs, one --out


def test_two_runs_on_one_out(tmp_path: Path, model: Path, baseline: Path) -> None:
    """Without --force, with --force, and a plain race: exactly one run writes the folder,
    the other exits 2 with one ``error:`` line, and the folder holds the winner's report."""

    def first_then_second(folder: Path, *extra: str) -> None:
        """The first run stops half-way through its write, holding the lock; a second
        starts on the same folder; then the first goes on."""
        first = Run(model, folder / "rep", *extra, pause="writing", until=folder / "go")
        first.wait_paused()
        rc, lines = Run(model, folder / "rep", *extra).finish()
        (folder / "go").touch()
        assert rc == 2, (folder.name, rc, lines)
        assert len(lines) == 1 and lines[0].startswith("error: another interp run"), lines
        assert "is writing" in lines[0] and str(folder / "rep") in lines[0]
        rc, lines = first.finish()
        assert rc == 0 and lines == [], (folder.name, rc, lines)
        (folder / "go").unlink()

    def race(folder: Path) -> None:
        """Two runs started together, neither paused, no --force."""
        runs = [Run(model, folder / "rep"), Run(model, folder / "rep")]
        results = sorted((r.finish() for r in runs), key=lambda r: r[0])
        assert [rc for rc, _ in results] == [0, 2], results
        assert results[0][1] == []
        assert len(results[1][1]) == 1 and results[1][1][0].startswith("error: "), results

    new, forced, raced = (tmp_path / "new", tmp_path / "forced", tmp_path / "race")
    for folder in (new, forced, raced):
        folder.mkdir()
    shutil.copytree(baseline, forced / "rep")
    side_by_side([lambda: first_then_second(new), lambda: first_then_second(forced, "--force"),
                  lambda: race(raced)], lambda f: f())
    for folder in (new, forced, raced):
        assert names(folder) == ["rep"]
        assert_whole_new_report(snapshot(folder / "rep"), snapshot(baseline))


# --------------------------------------------------------------------------- start-up


def _handlers_installed(pid: int) -> bool:
    """True once the process catches SIGTERM, i.e. ``main()`` has run its first line
    (Python itself catches SIGINT only). Linux: the SigCgt mask in /proc/<pid>/status."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _entries() -> list:
    console = pytest.param((str(CONSOLE),), id="console-script", marks=pytest.mark.skipif(
        not CONSOLE.exists(), reason="the interp console script is not installed here"))
    return [pytest.param(MODULE, id="python-m"), console]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("entry", _entries())
def test_stop_signals_while_the_command_line_starts(tmp_path: Path, model: Path,
                                                    entry: tuple[str, ...]) -> None:
    """Signals that land in the start-up, while torch, pandas, matplotlib and the commands
    load (seconds): SIGINT as soon as main() has its handlers, SIGINT a second later,
    SIGTERM as soon as possible. Each: one line ``interrupted``, its exit code, no
    traceback, nothing written."""
    def one(plan: tuple[str, int, float]) -> None:
        name, sig, delay = plan
        (tmp_path / name).mkdir()
        run = Run(model, tmp_path / name / "rep", entry=entry)
        deadline = time.monotonic() + TIMEOUT
        while not _handlers_installed(run.proc.pid):
            assert run.proc.poll() is None and time.monotonic() < deadline, (name, run.finish())
            time.sleep(0.002)
        time.sleep(delay)
        run.proc.send_signal(sig)
        rc, lines = run.finish()
        assert rc == 128 + sig and lines == ["interrupted"], (name, rc, lines)
        assert names(tmp_path / name) == [], name

    side_by_side([("now", signal.SIGINT, 0.0), ("later", signal.SIGINT, 1.0),
                  ("term", signal.SIGTERM, 0.0)], one)


def test_ctrl_c_right_after_spawn_prints_no_traceback(tmp_path: Path, model: Path) -> None:
    """SIGINT the moment the process exists. It usually lands before Python can handle
    signals at all (killed by SIGINT, silent; the shell shows 130), otherwise in interp's
    start-up (``interrupted``, 130). A signal inside Python's own start-up (its ``site``
    import, before the first line of interp runs) is Python's business, not tested here."""
    (tmp_path / "x").mkdir()
    run = Run(model, tmp_path / "x" / "rep")
    run.proc.send_signal(signal.SIGINT)
    rc, lines = run.finish()
    if any("init_import_site" in line for line in lines):
        pytest.skip("the signal landed inside Python's own start-up (site import)")
    assert (rc, lines) in ((-signal.SIGINT, []), (130, ["interrupted"])), (rc, lines)
    assert names(tmp_path / "x") == []


# --------------------------------------------------------------------------- the guard, in-process
# Branches the real runs above do not reach on this machine: cheap, no subprocess.


def _tiny_report() -> Any:
    import pandas as pd

    from analyses.app.report import Report, Section

    report = Report("t", model_source="m", model_config={}, seed=0, command=["interp", "x"])
    report.add(Section(key="s", title="S", method="m", source="s", data="d",
                       tables={"s": pd.DataFrame({"x": [1]})}))
    return report


def test_a_lock_held_elsewhere_refuses_with_one_line(tmp_path: Path) -> None:
    """flock is per open file: a lock taken through another descriptor (as another process
    would) refuses the write, names the folder, and leaves that lock alone."""
    import fcntl

    from analyses.app.report import ReportError

    lock = tmp_path / ".rep.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        with pytest.raises(ReportError, match="another interp run") as info:
            _tiny_report().write(tmp_path / "rep")
        assert "(pid 4242)" in str(info.value) and "\n" not in str(info.value)
        assert lock.exists() and not (tmp_path / "rep").exists()
    finally:
        os.close(fd)
    _tiny_report().write(tmp_path / "rep")  # released: the next write goes ahead
    assert names(tmp_path) == ["rep"]


def test_fallback_swap_and_recovery_of_a_run_killed_between_renames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RENAME_EXCHANGE the previous report is renamed aside, then the new one in:
    nothing stays aside. A run killed between the two renames left DIR missing and the
    previous report as .DIR.old-*: the next run puts it back before anything else."""
    from analyses.app import outdir

    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    out = tmp_path / "rep"
    _tiny_report().write(out)
    _tiny_report().write(out, force=True)
    assert names(tmp_path) == ["rep"]
    previous = snapshot(out)
    # the state a SIGKILL between the two renames leaves
    out.rename(tmp_path / ".rep.old-abcd1234")
    (tmp_path / ".rep.tmp-efgh5678").mkdir()
    with outdir.out_lock(out):
        assert names(tmp_path) == [".rep.lock", "rep"]
    assert names(tmp_path) == ["rep"]
    assert snapshot(out) == previous


def test_missing_parents_are_made_for_the_lock_and_removed_if_nothing_was_written(
        tmp_path: Path) -> None:
    from analyses.app import outdir

    out = tmp_path / "a" / "b" / "rep"
    with outdir.out_lock(out):
        assert (tmp_path / "a" / "b" / ".rep.lock").exists()
    assert names(tmp_path) == []
