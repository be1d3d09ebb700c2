"""The shipped retrieval models (interp/data/retrieval_knn.pt: a kNN store on layer 1 in one
softmax with the context, top-32, T5 positions, layer 0 a 2-token sliding window; retrieval_xl.pt:
Transformer-XL / compressive memory on every layer): the answer lies segments before the query,
beyond the local window; both reach issue 22's 90% (the kNN model 1.000, the XL model 0.992 on
the eval seed; the kNN recipe gets there on 2 of 5 seeds, see notes/memory.md); the memory
analysis names the heads that retrieve it, and cutting their memory access drops accuracy to
near chance.

"Near chance" is at most twice chance (2/16 = 0.125) in the tests shared by both models: 128
documents hold 512 memory queries, so a model at chance scores 0.0625 +- 0.011 (one s.d.) and
0.125 is ~6 s.d. above it; the tighter chance + 0.05 (NEAR) applies where a model is at >= 90%."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import interp
from interp.train import shipped, task_from, train

NAMES = ["retrieval_knn", "retrieval_xl"]
# "Near chance" in the >= 90% models' own tests is chance + 0.05: at chance (1/16) the 1024 (or
# 512) scored queries have a binomial standard deviation of 0.008 (0.011), so 0.05 is > 4
# deviations, yet under 5% of a trained model's gain over chance (0.99 - 0.06): a cut that left
# a real fraction of the retrieval working would fail it.
NEAR = 0.05


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return interp.load_pretrained(str(shipped(request.param))).eval()


def test_memory_model_beats_chance_and_the_reset_memory_is_chance(model) -> None:
    task = task_from(model)
    assert task.name == "retrieval"
    out = task.evaluate(model, batch_size=128)
    assert out["accuracy"] >= 0.9 >= 5 * out["chance"], out
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
    assert acc["memory intact"] >= 0.9
    assert 0 < len(res.retrieving_heads) < len(res.heads), res.heads  # not every memory head
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
    """retrieval_knn's recipe (T5 positions, layer 0 a 2-token sliding window) with
    memory_kind=None, each segment on its own, cannot beat guessing at the memory queries
    (0.0625 after 600 steps, 0.068 after the full 3000)."""
    cfg = {"positional": "relative", "layer_types": ["sliding", "global"], "sliding_window": 2,
           "memory_kind": None}
    model, _, metrics = train("retrieval", cfg, steps=600, seed=0, quiet=True,
                              save_optimizer=False)
    assert metrics["accuracy"] <= metrics["chance"] + 0.08, metrics


# --- retrieval_knn: issue 22's >= 90% with a kNN store (Memorizing Transformers) ---


@pytest.fixture(scope="module")
def knn():
    return interp.load_pretrained(str(shipped("retrieval_knn"))).eval()


def test_knn_model_reaches_90_percent_through_previous_token_heads_and_one_memory_head(
        knn) -> None:
    """Layer 0 sees 2 tokens (a sliding window): its previous-token heads write the value into
    the stored key's state; a layer-1 head finds the query key's stored occurrence in the kNN
    store (its top entry for most queries) and reads the value there; cutting that head's memory
    access alone leaves a guess."""
    from analyses.memory import analyse_memory

    task = task_from(knn)
    out = task.evaluate(knn, batch_size=256)  # the eval seed's 1024 memory queries
    assert out["accuracy"] >= 0.9, out
    res = analyse_memory(knn, n_docs=128, batch_size=64)
    acc = res.accuracy.set_index("condition").accuracy
    chance = acc["chance (1 / n_values)"]
    assert res.retrieving_heads and {la for la, _ in res.retrieving_heads} == {1}, res.heads
    assert acc["retrieving heads' memory ablated"] <= chance + NEAR, res.accuracy
    heads = res.heads.set_index(["layer", "head"])
    assert (heads.loc[res.retrieving_heads, "top1_target"] >= 0.5).all(), res.heads
    L, n_keys = task.params["segment_len"], task.params["n_keys"]
    seg0 = task.eval_batch(32, torch.Generator().manual_seed(5)).tokens[:, :L]
    knn.memory.reset()
    _, cache = knn.run_with_cache(seg0, names_filter=lambda n: n == "blocks.0.attn.hook_pattern")
    knn.memory.reset()
    prev = cache["blocks.0.attn.hook_pattern"].diagonal(-1, 2, 3)  # [batch, head, L-1]: q on q-1
    at_keys = prev.permute(1, 0, 2)[:, seg0[:, 1:] < n_keys]  # [head, stored keys]
    assert at_keys.mean(1).max() >= 0.9, at_keys.mean(1)  # a previous-token head in layer 0


# --- retrieval_xl: issue 22's >= 90% (Transformer-XL + compressive memory on every layer) ---


@pytest.fixture(scope="module")
def xl():
    return interp.load_pretrained(str(shipped("retrieval_xl"))).eval()


def test_xl_model_reaches_90_percent_and_its_reset_memory_is_chance(xl) -> None:
    task = task_from(xl)
    out = task.evaluate(xl, batch_size=256)  # the eval seed's 1024 memory queries
    assert out["accuracy"] >= 0.9, out
    batch = task.eval_batch(256, torch.Generator().manual_seed(7))
    L = task.params["segment_len"]
    xl.memory.reset()
    alone = task.score(xl(batch.tokens[:, -L:]), batch.labels[:, -L:])  # no earlier segment
    xl.memory.reset()
    assert alone["accuracy"] <= out["chance"] + NEAR, alone


def test_xl_analysis_names_layer0_heads_and_cutting_them_is_chance(xl, tmp_path) -> None:
    """Layer 0's memory holds the pooled (value, key) embeddings of segment 0: its heads find
    the query key's token there (top entry the stored pair for most queries); cutting their
    memory access alone leaves a guess, while cutting layer 1's memory costs nothing."""
    from click.testing import CliRunner

    from analyses.app.cli import cli
    from analyses.memory import _hooks, _Run, analyse_memory

    res = analyse_memory(xl, n_docs=128, batch_size=64)
    acc = res.accuracy.set_index("condition").accuracy
    chance = acc["chance (1 / n_values)"]
    assert acc["memory intact"] >= 0.9
    assert res.retrieving_heads and {la for la, _ in res.retrieving_heads} == {0}, res.heads
    assert acc["retrieving heads' memory ablated"] <= chance + NEAR, res.accuracy
    heads = res.heads.set_index(["layer", "head"])
    assert (heads.loc[res.retrieving_heads, "top1_target"] >= 0.5).all(), res.heads
    task = task_from(xl)
    batch = task.eval_batch(128, torch.Generator().manual_seed(3))
    run = _Run(xl, task, batch.tokens, batch.labels)
    hit, n = run.correct(_hooks("xl", [(1, h) for h in range(xl.cfg.n_heads)]))
    assert hit / n >= 0.9  # layer 1's memory is not where the answer comes from
    xl.memory.reset()
    out = tmp_path / "mem_xl"
    cli_res = CliRunner().invoke(cli, ["memory", "interp/data/retrieval_xl.pt", "--n-docs", "32",
                                       "--batch-size", "32", "--out", str(out), "--quiet"])
    assert cli_res.exit_code == 0, (cli_res.output, cli_res.exception)
    assert "Retrieving heads: L0H" in (out / "index.md").read_text()


@pytest.mark.slow
def test_the_xl_recipe_without_memory_stays_near_chance() -> None:
    """retrieval_xl's recipe (T5 positions, 2000 steps) with memory_kind=None: each segment
    on its own cannot beat guessing at the memory queries."""
    _, _, metrics = train("retrieval", {"positional": "relative", "memory_kind": None},
                          steps=2000, seed=0, quiet=True, save_optimizer=False)
    assert metrics["accuracy"] <= metrics["chance"] + NEAR, metrics
