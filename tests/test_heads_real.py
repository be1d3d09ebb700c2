"""Head taxonomy on real and trained models (slow: they load checkpoints).

- MiniLM (all-MiniLM-L6-v2) on the 20 hand-checked sentences of tests/data: Clark et al.'s best
  heads beat their fixed-offset baselines where the paper's strongest relations are (det, obj),
  and a layer-0 previous-token head exists.
- SmolLM2-135M on repeated random tokens: previous-token and induction heads, first-token sinks.
- The packaged ``induction`` checkpoint (interp train): L0 previous-token and L1 induction heads;
  the four positional variants side by side (skipped until they are packaged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import interp
from analyses import heads as H
from analyses import parses

CONLLU = Path(__file__).parent / "data" / "heads_sentences.conllu"
pytestmark = pytest.mark.slow


def _load(name):
    try:
        return interp.load_pretrained(name)
    except interp.InterpError as e:  # the package that holds the weights is missing
        pytest.skip(str(e))


def _shipped(name):
    try:
        from interp.train import shipped

        return interp.load_pretrained(str(shipped(name)))
    except (ImportError, interp.InterpError) as e:
        pytest.skip(f"packaged checkpoint {name!r} unavailable: {e}")


def test_minilm_syntax_and_delimiters():
    torch.set_num_threads(1)
    model = _load("minilm")
    res = H.analyze(model, sentences=parses.read_conllu(CONLLU), n_random=8, batch_size=10)
    best = res.best_syntax.set_index("relation")
    for rel in ("det", "obj"):
        assert best.loc[rel, "accuracy"] > best.loc[rel, "baseline_accuracy"], best
    assert best.loc["obj", "margin"] >= 0.10
    h = res.heads
    assert ((h["layer"] == 0) & (h["label"] == "previous-token")).any()
    # [CLS] is the first token: the two shares are the same quantity, per layer
    np.testing.assert_allclose(res.layers["cls"], res.layers["sink_first"])
    assert (res.layers["sep"] > 0).all() and (res.layers["punct"] > 0).all()
    assert h["copying"].isna().all()  # no unembedding


def test_smollm2_previous_token_induction_and_sinks():
    torch.set_num_threads(1)
    model = _load("smollm2-135m")
    res = H.analyze(model, n_random=8, half_len=24, batch_size=8, semantic=False)
    h = res.heads
    ind = h[h["label"] == "induction"]
    assert len(ind) >= 2 and ind["layer"].min() >= model.cfg.n_layers // 3, ind
    assert (h["label"] == "previous-token").any()
    assert (ind["copying"] > 0).mean() >= 0.5  # induction heads mostly copy (Olsson et al.)
    # the first token soaks up attention in most layers past the first two (Xiao et al. 2024)
    first = res.layers.set_index("layer")["rand_first"]
    assert (first.iloc[2:] > 0.2).mean() > 0.8, first


def test_trained_induction_model():
    model = _shipped("induction")
    res = H.analyze(model, n_random=32)
    lab = res.heads.groupby("layer")["label"].apply(set)
    assert "previous-token" in lab[0], res.heads
    assert "induction" in lab[1], res.heads


def test_positional_variants_side_by_side():
    from analyses.app.sections.heads import compare_figure

    models = {p: _shipped(f"induction_{p}") for p in ("sinusoidal", "learned", "rope", "alibi")}
    df = H.compare(models, n_random=16)
    assert list(dict.fromkeys(df["model"])) == list(models)
    assert (
        df.groupby("model")
        .size()
        .eq(models["learned"].cfg.n_layers * models["learned"].cfg.n_heads)
        .all()
    )
    assert set(df["positional_encoding"]) == {"sinusoidal", "learned", "rope", "alibi"}
    assert len(compare_figure(df).axes) == 4
