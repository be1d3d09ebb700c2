"""Circuit analyses (analyses.circuits): activation, attribution and path patching, DLA.

Ground truth first: on the shipped induction model (2 attention-only layers trained on
``[BOS] x1..xn x1..xn``) the head taxonomy (analyses.heads) names a layer-0 previous-token head
and layer-1 induction heads; patching must find exactly those, path patching the
previous-token -> induction K-composition, and attribution patching must agree with activation
patching (Pearson >= 0.9 on heads, as Syed et al. 2023 report). Exact identities are checked
on small random models: batched = unbatched, streamed = one batch, path patching through every
receiver = activation patching, edge attributions summed over receivers = node attribution,
DLA sums to the logit difference. SmolLM2 on IOI is slow-marked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp
from analyses.circuits.attribution import attribution_patching, edge_attribution_patching
from analyses.circuits.dla import direct_logit_attribution, dla_by_source_position
from analyses.circuits.pairs import PromptPairs, induction_pairs
from analyses.circuits.patching import activation_patching, baseline
from analyses.circuits.path_patching import path_patching

LLAMA_STYLE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16, norm="rmsnorm",
                   act="swiglu", n_kv_heads=2, positional="rope", tie_embeddings=True,
                   attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False)


@pytest.fixture(scope="module")
def induction():
    from interp.train import shipped

    torch.set_num_threads(1)
    return interp.load_pretrained(str(shipped("induction")))


@pytest.fixture(scope="module")
def taxonomy(induction):
    from analyses import heads as H

    labels = H.analyze(induction, n_random=16).heads.set_index(["layer", "head"])["label"]
    return labels


@pytest.fixture(scope="module")
def ind_pairs():
    return induction_pairs(48, seed=1)


@pytest.fixture(scope="module")
def head_patch(induction, ind_pairs):
    return activation_patching(induction, ind_pairs, "head", batch_size=16)


def _tiny(seed: int = 0) -> interp.HookedTransformer:
    torch.manual_seed(seed)
    model = interp.HookedTransformer(interp.ModelConfig(**LLAMA_STYLE))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _tiny_pairs(n: int = 6, T: int = 7, seed: int = 0) -> PromptPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (n, T), generator=g)
    corr = clean.clone()
    corr[:, 2] = torch.randint(0, 50, (n,), generator=g)
    return PromptPairs(tuple(clean), tuple(corr), torch.randint(0, 50, (n,), generator=g),
                       torch.randint(0, 50, (n,), generator=g))


def test_patching_finds_the_taxonomys_previous_token_and_induction_heads(head_patch, taxonomy):
    clean, corr = head_patch.attrs["clean"], head_patch.attrs["corrupted"]
    assert clean > corr + 3, (clean, corr)  # the corruption removes the induction answer
    s = head_patch.set_index(["layer", "head"])["score"]
    top0 = s.loc[0].idxmax()
    assert taxonomy.loc[(0, top0)] == "previous-token", taxonomy
    assert s.loc[0].max() > 0.8 and s.loc[0].drop(top0).abs().max() < 0.1
    movers = [h for h, v in s.loc[1].items() if v > 0.1]
    assert movers and all(taxonomy.loc[(1, h)] == "induction" for h in movers), (s, taxonomy)


def test_resid_patching_localises_the_cue_positions(induction):
    pairs = induction_pairs(12, cue=6, seed=2)
    df = activation_patching(induction, pairs, "resid_pre", batch_size=16)
    s = df.set_index(["layer", "pos"])["score"]
    # layer 0: only the corrupted token (position 6) carries the difference
    assert s.loc[(0, 6)] > 0.95 and s.loc[0].drop(6).abs().max() < 0.05
    # layer 1: the previous-token head has moved it to position 7, the answer's position
    assert s.loc[(1, 7)] > 0.9 and s.loc[1].drop(7).abs().max() < 0.1


def test_q_k_v_and_pattern_patching_show_k_composition(induction, ind_pairs):
    k = activation_patching(induction, ind_pairs, "k", batch_size=16).set_index(
        ["layer", "head"])["score"]
    q = activation_patching(induction, ind_pairs, "q", batch_size=16)["score"]
    pat = activation_patching(induction, ind_pairs, "pattern", batch_size=12, layers=[1])
    assert k.loc[1].max() > 0.3 and q.abs().max() < 0.05
    np.testing.assert_allclose(pat["score"].to_numpy(), k.loc[1].to_numpy(), atol=0.02)


def test_attribution_patching_correlates_with_activation_patching(induction, ind_pairs,
                                                                  head_patch):
    attr = attribution_patching(induction, ind_pairs, "head", batch_size=16)
    j = head_patch.merge(attr, on=["layer", "head"], suffixes=("_act", "_attr"))
    r = np.corrcoef(j["score_act"], j["score_attr"])[0, 1]
    assert r >= 0.9, j
    assert attr.attrs["clean"] == pytest.approx(head_patch.attrs["clean"], rel=1e-5)


def test_path_patching_shows_previous_token_to_induction_k_composition(induction, ind_pairs,
                                                                       head_patch):
    keys = path_patching(induction, ind_pairs, [f"L1H{h}.k" for h in range(4)], batch_size=16)
    queries = path_patching(induction, ind_pairs, [f"L1H{h}.q" for h in range(4)], batch_size=16)
    prev = head_patch[head_patch.layer == 0].set_index("head")["score"].idxmax()
    assert keys.set_index("head")["score"][prev] > 0.9
    assert queries["score"].abs().max() < 0.05
    # every path out of layer 0 (all of layer 1's inputs and the direct path) = patching the head
    everything = [f"L1H{h}.{x}" for h in range(4) for x in "qkv"] + ["logits"]
    whole = path_patching(induction, ind_pairs, everything, batch_size=16)
    np.testing.assert_allclose(whole["score"], head_patch[head_patch.layer == 0]["score"],
                               atol=1e-4)


def test_edge_attribution_sums_to_node_attribution_and_finds_k_composition(induction,
                                                                           ind_pairs):
    edges = edge_attribution_patching(induction, ind_pairs, batch_size=16)
    nodes = attribution_patching(induction, ind_pairs, "head", batch_size=16)
    summed = edges.groupby("sender")["score"].sum()
    for r in nodes.itertuples():
        assert summed[f"L{r.layer}H{r.head}"] == pytest.approx(r.score, abs=1e-4)
    into_k = edges[edges.receiver.str.endswith(".k") & edges.sender.str.startswith("L0")]
    into_q = edges[edges.receiver.str.endswith(".q") & edges.sender.str.startswith("L0")]
    assert into_k["score"].sum() > 0.5 and into_q["score"].abs().sum() < 0.1
    assert induction.use_flags["use_split_qkv_input"] is False  # restored


def test_dla_sums_to_the_logit_difference(induction, ind_pairs):
    d = direct_logit_attribution(induction, ind_pairs)
    assert d["attribution"].sum() + d.attrs["unowned"] == pytest.approx(d.attrs["logit_diff"])
    W, a, w = induction.W_U, ind_pairs.answer, ind_pairs.wrong
    with torch.no_grad():
        bias_term = float((induction.ln_final.b @ (W[:, a] - W[:, w])).mean())
    assert d.attrs["unowned"] == pytest.approx(bias_term, abs=1e-4)
    heads = d[d.kind == "head"].set_index(["layer", "head"])["attribution"]
    assert heads.loc[1].sum() > 0.8 * d.attrs["logit_diff"]
    by_src = dla_by_source_position(induction, ind_pairs).groupby(["layer", "head"])
    np.testing.assert_allclose(by_src["attribution"].sum().to_numpy(), heads.to_numpy(),
                               atol=1e-4)


def test_dla_is_exact_per_neuron_on_an_rmsnorm_gqa_model():
    model, pairs = _tiny(), _tiny_pairs()
    d = direct_logit_attribution(model, pairs, expand_neurons=True, batch_size=4)
    assert (d.kind == "neuron").sum() == 2 * model.cfg.d_mlp
    assert abs(d.attrs["unowned"]) < 1e-4
    assert d["attribution"].sum() == pytest.approx(d.attrs["logit_diff"], abs=1e-4)


@pytest.mark.parametrize("what", ["resid_pre", "resid_mid", "mlp_out", "head_pos", "v",
                                  "neuron", "blocks.1.ln2.hook_normalized"])
def test_batched_streamed_patching_equals_one_patch_per_forward(what):
    model, pairs = _tiny(), _tiny_pairs()
    seen = []

    def metric(logits, answer, wrong, clean_logits):
        seen.append(logits.shape[0])
        rows = torch.arange(logits.shape[0])
        return logits[rows, answer] - logits[rows, wrong]

    layers = [1] if what == "neuron" else None
    one = activation_patching(model, pairs, what, batch_size=6, max_batch=1, layers=layers)
    many = activation_patching(model, pairs, what, metric=metric, batch_size=4, max_batch=16,
                               layers=layers)
    assert max(seen) <= 16 and len(one) == len(many) > 1
    np.testing.assert_allclose(one["metric"], many["metric"], rtol=1e-4, atol=1e-5)


def test_patching_the_whole_last_residual_restores_the_clean_run():
    model, pairs = _tiny(), _tiny_pairs()
    for metric in ("logit_diff", "prob", "kl"):
        df = activation_patching(model, pairs, "resid_post", layers=[1], positions=[-1],
                                 metric=metric)
        assert df["score"].tolist() == pytest.approx([1.0], abs=1e-5), metric
    clean, corr = baseline(model, pairs, "kl")
    assert clean == pytest.approx(0, abs=1e-6) and corr > 0


def test_attribution_is_exact_at_the_last_residual_for_the_logit_difference():
    """logit_diff is linear in the final residual but the final norm is not: the estimate is
    first-order, exact only where the metric is linear (pattern of GQA kv heads too)."""
    model, pairs = _tiny(), _tiny_pairs()
    act = activation_patching(model, pairs, "k").set_index(["layer", "head"])["score"]
    attr = attribution_patching(model, pairs, "k", batch_size=4).set_index(
        ["layer", "head"])["score"]
    assert list(act.index) == list(attr.index) and len(act) == 2 * 2  # 2 kv heads per layer
    assert np.isfinite(attr.to_numpy()).all()


def test_bad_input_is_one_line_naming_the_fix(induction):
    with pytest.raises(interp.InterpError, match="same length"):
        PromptPairs.from_lists([[0, 1, 2]], [[0, 1]], [3], [4])
    pairs = induction_pairs(2)
    with pytest.raises(interp.InterpError, match="Closest real names"):
        activation_patching(induction, pairs, "blocks.0.attn.hook_zz")
    with pytest.raises(interp.InterpError, match="resid_pre"):
        activation_patching(induction, pairs, "residual")
    with pytest.raises(interp.InterpError, match="no hook point"):
        activation_patching(induction, pairs, "mlp_out")  # attention-only
    with pytest.raises(interp.InterpError, match="L<layer>H<head>"):
        path_patching(induction, pairs, ["L1H0.x"])
    with pytest.raises(interp.InterpError, match="before the first receiver"):
        path_patching(induction, pairs, ["L1H0.k"], senders=[(1, 2)])
    with pytest.raises(interp.InterpError, match="metric"):
        activation_patching(induction, pairs, "head", metric="accuracy")


def _invoke(*args: str):
    from click.testing import CliRunner

    from analyses.app.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_patch_writes_the_report(tmp_path):
    import pandas as pd

    out = tmp_path / "patch"
    res = _invoke("patch", "interp/data/induction.pt", "--pairs", "16", "--out", out, "--quiet")
    assert res.exit_code == 0, (res.output, res.exception)
    heads = pd.read_csv(out / "data" / "patch_heads.csv")
    assert {"layer", "head", "activation", "attribution", "dla"} <= set(heads.columns)
    assert len(heads) == 8
    path = pd.read_csv(out / "data" / "patch_path.csv")
    assert set(path["input"]) == {"q", "k", "v"}
    assert (out / "figures" / "patch_heads.png").exists()
    text = (out / "index.md").read_text()
    assert "Pearson r" in text and "Path patching into" in text


def test_cli_patch_bad_input_exits_2_with_one_line(tmp_path):
    res = _invoke("patch", "interp/data/induction.pt", "--task", "ioi", "--out",
                  tmp_path / "x", "--quiet")
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "IOI" in lines[0], lines


@pytest.mark.slow
def test_smollm2_ioi_heads_patching_and_attribution():
    """SmolLM2-135M on 100 IOI pairs: a clear clean logit difference that the ABC corruption
    removes, heads that restore part of it, attribution agreeing with activation patching."""
    from analyses.circuits.ioi import ioi_pairs

    try:
        model = interp.load_pretrained("smollm2-135m")
    except interp.InterpError as e:
        pytest.skip(str(e))
    pairs = ioi_pairs(model, 100)
    assert len(pairs) == 100
    clean, corr = baseline(model, pairs, batch_size=20)
    assert clean > 1.0 and clean - corr > 1.0, (clean, corr)
    attr = attribution_patching(model, pairs, "head", batch_size=20)
    # activation patching costs one forward per head and pair: 8 pairs, the upper 15 layers
    # (where the IOI heads are: L23H3, L20H0, L29H1 restore 0.63, 0.32, 0.26 of the gap)
    sub = PromptPairs(pairs.clean[:8], pairs.corrupted[:8], pairs.answer[:8], pairs.wrong[:8])
    upper = list(range(15, model.cfg.n_layers))
    act = activation_patching(model, sub, "head", batch_size=8, max_batch=128, layers=upper)
    sub_attr = attribution_patching(model, sub, "head", batch_size=8, layers=upper)
    j = act.merge(sub_attr, on=["layer", "head"], suffixes=("_act", "_attr"))
    assert act["score"].max() > 0.1
    assert np.corrcoef(j["score_act"], j["score_attr"])[0, 1] > 0.9  # 0.99 measured
    assert attr.attrs["clean"] == pytest.approx(clean, rel=1e-4)
    d = direct_logit_attribution(model, sub, batch_size=8)
    assert d["attribution"].sum() + d.attrs["unowned"] == pytest.approx(d.attrs["logit_diff"])
    assert abs(d.attrs["unowned"]) < 1e-3  # RMSNorm, no unembedding bias


def test_patch_section_applies_to_decoders_with_their_pairs(induction):
    from analyses.app.sections.patch import applies

    assert applies(induction)
    assert applies(_tiny()) is False  # a random model without a tokenizer has no IOI names
