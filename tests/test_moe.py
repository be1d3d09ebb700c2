"""MoE expert specialisation (analyses/moe/): planted ground truth, exactness of the streamed
accumulators against brute force, the permutation null, and the ``interp moe`` command."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import interp
from analyses import moe
from interp.errors import InterpError
from interp.progress import no_progress

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted():
    model, cls = moe.planted_router_model(n_experts=4, d_vocab=48, top_k=2, n_layers=2, seed=0)
    res = moe.routing_stats(
        model,
        moe.class_batches(48, 4, n_batches=6, batch_size=8, seq_len=48, seed=1),
        domain_names=["c0", "c1", "c2", "c3"],
        n_perm=100,
        seed=0,
    )
    return model, cls, res


def test_planted_router_recovers_token_and_domain_specialisation(planted):
    model, cls, res = planted
    s = res.summary.set_index("layer")
    assert list(s.index) == [0, 1]
    for layer, row in s.iterrows():
        assert row["nmi_domain"] >= 0.95 and row["nmi_token"] >= 0.95, (
            layer,
            row["nmi_domain"],
            row["nmi_token"],
        )
        assert row["nmi_domain_baseline"] < 0.05 and row["nmi_token_baseline"] < 0.2
        assert row["p_value"] <= 1 / 101 + 1e-12 and row["token_p_value"] <= 1 / 101 + 1e-12
        assert row["top_expert_share"] == pytest.approx(1.0)
        assert row["top_expert_share_baseline"] < 0.6
        # sequences are single-class, so neighbours share the first expert; chance is ~1/E
        assert row["consecutive_same_top1"] == pytest.approx(1.0)
        assert row["consecutive_random"] < 0.3
    # every expert maps to its class (domain c_e), every token to expert t mod E
    ex = res.experts
    assert (ex["top_domain"] == "c" + ex["expert"].astype(str)).all()
    assert (ex["top_domain_share"] == 1.0).all() and (ex["p_value"] <= 1 / 101 + 1e-12).all()
    assert (ex["spec_index_bits"] > 20 * ex["spec_index_baseline"]).all()
    tok = res.tokens
    assert (tok["top_expert"] == tok["token"].map(cls)).all() and (tok["top_share"] == 1.0).all()
    # the domain share table: each class puts all its first choices on its expert
    d = res.domain[res.domain["layer"] == 0]
    diag = d[d["domain"] == "c" + d["expert"].astype(str)]
    assert (diag["share_top1"] == 1.0).all() and len(diag) == 4
    assert set(d.columns) >= {"layer", "expert", "domain", "share"}
    # cross-layer: both layers route identically
    c = res.cross_layer.iloc[0]
    assert (
        c["nmi"] == pytest.approx(1.0) and c["same_expert_rate"] == 1.0 and c["nmi_baseline"] < 0.05
    )


def test_independent_labels_are_not_specialised():
    """A random router and domain labels drawn independently of the tokens: NMI must sit at its
    permutation baseline (a test that the baseline is the right chance level, not just small)."""
    cfg = interp.ModelConfig(
        n_layers=1,
        d_model=32,
        n_heads=2,
        d_vocab=64,
        n_ctx=64,
        n_experts=4,
        experts_per_token=2,
        d_mlp=32,
    )
    torch.manual_seed(0)
    model = interp.HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, 64, (8, 32), generator=g), torch.randint(0, 3, (8, 32), generator=g))
        for _ in range(8)
    ]
    s = moe.routing_stats(model, batches, n_perm=200, seed=0).summary.iloc[0]
    assert s["nmi_domain"] < s["nmi_domain_p95"] * 2
    assert abs(s["ami_domain"]) < 0.01
    assert s["p_value"] > 0.01
    # token routing of a random router still depends on the token (it reads the embedding)
    assert s["nmi_token"] > s["nmi_token_baseline"] and s["token_p_value"] < 0.05


def _fake_routing(B, T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, E, generator=g) * 2
    w, idx = torch.softmax(logits, -1).topk(k, -1)
    return logits, idx, w / w.sum(-1, keepdim=True)


def test_accumulator_matches_brute_force():
    E, k, B, T = 5, 2, 3, 9
    acc = moe.RoutingAccumulator([0], E, k, reservoir=10_000, seed=0)
    all_idx, all_tok, all_dom, all_valid, all_logits = [], [], [], [], []
    for b in range(4):
        logits, idx, w = _fake_routing(B, T, E, k, b)
        tokens = torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(100 + b))
        dom = torch.randint(-1, 3, (B, T), generator=torch.Generator().manual_seed(200 + b))
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, -3:] = False  # right padding
        acc.update(0, logits, idx, w, tokens, dom, valid)
        acc.end_batch()
        (
            all_idx.append(idx),
            all_tok.append(tokens),
            all_dom.append(dom),
            all_valid.append(valid),
            all_logits.append(logits),
        )
    res = acc.result(n_perm=0, min_token_count=1)
    idx, tok, dom, valid, logits = (
        torch.cat(x) for x in (all_idx, all_tok, all_dom, all_valid, all_logits)
    )
    v = valid.reshape(-1)
    top1 = idx[..., 0].reshape(-1)[v].numpy()
    n = int(v.sum())
    first = np.bincount(top1, minlength=E)
    load = res.load.set_index("expert")
    assert (load["tokens_top1"].to_numpy() == first).all()
    assert (
        load["tokens_topk"].to_numpy()
        == np.bincount(idx.reshape(-1, k)[v].reshape(-1).numpy(), minlength=E)
    ).all()
    s = res.summary.iloc[0]
    assert s["n_tokens"] == n
    assert s["cv_top1"] == pytest.approx(first.std() / first.mean())
    p = torch.softmax(logits.reshape(-1, E)[v], -1)
    assert s["router_entropy"] == pytest.approx(
        float(-(p * p.log()).sum(-1).mean() / math.log(E)), rel=1e-5
    )
    # consecutive pairs inside sequences, both valid
    same = overlap = pairs = 0
    for b in range(idx.shape[0]):
        for t in range(T - 1):
            if valid[b, t] and valid[b, t + 1]:
                pairs += 1
                same += int(idx[b, t, 0] == idx[b, t + 1, 0])
                overlap += int(bool(set(idx[b, t].tolist()) & set(idx[b, t + 1].tolist())))
    assert s["n_pairs"] == pairs
    assert s["consecutive_same_top1"] == pytest.approx(same / pairs)
    assert s["consecutive_overlap_topk"] == pytest.approx(overlap / pairs)
    assert s["consecutive_random"] == pytest.approx(float(((first / n) ** 2).sum()))
    # the reservoir holds every token here, so its pair rate is the exact all-pairs rate
    sets = [set(r) for r in idx.reshape(-1, k)[v].tolist()]
    hits = sum(bool(a & b) for i, a in enumerate(sets) for j, b in enumerate(sets) if i != j)
    assert s["consecutive_overlap_random"] == pytest.approx(hits / (n * (n - 1)))
    assert s["consecutive_overlap_uniform"] == pytest.approx(
        1 - math.comb(E - k, k) / math.comb(E, k)
    )
    # expert x domain counts (unlabelled -1 excluded), and token counts
    d = dom.reshape(-1)[v].numpy()
    lab = d >= 0
    joint = np.zeros((E, 3), int)
    np.add.at(joint, (top1[lab], d[lab]), 1)
    got = res.domain.pivot(index="expert", columns="domain", values="share_top1").to_numpy()
    np.testing.assert_allclose(got, joint / joint.sum(0, keepdims=True))
    mi = moe._mi(joint)
    assert s["mi_domain_bits"] == pytest.approx(mi / math.log(2))
    t = tok.reshape(-1)[v].numpy()
    counts = pd.Series(t).value_counts()
    got_tok = res.tokens.set_index("token")["count"]
    assert got_tok.sort_index().to_dict() == counts.sort_index().to_dict()


def test_streaming_does_not_depend_on_batching():
    model, _ = moe.planted_router_model(n_experts=4, d_vocab=40, seed=1)
    torch.manual_seed(0)
    model.blocks[1].mlp.router.weight.data.normal_()  # a second layer that routes differently
    data = list(moe.class_batches(40, 4, n_batches=4, batch_size=6, seq_len=20, seed=2))
    tokens, doms = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    whole = moe.routing_stats(model, [(tokens, doms)], n_perm=30, seed=0)
    split = moe.routing_stats(
        model,
        [(tokens[i : i + 5], doms[i : i + 5]) for i in range(0, len(tokens), 5)],
        n_perm=30,
        seed=0,
    )
    drop = ["consecutive_overlap_random"]  # a reservoir sample: random by design
    pd.testing.assert_frame_equal(
        whole.summary.drop(columns=drop), split.summary.drop(columns=drop)
    )
    for name in ("load", "domain", "experts", "tokens", "cross_layer"):
        pd.testing.assert_frame_equal(getattr(whole, name), getattr(split, name))


def test_margin_null_equals_explicit_label_shuffling():
    """Random tables with the observed margins have the distribution of the table after shuffling
    the labels over tokens: compare with an explicit shuffle of per-token pairs."""
    rng = np.random.default_rng(0)
    n = 600
    experts = rng.integers(0, 4, n)
    domains = np.where(rng.random(n) < 0.2, experts % 3, rng.integers(0, 3, n))
    table = np.zeros((4, 3), int)
    np.add.at(table, (experts, domains), 1)
    from_margins = np.concatenate([moe._mi(t) for t in moe._random_tables(table, 2000, rng)])
    shuffled = []
    for _ in range(2000):
        perm = rng.permutation(domains)
        t = np.zeros((4, 3), int)
        np.add.at(t, (experts, perm), 1)
        shuffled.append(moe._mi(t))
    shuffled = np.array(shuffled)
    se = shuffled.std() / math.sqrt(len(shuffled))
    assert abs(from_margins.mean() - shuffled.mean()) < 4 * math.sqrt(2) * se
    assert from_margins.std() == pytest.approx(shuffled.std(), rel=0.1)
    res = moe._perm_test(table, 500, rng)
    assert (
        res.p_value <= 0.01 and res.nmi > res.nmi_null_p95
    )  # the planted 20% dependence is detected


def test_dense_model_is_refused():
    cfg = interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=16)
    model = interp.HookedTransformer(cfg)
    with pytest.raises(InterpError, match="no MoE layers"):
        moe.routing_stats(model, [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(InterpError, match="no MoE layers"):
        moe.expert_ablation(model, [torch.zeros(1, 4, dtype=torch.long)])


def test_bad_batches_are_refused(planted):
    model = planted[0]
    with pytest.raises(InterpError, match="Domain ids"):
        moe.routing_stats(
            model, [(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))]
        )
    with pytest.raises(InterpError, match="Token ids"):
        moe.routing_stats(model, [torch.full((1, 4), 999)])
    with pytest.raises(InterpError, match="no tokens"):
        moe.routing_stats(model, [])


def test_ablation_masks_one_expert_and_restores(planted):
    model, _, _ = planted
    with torch.no_grad():  # give expert 1 of layer 0 a real output so removing it changes the loss
        # own generator: the draw must not depend on which tests ran before (it did: 1e-4 alone)
        model.blocks[0].mlp.experts[1].fc_out.weight.normal_(
            0, 1.0, generator=torch.Generator().manual_seed(0)
        )
    try:
        batches = list(moe.class_batches(48, 4, n_batches=2, batch_size=4, seq_len=16, seed=3))
        abl = moe.expert_ablation(model, batches, layers=[0], domain_names=["c0", "c1", "c2", "c3"])
        assert set(abl["domain"]) == {"all", "c0", "c1", "c2", "c3"}
        d = abl[abl["domain"] != "all"].assign(size=lambda x: x["delta"].abs())
        # class-1 tokens route first to expert 1: removing it moves their loss most. (Removing
        # another expert can bring expert 1 into a token's top-2, so how far that moves another
        # class depends on the random draw; over draws it was as often above c1[1] as below.)
        c1 = d[d["domain"] == "c1"].set_index("expert")["size"]
        assert c1.idxmax() == 1 and c1[1] > 1e-3
        # only the layer asked for is ablated
        assert (abl[abl["layer"] != 0].empty) and set(abl["layer"]) == {0}
        assert all(m.expert_mask is None for m in (b.mlp for b in model.blocks))
    finally:
        with torch.no_grad():
            model.blocks[0].mlp.experts[1].fc_out.weight.zero_()


def test_text_batches_round_robin(tmp_path: Path):
    from interp.train.tokenizers import WordTokenizer

    model, _ = moe.planted_router_model(n_experts=4, d_vocab=40, seed=0)
    model.tokenizer = WordTokenizer([f"w{i}" for i in range(40)], bos_token=None)
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text(
        "\n".join(" ".join(f"w{4 * j}" for j in range(10)) for _ in range(10))
    )  # 100 tokens
    b.write_text(" ".join("w1" for _ in range(30)) + "\n")  # 30 tokens
    c.write_text("w2 w6 w10\n")  # shorter than one sequence
    out = list(moe.text_batches(model, [a, b, c], seq_len=20, batch_size=4))
    doms = torch.cat([x[1] for x in out]).tolist()
    assert (
        doms[:3] == [0, 1, 2] and doms.count(0) == 5 and doms.count(1) == 1 and doms.count(2) == 1
    )
    first = out[0]  # [a, b, c (3 tokens, masked), a]
    assert len(first) == 3 and first[2].sum(1).tolist() == [20, 20, 3, 20]
    assert all(len(x) == 2 for x in out[1:])
    with pytest.raises(InterpError, match="not found"):
        moe.text_batches(model, [tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InterpError, match="empty"):
        moe.text_batches(model, [tmp_path / "empty.txt"])
    res = moe.routing_stats(
        model,
        moe.text_batches(model, [a, b, c], seq_len=20, batch_size=4),
        domain_names=["a", "b", "c"],
        n_perm=20,
    )
    assert res.summary["n_tokens"].iloc[0] == 100 + 20 + 3


def _cli_model(monkeypatch, model):
    monkeypatch.setattr(interp, "load_pretrained", lambda source, **kw: model)


def test_cli_moe_report(monkeypatch, tmp_path: Path):
    from analyses.app.cli import cli
    from interp.train.tokenizers import WordTokenizer

    model, _ = moe.planted_router_model(n_experts=4, d_vocab=32, seed=0)
    model.tokenizer = WordTokenizer([f"w{i}" for i in range(32)], bos_token=None)
    files = []
    for c in range(4):  # file c holds tokens of class c only
        f = tmp_path / f"class{c}.txt"
        f.write_text(
            "\n".join(
                " ".join(f"w{c + 4 * ((j * 3 + r) % 8)}" for j in range(16)) for r in range(12)
            )
        )
        files.append(f)
    _cli_model(monkeypatch, model)
    cfg = tmp_path / "m.json"
    cfg.write_text("{}")
    args = [
        "moe",
        str(cfg),
        "--out",
        str(tmp_path / "rep"),
        "-q",
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--n-perm",
        "50",
    ]
    for f in files:
        args += ["--text", str(f)]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = tmp_path / "rep" / "data"
    summary = pd.read_csv(data / "moe_summary.csv")
    assert {
        "layer",
        "nmi_domain",
        "nmi_domain_baseline",
        "p_value",
        "nmi_token",
        "consecutive_same_top1",
        "consecutive_random",
    } <= set(summary.columns)
    assert (summary["nmi_domain"] >= 0.95).all()
    dom = pd.read_csv(data / "moe_domain.csv")
    assert {"layer", "expert", "domain", "share"} <= set(dom.columns) and set(dom["domain"]) == {
        f"class{c}" for c in range(4)
    }
    assert (data / "moe_load.csv").exists() and (data / "moe_ablation.csv").exists()
    figs = {p.name for p in (tmp_path / "rep" / "figures").iterdir()}
    assert {"moe_load.png", "moe_domain_l0.png", "moe_domain_l1.png"} <= figs
    md = (tmp_path / "rep" / "index.md").read_text()
    assert "Mixtral of Experts" in md and "OpenMoE" in md


def test_cli_dense_model_one_line(monkeypatch, tmp_path: Path):
    from analyses.app.cli import cli

    dense = interp.HookedTransformer(
        interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=300, n_ctx=16)
    ).eval()
    _cli_model(monkeypatch, dense)
    cfg = tmp_path / "m.json"
    cfg.write_text("{}")
    r = CliRunner().invoke(
        cli, ["moe", str(cfg), "--out", str(tmp_path / "rep"), "-q", "--device", "cpu"]
    )
    assert r.exit_code == 2
    lines = [x for x in r.output.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error:") and "MoE" in lines[0]
    assert not (tmp_path / "rep").exists()


def test_accumulator_memory_does_not_grow_with_the_corpus():
    """Ten times the corpus, same accumulator bytes (bounded by vocab x experts, not tokens);
    scripts/bench_moe_memory.py measures process RSS the same way on 0.2M vs 2M tokens."""
    model, _ = moe.planted_router_model(n_experts=4, d_vocab=32, n_layers=2, seed=0)
    sizes = []
    for n in (6, 60):
        res = moe.routing_stats(
            model,
            moe.class_batches(32, 4, n_batches=n, batch_size=8, seq_len=32, seed=0),
            n_perm=0,
            reservoir=256,
        )
        assert res.summary["n_tokens"].iloc[0] == n * 8 * 32
        sizes.append(res.peak_accumulator_bytes)
    assert sizes[0] == sizes[1] > 0


def test_margin_baseline_is_chance_for_a_gaussian_router():
    """Feed a router whose logits really are i.i.d. Gaussian: observed margins and near-tie rates
    must equal their baseline (for renormalised and raw top-k weights)."""
    E, k = 8, 2
    for renorm in (True, False):
        acc = moe.RoutingAccumulator([0], E, k, reservoir=0, renormalized=renorm)
        g = torch.Generator().manual_seed(5)
        for _ in range(5):
            logits = torch.randn(16, 256, E, generator=g) * 1.3
            p = torch.softmax(logits, -1)
            w, idx = p.topk(k, -1)
            if renorm:
                w = w / w.sum(-1, keepdim=True)
            acc.update(
                0,
                logits,
                idx,
                w,
                torch.zeros(16, 256, dtype=torch.long),
                None,
                torch.ones(16, 256, dtype=torch.bool),
            )
        s = acc.result(n_perm=0).summary.iloc[0]
        for col in ("margin_top12", "near_tie_top12", "logit_gap_topk", "near_tie_topk"):
            assert s[col] == pytest.approx(s[col + "_baseline"], abs=0.015), (
                renorm,
                col,
                s[col],
                s[col + "_baseline"],
            )


def test_section_without_domains_uses_the_packaged_sample():
    """No --text and no domain task: the packaged sample as bytes, no domain statistics, a
    report section all the same (what `interp report MODEL` does for an MoE checkpoint)."""
    from analyses.app.sections import moe as section

    cfg = interp.ModelConfig(
        n_layers=2,
        d_model=32,
        n_heads=2,
        d_vocab=300,
        n_ctx=64,
        n_experts=4,
        experts_per_token=2,
        d_mlp=32,
    )
    torch.manual_seed(0)
    model = interp.HookedTransformer(cfg).eval()
    assert section.is_moe(model)
    sec = section.build(
        model, {"seed": 0, "n_perm": 20, "max_tokens": 2048, "ablation_tokens": 256}, no_progress
    )
    assert "moe_domain" not in sec.tables and "nmi_domain" not in sec.tables["moe_summary"]
    assert sec.tables["moe_summary"]["nmi_token"].notna().all()
    assert set(sec.tables["moe_ablation"]["domain"]) == {"all"}
    assert sec.findings and "moe_load" in sec.figures and "sample_text" in sec.data
    dense = interp.HookedTransformer(
        interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=300, n_ctx=16)
    )
    assert not section.is_moe(dense)


def test_merged_shards_equal_one_pass():
    """Two accumulators over two halves of a corpus, merged, give the single-pass result (what a
    data-parallel run gathers)."""
    E, k = 4, 2
    one = moe.RoutingAccumulator([0, 2], E, k, reservoir=10_000)
    shards = [moe.RoutingAccumulator([0, 2], E, k, reservoir=10_000, seed=s) for s in (1, 2)]
    for b in range(6):
        tokens = torch.randint(0, 9, (2, 7), generator=torch.Generator().manual_seed(b))
        dom = torch.full(
            (2, 7), b % 3 if b < 4 else 4
        )  # the second shard sees a domain id the first never does
        valid = torch.ones(2, 7, dtype=torch.bool)
        for layer in (0, 2):
            logits, idx, w = _fake_routing(2, 7, E, k, 10 * b + layer)
            for acc in (one, shards[b // 3]):
                acc.update(layer, logits, idx, w, tokens, dom, valid)
        one.end_batch(), shards[b // 3].end_batch()
    merged = shards[0].merge(shards[1])
    a, b = one.result(n_perm=30, seed=0), merged.result(n_perm=30, seed=0)
    for name in ("load", "domain", "experts", "tokens", "summary", "cross_layer"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))


def test_section_reads_the_training_task_of_a_trained_model():
    """A model from `interp train` routes samples of its own task: labelled domain streams for
    `domains`, unlabelled samples for any other task (its word vocabulary cannot read English)."""
    itrain = pytest.importorskip("interp.train")
    from analyses.app.sections import moe as section

    opts = {"seed": 0, "n_perm": 10, "max_tokens": 1024, "ablation_tokens": 256, "batch_size": 4}
    dom, _, _ = itrain.train(
        "domains",
        {"d_model": 32, "d_mlp": 32, "n_experts": 4},
        steps=2,
        quiet=True,
        save_optimizer=False,
        batch_size=4,
    )
    sec = section.build(dom.eval(), opts, no_progress)
    assert "`domains` task stream" in sec.data and set(sec.tables["moe_domain"]["domain"]) == {
        "a",
        "b",
        "c",
        "d",
    }
    assert set(sec.tables["moe_ablation"]["domain"]) == {"all", "a", "b", "c", "d"}
    ind, _, _ = itrain.train(
        "induction",
        {"d_model": 32, "attn_only": False, "n_experts": 4, "d_mlp": 32},
        steps=2,
        quiet=True,
        save_optimizer=False,
        batch_size=4,
    )
    sec = section.build(ind.eval(), opts, no_progress)
    assert "`induction`" in sec.data and "moe_domain" not in sec.tables
