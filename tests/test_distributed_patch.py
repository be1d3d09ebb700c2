"""``interp patch`` and the report's patch section on several ranks (analyses.distributed).

What is proved here:
- the pair batches split into disjoint round-robin shares that cover every batch, and the
  per-site sums each rank hands to the merge add up to the one-process sums, both ranks
  working (checked in one process by posing as rank 0 and rank 1 of 2);
- :class:`~analyses.circuits.patching.SiteSums` merges the ranks' tables in the one-process
  site order even where a site (a position only longer pairs have) first appears on rank 1;
- two real gloo ranks give the one-process tables of activation patching (heads, residual
  stream by position on pairs of three lengths), attribution patching, path patching, edge
  attribution patching and both direct logit attributions, rows in the same order;
- ``interp --nproc 2 patch`` and ``interp --nproc 2 report --only patch`` on the shipped
  induction model write the one-process CSVs (counts exactly, floats to 1e-6 relative);
- a rank killed at its first reduction during ``interp patch`` fails the run with one line and
  writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import interp
from analyses import distributed
from analyses.circuits.attribution import attribution_patching, edge_attribution_patching
from analyses.circuits.dla import direct_logit_attribution, dla_by_source_position
from analyses.circuits.pairs import PromptPairs
from analyses.circuits.patching import SiteSums, activation_patching, my_batches
from analyses.circuits.path_patching import path_patching
from tests.test_distributed import _free_port, _run, _same_csvs

ROOT = Path(__file__).resolve().parents[1]
INDUCTION = str(ROOT / "interp" / "data" / "induction.pt")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster than two fighting over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model() -> interp.HookedTransformer:
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=3, d_model=32, n_heads=4, d_vocab=40, n_ctx=16)
    model = interp.HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _pairs() -> PromptPairs:
    """Pairs of three lengths (2 of 9 tokens, 2 of 10, 3 of 11) differing from position 5 on:
    at batch_size 2, batches 0 (length 9) and 2 (11) are rank 0's, 1 (10) and 3 (11) rank
    1's, so position 9 first appears on rank 1 and position 10 on rank 0, after rank 0 has
    already met position 9 itself: the one-process site order has to be rebuilt."""
    g = torch.Generator().manual_seed(1)
    clean, corr = [], []
    for T, n in ((9, 2), (10, 2), (11, 3)):
        for _ in range(n):
            c = torch.randint(0, 40, (T,), generator=g)
            k = c.clone()
            k[5:7] = (c[5:7] + 1 + torch.randint(0, 38, (2,), generator=g)) % 40
            clean.append(c)
            corr.append(k)
    return PromptPairs(tuple(clean), tuple(corr), torch.randint(0, 40, (7,), generator=g),
                       torch.randint(0, 40, (7,), generator=g))


def _pose(monkeypatch: pytest.MonkeyPatch, rank: int, size: int) -> None:
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank, size))


# --------------------------------------------------------------------------- shares add up


def test_pair_batches_split_into_disjoint_shares_that_cover_every_batch(monkeypatch):
    pairs = _pairs()
    n = len(list(pairs.batches(2)))
    shares = []
    for rank in range(3):
        _pose(monkeypatch, rank, 3)
        shares.append([i for i, _ in my_batches(pairs, 2)])
    assert n == 4 and sorted(sum(shares, [])) == list(range(n))
    assert shares == [[0, 3], [1], [2]]  # round-robin: batch i belongs to rank i % size


def _site_shares(monkeypatch: pytest.MonkeyPatch, rank: int, size: int, run: Any,
                 ) -> tuple[dict, list[float]]:
    """The site sums (what :meth:`SiteSums.merged` gathers) and the baseline sums (what
    ``reduce_sums`` adds) that ``run()`` produces posing as ``rank`` of ``size``, the
    collectives left out."""
    sites: dict = {}
    base: list[float] = []

    def gather(obj: Any) -> list:
        sites.update(obj[0])
        return [obj]

    def reduce(obj: Any, names: Any) -> None:
        base.extend(float(getattr(obj, n)) for n in names)

    _pose(monkeypatch, rank, size)
    monkeypatch.setattr(distributed, "gather_objects", gather)
    monkeypatch.setattr(distributed, "reduce_sums", reduce)
    run()
    monkeypatch.undo()
    return sites, base


@pytest.mark.parametrize("what", ["head", "resid_pre"])
@pytest.mark.parametrize("method", ["activation", "attribution"])
def test_site_shares_add_up_to_the_one_process_sums(monkeypatch, method, what):
    model, pairs = _model(), _pairs()
    fn = activation_patching if method == "activation" else attribution_patching
    run = lambda: fn(model, pairs, what, batch_size=2)  # noqa: E731
    whole, base = _site_shares(monkeypatch, 0, 1, run)
    (s0, b0), (s1, b1) = (_site_shares(monkeypatch, r, 2, run) for r in (0, 1))
    assert s0 and s1 and s0.keys() == s1.keys() == whole.keys()
    if what == "resid_pre":  # each rank meets positions 9 and 10 in another order
        assert list(s0) != list(whole) and list(s1) != list(whole)
    for key, value in whole.items():
        assert s0.get(key, 0.0) + s1.get(key, 0.0) == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert [a + b for a, b in zip(b0, b1, strict=True)] == pytest.approx(base, rel=1e-9)
    assert b0[2] == 4 and b1[2] == 3  # pair counts: batches 0 and 2, 1 and 3


def test_site_sums_merge_in_the_one_process_order(monkeypatch):
    """Rank 1 meets position 9 (batch 1) before rank 0 meets position 8 (batch 2): the merged
    table still lists the sites as one process adds them."""
    one, ranks = SiteSums(), [SiteSums(), SiteSums()]
    batches = [[0, 1], [0, 1, 9], [8, 0], [9, 1]]
    for b, positions in enumerate(batches):
        for pos in positions:
            for acc in (one, ranks[b % 2]):
                acc.add(b, ("h", pos), {"pos": pos}, float(10 * b + pos))
    monkeypatch.setattr(distributed, "gather_objects",
                        lambda obj: [(r.sums, r.labels, r.first) for r in ranks])
    merged = ranks[1].merged()
    monkeypatch.undo()
    assert merged == [({"pos": p}, v) for p, v in [(0, 30.0), (1, 43.0), (9, 58.0), (8, 28.0)]]
    assert one.merged() == merged == [(one.labels[k], v) for k, v in one.sums.items()]


# --------------------------------------------------------------------------- two gloo ranks


def _everything() -> dict[str, Any]:
    """Every circuits table on the tiny model and the two-length pairs, with the shares each
    rank took."""
    model, pairs = _model(), _pairs()
    out = {"head": activation_patching(model, pairs, "head", batch_size=2),
           "resid": activation_patching(model, pairs, "resid_pre", batch_size=2),
           "attr": attribution_patching(model, pairs, "head", batch_size=2),
           "path": path_patching(model, pairs, ["L2H0.k", "L2H1.q"], batch_size=2),
           "edges": edge_attribution_patching(model, pairs, batch_size=2),
           "dla": direct_logit_attribution(model, pairs, batch_size=2),
           "dla_pos": dla_by_source_position(model, pairs, batch_size=2)}
    out["attrs"] = {k: dict(v.attrs) for k, v in out.items()}
    out["shares"] = distributed.gather_objects([i for i, _ in my_batches(pairs, 2)])
    return out


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


@pytest.mark.slow  # two spawned ranks importing torch: ~15-30 s on 2 loaded cores
def test_two_gloo_ranks_give_the_one_process_circuit_tables(tmp_path):
    one = _everything()
    out = tmp_path / "rank0.pkl"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    two = pd.read_pickle(out)
    assert two["shares"] == [[0, 2], [1, 3]]
    assert set(one["resid"]["pos"]) == set(range(11))
    for key, frame in one.items():
        if isinstance(frame, pd.DataFrame):
            # same columns, dtypes and row order; labels exactly, floats to 1e-6 relative
            pd.testing.assert_frame_equal(two[key], frame, rtol=1e-6, atol=1e-12, obj=key)
            for name, value in one["attrs"][key].items():  # clean, corrupted, n_pairs, ...
                got = two["attrs"][key][name]
                assert got == (pytest.approx(value, rel=1e-9) if isinstance(value, float)
                               else value), (key, name)


# --------------------------------------------------------------------------- the command line


PATCH = ["patch", INDUCTION, "--pairs", "24", "--batch-size", "4"]


@pytest.mark.slow  # two runs, each ~15-40 s on 2 loaded cores
def test_nproc_2_patch_writes_the_one_process_numbers(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run([*PATCH, "--out", str(one), "-q"])
    assert r1.returncode == 0, r1.stderr
    r2 = _run(["--nproc", "2", *PATCH, "--out", str(two), "-q"])
    assert r2.returncode == 0, r2.stderr
    names = _same_csvs(one, two)
    assert {"patch_baseline.csv", "patch_heads.csv", "patch_dla.csv", "patch_path.csv",
            "patch_resid.csv"} <= set(names)
    assert int(pd.read_csv(two / "data" / "patch_baseline.csv")["n_pairs"].iloc[0]) == 24


@pytest.mark.slow  # the patch section (48 pairs) twice: ~1 min on 2 loaded cores
def test_nproc_2_report_patch_section_writes_the_one_process_numbers(tmp_path):
    args = ["report", INDUCTION, "--only", "patch", "--batch-size", "8"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run([*args, "--out", str(one), "-q"])
    assert r1.returncode == 0, r1.stderr
    r2 = _run(["--nproc", "2", *args, "--out", str(two), "-q"])
    assert r2.returncode == 0, r2.stderr
    names = _same_csvs(one, two)
    assert {"patch_heads.csv", "patch_resid.csv", "patch_path.csv"} <= set(names)
    findings = [(d / "index.md").read_text().split("Heads whose patching")[1][:200]
                for d in (one, two)]
    assert findings[0] == findings[1]  # the same top heads, read from the reduced table


@pytest.mark.slow  # one 2-rank run stopped at its first reduction: ~20-40 s on 2 loaded cores
def test_a_killed_rank_fails_patch_cleanly(tmp_path):
    out = tmp_path / "report"
    r = _run(["--nproc", "2", *PATCH, "--out", str(out), "-q"], INTERP_TEST_KILL_RANK="1")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "error: rank 1 of 2 was killed by SIGKILL; the run was stopped and no report was "
        "written"], r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
