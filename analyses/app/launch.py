"""``interp --nproc N``: start N local ranks of the same command, the way torchrun would.

For users without ``torchrun``: the launcher sets the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` on a
free local port) and runs ``python -m analyses.app.cli <the same arguments>`` N times; the
ranks join a gloo (or NCCL) process group in :func:`analyses.distributed.session` and shard
the analysis. Only rank 0 writes the report (under the ``--out`` lock, atomically).

Failure contract: when any rank ends with a non-zero code (an error, a crash, a kill), the
launcher stops the others (SIGTERM, then SIGKILL after a grace period) and prints ONE line:
the failing rank's own ``error:`` line when it had one (bad input fails on every rank alike),
else which rank died and how. Rank 0 writes its report only after the last collective, so a
run that fails leaves no report folder. Each rank's stderr is kept in a temporary file and
rank 0's is shown once the run succeeds (so progress bars appear at the end, not live).

Standard library only: it runs before torch loads.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["launch", "strip_nproc"]

GRACE_S = 10.0  # how long stopped ranks get to clean up before SIGKILL


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the ranks must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error(path: Path) -> str | None:
    """The rank's own one-line ``error: ...`` message, if it printed one."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return errors[-1] if errors else None


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the ranks still running (each by its own pid), then SIGKILL the stragglers."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _blame(failed: dict[int, int], logs: list[Path], nproc: int) -> tuple[str, int]:
    """The one line and exit code for a failed run: the root cause, not its echoes (a rank
    that only saw another rank die says "another rank ... failed")."""
    def rank_order(r: int) -> tuple[int, int]:
        line = _last_error(logs[r]) or ""
        echo = "another rank of this distributed run" in line
        return (0 if failed[r] < 0 else 1 if not echo else 2, r)

    rank = min(failed, key=rank_order)
    code = failed[rank]
    line = _last_error(logs[rank])
    if line is not None and "another rank of this distributed run" not in line:
        return line, code if code > 0 else 1
    return (f"error: rank {rank} of {nproc} {_describe(code)}; the run was stopped and no "
            "report was written", 1)


def launch(argv: list[str], nproc: int) -> int:
    """Run ``interp <argv>`` as ``nproc`` local ranks; return the exit code for the shell."""
    port = _free_port()
    # one rank per core share, as torchrun does (each rank's torch would otherwise use them all)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    with tempfile.TemporaryDirectory(prefix="interp-ranks-") as tmp:
        logs = [Path(tmp) / f"rank{r}.err" for r in range(nproc)]
        procs: list[subprocess.Popen] = []
        try:
            for r in range(nproc):
                env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                           LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), OMP_NUM_THREADS=threads)
                with open(logs[r], "wb") as err:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "analyses.app.cli", *argv], env=env,
                        stdout=None if r == 0 else subprocess.DEVNULL, stderr=err))
            failed: dict[int, int] = {}
            while not failed and any(p.poll() is None for p in procs):
                time.sleep(0.05)
                failed = {r: p.returncode for r, p in enumerate(procs)
                          if p.poll() is not None and p.returncode != 0}
            if failed:
                time.sleep(0.5)  # let the root cause's own exit land before stopping the rest
                failed = {r: p.returncode for r, p in enumerate(procs)
                          if p.poll() is not None and p.returncode != 0}
                _stop(procs)
                line, code = _blame(failed, logs, nproc)
                sys.stderr.write(line + "\n")
                return code
        except KeyboardInterrupt:
            _stop(procs)
            raise
        sys.stderr.write(logs[0].read_text(errors="replace"))
        return 0
