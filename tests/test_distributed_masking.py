"""``interp masking`` and ``interp report`` on several ranks (analyses.distributed).

What is proved here:
- the masking measurements split their work into disjoint shares that add up to the
  one-process sums exactly (strategies by (batch, strategy) pair, importance by batch,
  ablation by (batch, head) pair): checked in one process by posing as rank 0 and rank 1 of 2
  and recording what each would send to ``all_reduce``;
- two real gloo ranks give the one-process tables of every masking function (strategies with
  token masking, head and expert importance, ablation, pruning curves, the exact 5% count);
- ``interp --nproc 2 masking`` and ``interp --nproc 2 report`` on the shipped induction model
  write the one-process CSVs (counts exactly, floats to 1e-6 relative) and the same findings;
- a rank killed during ``interp masking`` fails the run with one line and writes nothing.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import interp
from analyses import distributed
from analyses import masking as M

ROOT = Path(__file__).resolve().parents[1]
INDUCTION = str(ROOT / "interp" / "data" / "induction.pt")


def _tiny(seed: int = 0, **kw: Any) -> interp.HookedTransformer:
    torch.manual_seed(seed)
    base = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=64, n_ctx=32, init_std=0.2)
    base.update(kw)
    return interp.HookedTransformer(interp.ModelConfig(**base)).eval()


def _batches(n: int = 3, b: int = 2, t: int = 10, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (b, t), generator=g) for _ in range(n)]


def _close(a: pd.DataFrame, b: pd.DataFrame, what: str = "") -> None:
    """Same frame: non-float columns exactly, floats to 1e-6 relative."""
    assert list(a.columns) == list(b.columns) and a.shape == b.shape, what
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-12, equal_nan=True,
                                       err_msg=f"{what}.{c}")
        else:
            assert (a[c].fillna("").astype(str) == b[c].fillna("").astype(str)).all(), (what, c)


# --------------------------------------------------------------------------- shares add up


def _recorded(monkeypatch: pytest.MonkeyPatch, rank: int, size: int, run: Any) -> list[dict]:
    """What ``run()`` hands to ``reduce_sums`` when posing as ``rank`` of ``size`` (the
    collective itself is left out, so each record is that rank's own share)."""
    got: list[dict] = []

    def record(obj: object, names: Any) -> None:
        got.append({n: copy.deepcopy(getattr(obj, n)) for n in names})

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank, size))
    monkeypatch.setattr(distributed, "reduce_sums", record)
    try:
        run()
    except ZeroDivisionError:  # a share's own counts can be 0 (a strategy run on the other
        assert size > 1        # rank): the means after the reduction are not this test's
    monkeypatch.undo()
    return got


def _as_float(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.double()
    return torch.tensor(float(v), dtype=torch.float64)


def _check_shares_add_up(monkeypatch: pytest.MonkeyPatch, run: Any) -> int:
    """Rank 0's and rank 1's recorded sums add up to the one-process sums, name by name;
    both ranks did some of the work. Returns how many sums were checked."""
    whole = _recorded(monkeypatch, 0, 1, run)
    r0, r1 = _recorded(monkeypatch, 0, 2, run), _recorded(monkeypatch, 1, 2, run)
    assert len(whole) == len(r0) == len(r1) > 0
    for w, a, b in zip(whole, r0, r1, strict=True):
        assert w.keys() == a.keys() == b.keys()
        for name in w:
            total = _as_float(a[name]) + _as_float(b[name])
            single = getattr(w[name], "dtype", None) == torch.float32  # gate grads: float32
            torch.testing.assert_close(total, _as_float(w[name]), rtol=1e-5 if single else 1e-9,
                                       atol=1e-7 if single else 1e-12, msg=name)
    worked = [any(bool((_as_float(v) != 0).any()) for rec in r for v in rec.values())
              for r in (r0, r1)]
    assert all(worked), "one rank did nothing"
    return sum(len(w) for w in whole)


def test_masking_shares_are_disjoint_and_add_up_to_one_process(monkeypatch):
    torch.set_num_threads(1)
    model = _tiny()
    batches = _batches()
    strategies = M.parse_strategies(["bidirectional", "sliding_window:3", "token_mask:0.3",
                                     "soft:2"], model.cfg.mask, 10)
    lbs = M.loss_batches(model, batches)
    n = _check_shares_add_up(monkeypatch,
                             lambda: M.compare_strategies(model, batches, strategies, seed=3))
    assert n == len(strategies) * 11  # every running sum of every strategy
    _check_shares_add_up(monkeypatch, lambda: M.head_importance(model, lbs))
    _check_shares_add_up(monkeypatch, lambda: M.head_means(model, lbs))
    # mean ablation replaces a head by the corpus mean, which needs the reduced head_means
    _check_shares_add_up(monkeypatch, lambda: M.head_ablation(model, lbs, mean_ablation=False))


def test_shards_of_work_cover_every_item_once(monkeypatch):
    """The round-robin that every masking loop uses: each index on exactly one rank."""
    owners = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda r=rank: distributed.World(r, 3))
        owners.append({i for i in range(10) if distributed.mine(i)})
    assert set().union(*owners) == set(range(10))
    assert sum(len(o) for o in owners) == 10


# --------------------------------------------------------------------------- two gloo ranks


def _moe() -> interp.HookedTransformer:
    return _tiny(seed=2, n_experts=4, experts_per_token=2)


def _everything() -> dict[str, Any]:
    """Every masking measurement on tiny models, with a pruning bracket wide enough that the
    exact 5% count needs the one-at-a-time search."""
    torch.manual_seed(0)
    model, moe = _tiny(), _moe()
    batches = _batches(n=3)
    strategies = M.parse_strategies(["bidirectional", "token_mask:0.3", "soft:2", "soft:8"],
                                    model.cfg.mask, 10)
    table, heads = M.compare_strategies(model, batches, strategies, seed=3)
    lbs = M.loss_batches(model, batches)
    imp = M.head_importance(model, lbs)
    abl = M.head_ablation(model, lbs)
    curve = M.head_pruning_curves(model, lbs, imp, steps=1, n_random=2, seed=5)
    removable = [M.max_removable(model, lbs, imp, curve, tolerance=t)
                 for t in (0.0, 0.002, 0.01, 0.05)]
    mlbs = M.loss_batches(moe, batches)
    eimp = M.expert_importance(moe, mlbs)
    eabl = M.expert_ablation(moe, mlbs)
    ecurve = M.expert_pruning_curves(moe, mlbs, eimp, steps=3, n_random=1)
    return {"table": table, "heads": heads, "imp": imp, "abl": abl, "curve": curve,
            "removable": removable, "eimp": eimp, "eabl": eabl, "ecurve": ecurve}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        got = _everything()
        if rank == 0:
            pd.to_pickle(got, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned ranks importing torch: ~20-40 s on 2 loaded cores
def test_two_gloo_ranks_give_the_one_process_masking_tables(tmp_path):
    from tests.test_distributed import _free_port

    torch.set_num_threads(1)
    one = _everything()
    out = tmp_path / "rank0.pkl"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    two = pd.read_pickle(out)
    assert two["removable"] == one["removable"]
    assert len(set(one["removable"])) > 1  # the tolerances give different counts
    for key, frame in one.items():
        if isinstance(frame, pd.DataFrame):
            _close(frame, two[key], key)


# --------------------------------------------------------------------------- the command line


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", **env)
    return subprocess.run([sys.executable, "-m", "analyses.app.cli", *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=900)


def _same_report(one: Path, two: Path) -> list[str]:
    """The same CSVs (floats to 1e-6) and the same findings' numbers in index.md."""
    names = sorted(p.name for p in (one / "data").glob("*.csv"))
    assert names and names == sorted(p.name for p in (two / "data").glob("*.csv"))
    for name in names:
        _close(pd.read_csv(one / "data" / name), pd.read_csv(two / "data" / name), name)
    removable = re.compile(r"\d+ of \d+ heads \(\d+%\) can be removed")
    found = [removable.findall((d / "index.md").read_text()) for d in (one, two)]
    assert found[0] and found[0] == found[1]
    return names


MASKING = ["masking", INDUCTION, "--max-tokens", "128", "--batch-size", "2",
           "--pruning-steps", "3", "--random-orders", "2"]


@pytest.mark.slow  # two runs, each ~15-30 s on 2 loaded cores
def test_nproc_2_masking_writes_the_one_process_numbers(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run([*MASKING, "--out", str(one), "-q"])
    assert r1.returncode == 0, r1.stderr
    r2 = _run(["--nproc", "2", *MASKING, "--out", str(two), "-q"])
    assert r2.returncode == 0, r2.stderr
    names = _same_report(one, two)
    assert {"mask_strategies.csv", "head_importance.csv", "pruning_curve.csv"} <= set(names)


@pytest.mark.slow  # heads and masking sections, twice: ~1 min on 2 loaded cores
def test_nproc_2_report_writes_the_one_process_numbers(tmp_path):
    args = ["report", INDUCTION, "--only", "heads", "--only", "masking", "--max-tokens", "128",
            "--batch-size", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run([*args, "--out", str(one), "-q"])
    assert r1.returncode == 0, r1.stderr
    r2 = _run(["--nproc", "2", *args, "--out", str(two), "-q"])
    assert r2.returncode == 0, r2.stderr
    names = _same_report(one, two)
    assert {"heads.csv", "mask_strategies.csv", "head_importance.csv"} <= set(names)


@pytest.mark.slow
def test_a_killed_rank_fails_masking_cleanly(tmp_path):
    out = tmp_path / "report"
    r = _run(["--nproc", "2", *MASKING, "--out", str(out), "-q"], INTERP_TEST_KILL_RANK="1")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "error: rank 1 of 2 was killed by SIGKILL; the run was stopped and no report was "
        "written"], r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
