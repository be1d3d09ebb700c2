"""The ``domains`` MoE model (interp.train): experts specialise by domain beyond the permutation
baseline, and ablating the expert routing ties most to a domain hurts that domain more than the
others. Uses the packaged checkpoint (interp/data/domains_moe.pt) when present, else trains a
small one for 300 steps (about a minute on one CPU core)."""

from __future__ import annotations

import pytest
import torch

from analyses import moe

torch.set_num_threads(1)
itrain = pytest.importorskip("interp.train")


@pytest.fixture(scope="module")
def domains_model():
    try:
        return itrain.load_checkpoint(itrain.shipped("domains_moe"))
    except Exception:  # not packaged (yet) or unreadable: train a small one, same task and config
        model, _, _ = itrain.train("domains", steps=300, seed=0, quiet=True, save_optimizer=False)
        return model.eval()


@pytest.mark.slow
def test_domains_model_specialises_and_ablation_hits_its_domain(domains_model):
    model = domains_model
    task = itrain.task_from(model)
    names = [chr(ord("a") + d) for d in range(task.params["n_domains"])]
    res = moe.routing_stats(
        model, itrain.domain_batches(model, 32, 8, seed=0), domain_names=names, n_perm=200, seed=0
    )
    s = res.summary
    assert len(s) == len(moe.moe_layers(model))
    # every MoE layer: NMI(expert; domain) beyond the whole permutation null
    assert (s["p_value"] <= 1 / 201 + 1e-12).all()
    assert (s["nmi_domain"] > 10 * s["nmi_domain_p95"]).all()
    assert (s["nmi_token"] > s["nmi_token_baseline"]).all()
    # routing is mostly context-independent: domain tokens are disjoint vocabularies
    assert (s["top_expert_share"] > s["top_expert_share_baseline"]).all()

    abl = moe.expert_ablation(
        model, itrain.domain_batches(model, 32, 4, seed=1), domain_names=names, max_tokens=8192
    )
    summ = moe.ablation_summary(abl, res.experts).dropna(subset=["routing_expert"])
    assert len(summ) >= len(
        names
    )  # at least one routing-tied expert per domain and layer on average
    own, other = summ["routing_expert_delta"], summ["routing_expert_delta_other"]
    # the domain's own expert costs that domain more than it costs the other domains on average,
    # for at least three quarters of the (layer, domain) pairs, and by a clear margin overall
    assert (own > other).mean() >= 0.75, summ
    assert own.mean() > 2 * other.mean()
    # and in the layer where ablation matters most, it is the domain hurt most for most domains
    top_layer = abl[abl["domain"] == "all"].groupby("layer")["delta"].mean().idxmax()
    in_top = summ[summ["layer"] == top_layer]
    assert in_top["routing_expert_hurts_own_most"].astype(bool).mean() > 0.5, in_top
