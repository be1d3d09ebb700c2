"""Data-parallel analyses (analyses.distributed, interp --nproc, torchrun).

What is proved here:
- without a process group every helper is the one-process identity;
- two gloo ranks (torch.multiprocessing) reduce running sums exactly, gather in index order,
  and give the one-process head taxonomy (token, induction and Clark et al. syntax scores)
  on parsed sentences split over several batches;
- ``interp --nproc 2`` (and ``torchrun --standalone --nproc-per-node 2``) on the head
  taxonomy, the MoE analysis and the FFN analysis of the shipped small models writes the same
  CSV numbers as one process (counts exactly, floats to 1e-6 relative);
- a rank killed mid-run fails the whole run: exit code != 0, one stderr line, no report.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import interp
from analyses import distributed, parses
from analyses import heads as H
from analyses.app.launch import _blame, strip_nproc

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "interp" / "data"
CONLLU = Path(__file__).parent / "data" / "heads_sentences.conllu"


# --------------------------------------------------------------------------- one process


def test_helpers_are_the_identity_without_a_process_group():
    assert distributed.world() == distributed.World(0, 1)
    assert list(distributed.shard(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert distributed.sum_values([3, 4.5]) == [3, 4.5]
    assert distributed.all_max(7) == 7
    assert distributed.gather_in_order({1: "b", 0: "a"}, 2) == ["a", "b"]
    assert all(distributed.mine(i) for i in range(4))
    with distributed.session() as w:  # WORLD_SIZE unset: nothing to join
        assert w.size == 1


def test_bad_world_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(interp.InterpError, match="WORLD_SIZE must be an integer"):
        distributed.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(interp.InterpError, match="MASTER_ADDR"), distributed.session("cpu"):
        pass


def test_launcher_strips_nproc_and_blames_the_root_cause(tmp_path):
    assert strip_nproc(["--nproc", "2", "heads", "--nproc=3", "x"]) == ["heads", "x"]
    logs = [tmp_path / "0.err", tmp_path / "1.err"]
    logs[0].write_text("error: rank 0: another rank of this distributed run failed or was "
                       "killed (Connection closed by peer).\n")
    logs[1].write_text("")
    line, code = _blame({0: 2, 1: -9}, logs, 2)
    assert line == ("error: rank 1 of 2 was killed by SIGKILL; the run was stopped and no "
                    "report was written") and code == 1
    logs[1].write_text("progress...\nerror: CoNLL-U file not found: x\n")
    assert _blame({0: 2, 1: 2}, logs, 2) == ("error: CoNLL-U file not found: x", 2)


# --------------------------------------------------------------------------- two gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _syntax_model() -> interp.HookedTransformer:
    from transformers import AutoTokenizer

    from interp.loading import builtin_path

    tok = AutoTokenizer.from_pretrained(str(builtin_path("minilm")))
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=tok.vocab_size,
                             n_ctx=128, architecture="encoder", init_std=0.5,
                             has_unembed=False)
    return interp.HookedTransformer(cfg, tokenizer=tok).eval()


def _analyze() -> H.HeadAnalysis:
    sentences = list(parses.read_conllu(CONLLU))
    return H.analyze(_syntax_model(), sentences=sentences, n_random=20, batch_size=3)


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: the library calls under a real gloo group; rank 0 saves what it got."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        class Sums:
            def __init__(self) -> None:
                self.t = torch.arange(4, dtype=torch.float64) * (rank + 1)
                self.c = torch.tensor([rank], dtype=torch.long)
                self.n = rank + 2

        s = Sums()
        distributed.reduce_sums(s, ["t", "c", "n"])
        mine = {i: f"item{i}" for i in range(5) if distributed.mine(i)}
        got = {"t": s.t.tolist(), "c": s.c.tolist(), "n": s.n,
               "max": distributed.all_max(10 * rank + 1),
               "order": distributed.gather_in_order(mine, 5),
               "shard": list(distributed.shard(iter(range(5))))}
        res = _analyze()
        if rank == 0:
            pd.to_pickle((got, res.heads, res.syntax, res.info), out)
    finally:
        torch.distributed.destroy_process_group()


def _close(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same frame: integer and string columns exactly, floats to 1e-6 relative."""
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-12, equal_nan=True, err_msg=c)
        else:
            assert (a[c].fillna("").astype(str) == b[c].fillna("").astype(str)).all(), c


@pytest.mark.slow  # two spawned ranks importing torch and a tokenizer: ~30 s on 2 cores
def test_two_gloo_ranks_reduce_exactly_and_match_one_process(tmp_path):
    pytest.importorskip("transformers")
    try:
        one = _analyze()
    except interp.InterpError as e:  # no packaged MiniLM tokenizer
        pytest.skip(str(e))
    out = tmp_path / "rank0.pkl"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    got, heads, syntax, info = pd.read_pickle(out)
    assert got["t"] == [0.0, 3.0, 6.0, 9.0] and got["c"] == [1] and got["n"] == 5
    assert got["max"] == 11 and got["order"] == [f"item{i}" for i in range(5)]
    assert got["shard"] == [0, 2, 4]  # rank 0's round-robin share
    assert len(one.syntax) and one.info["n_pairs"] > 0
    _close(one.heads, heads)
    _close(one.syntax, syntax)
    assert info == one.info  # token, sequence and pair counts summed over the ranks exactly


# --------------------------------------------------------------------------- the command line


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", **env)
    return subprocess.run([sys.executable, "-m", "analyses.app.cli", *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=900)


def _same_csvs(one: Path, two: Path) -> list[str]:
    names = sorted(p.name for p in (one / "data").glob("*.csv"))
    assert names and names == sorted(p.name for p in (two / "data").glob("*.csv"))
    for name in names:
        _close(pd.read_csv(one / "data" / name), pd.read_csv(two / "data" / name))
    return names


CASES = {
    "heads": ["heads", str(DATA / "induction.pt"), "--n-random", "24", "--batch-size", "4"],
    "moe": ["moe", str(DATA / "domains_moe.pt"), "--n-perm", "9", "--ablation-tokens", "128",
            "--max-tokens", "1024"],
    "ffn": ["ffn", str(DATA / "knowledge.pt"), "--max-facts", "3", "--samples", "2",
            "--ig-steps", "2", "--kv-layers", "0,1", "--top-k", "3", "--max-tokens", "256"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(CASES))
def test_nproc_2_writes_the_one_process_numbers(tmp_path, command):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run([*CASES[command], "--out", str(one), "-q"])
    assert r1.returncode == 0, r1.stderr
    r2 = _run(["--nproc", "2", *CASES[command], "--out", str(two), "-q"])
    assert r2.returncode == 0, r2.stderr
    names = _same_csvs(one, two)
    assert {"heads": "heads.csv", "moe": "moe_summary.csv",
            "ffn": "causal_trace.csv"}[command] in names
    if command == "ffn":  # what the ranks shard: facts, lens batches, key-value memory layers
        assert {"knowledge_neurons.csv", "logit_lens.csv", "kv_memories.csv",
                "kv_agreement.csv"} <= set(names)
        assert set(pd.read_csv(two / "data" / "kv_memories.csv")["layer"]) == {0, 1}


@pytest.mark.slow
def test_torchrun_writes_the_one_process_numbers(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run([*CASES["heads"], "--out", str(one), "-q"]).returncode == 0
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m",
                        "analyses.app.cli", *CASES["heads"], "--out", str(two), "-q"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    _same_csvs(one, two)


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_rank_fails_the_run_cleanly(tmp_path, killed):
    out = tmp_path / "report"
    r = _run(["--nproc", "2", *CASES["heads"], "--out", str(out), "-q"],
             INTERP_TEST_KILL_RANK=str(killed))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: rank {killed} of 2 was killed by SIGKILL; the run was stopped and "
                     "no report was written"], r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temporary report folder
    # the --out lock is free again: a normal run on the same folder succeeds
    assert _run([*CASES["heads"], "--out", str(out), "-q"]).returncode == 0


@pytest.mark.slow
def test_bad_input_under_nproc_is_the_ranks_own_one_line(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    r = _run(["--nproc", "2", *CASES["heads"], "--out", str(out), "-q"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {out} already exists; use --force to replace it"], r.stderr
    assert not any(out.iterdir())
