"""``python -m bench`` from the repository root: the same command and options as
``interp bench`` (:mod:`bench.cli`), under the name it was started with."""

from __future__ import annotations

import os

from bench.cli import bench_cmd

if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")  # as the interp entry point: never open a window
    bench_cmd.main(prog_name="python -m bench")
