"""The shipped retrieval model (interp/data/retrieval_knn.pt, cosine kNN search, top-32): the
answer lies segments before the query, beyond the local window; the kNN memory finds it far
above chance (not yet the 90% issue 22 asks for: 0.44-0.45, see notes/memory.md), the memory
analysis names the heads that retrieve it, and cutting their memory access drops accuracy to
near chance.

"Near chance" is at most twice chance (2/16 = 0.125): 128 documents hold 512 memory queries,
so a model at chance scores 0.0625 +- 0.011 (one s.d.) and 0.125 is ~6 s.d. above it, while the
intact model is ~30 s.d. above; the retrieving heads cut together give 0.11 (512 documents)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import interp
from interp.train import shipped, task_from, train

NAMES = ["retrieval_knn"]  # retrieval_xl is not shipped: it stays near chance


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return interp.load_pretrained(str(shipped(request.param))).eval()


def test_memory_model_beats_chance_and_the_reset_memory_is_chance(model) -> None:
    task = task_from(model)
    assert task.name == "retrieval"
    out = task.evaluate(model, batch_size=128)
    assert out["accuracy"] >= 0.4 >= 5 * out["chance"], out
    assert len(model.memory) == 0  # evaluate leaves the memory empty
    batch = task.eval_batch(128, torch.Generator().manual_seed(7))
    L = task.params["segment_len"]
    model.memory.reset()
    alone = task.score(model(batch.tokens[:, -L:]), batch.labels[:, -L:])  # no earlier segment
    model.memory.reset()
    assert alone["accuracy"] <= 2 * out["chance"], alone


def test_analysis_names_retrieving_heads_and_their_ablation_is_chance(model) -> None:
    from analyses.memory import analyse_memory

    res = analyse_memory(model, n_docs=128, batch_size=64)
    acc = res.accuracy.set_index("condition").accuracy
    chance = acc["chance (1 / n_values)"]
    assert acc["memory intact"] >= 0.4
    assert 0 < len(res.retrieving_heads) < model.cfg.n_heads, res.heads
    assert acc["retrieving heads' memory ablated"] <= 2 * chance, res.accuracy  # near chance
    assert acc["every memory head ablated"] <= 2 * chance
    assert acc["memory reset (last segment alone)"] <= 2 * chance
    heads = res.heads.set_index(["layer", "head"])
    for lh in res.retrieving_heads:  # each one's memory access matters on its own
        assert heads.loc[lh, "acc_drop"] > 0.05
    assert res.retrieved.is_target.any() and not res.retrieved.is_target.all()
    assert len(model.memory) == 0


def test_cli_memory_writes_the_report(tmp_path) -> None:
    from click.testing import CliRunner

    from analyses.app.cli import cli

    out = tmp_path / "mem"
    res = CliRunner().invoke(cli, ["memory", "interp/data/retrieval_knn.pt", "--n-docs", "32",
                                   "--batch-size", "32", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    heads = pd.read_csv(out / "data" / "memory_heads.csv")
    assert {"memory_share_query", "acc_drop", "retrieving"} <= set(heads.columns)
    assert "Retrieving heads: L1H" in (out / "index.md").read_text()
    bad = CliRunner().invoke(cli, ["memory", "interp/data/induction.pt", "--out",
                                   str(tmp_path / "bad"), "--quiet"])
    assert bad.exit_code == 2 and "no memory" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_same_model_without_memory_stays_near_chance() -> None:
    """The retrieval recipe with memory_kind=None (each segment on its own) cannot beat
    guessing at the memory queries, while it does learn the local pairs."""
    model, _, metrics = train("retrieval", {"memory_kind": None}, steps=600, seed=0,
                              quiet=True, save_optimizer=False)
    assert metrics["accuracy"] <= metrics["chance"] + 0.08, metrics
