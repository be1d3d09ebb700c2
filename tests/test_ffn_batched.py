"""The batched FFN paths (issue 21) against unbatched references on the packaged ``knowledge``
checkpoint (interp/data/knowledge.pt), to 1e-5, so the speed-ups cannot drift the numbers.

- Causal tracing runs every restoration of a position as one staggered stream (rows join at
  their start layer, :mod:`analyses.ffn.stream`); the reference restores each (kind, layer,
  position) by plain hooks on a full forward of the corrupted prompt, one sample at a time.
- Integrated gradients run every layer's Riemann steps as one staggered stream; the reference
  differentiates a full forward per step with the layer's activations at the last position
  scaled by hand.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

import analyses.ffn as fk
from analyses.ffn.stream import staggered_forward
from interp.errors import InterpError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def knowledge():
    """The packaged ``knowledge`` checkpoint and three facts it knows."""
    try:
        from interp.train import load_checkpoint, shipped

        model = load_checkpoint(shipped("knowledge"))
    except (ImportError, InterpError) as e:
        pytest.skip(f"packaged knowledge checkpoint unavailable: {e}")
    known, _ = fk.known_facts(model, fk.prepare_facts(model, fk.facts_for_model(model)))
    return model, fk.select_facts(known, 3, seed=1)


def _full_forward_prob(model, tokens, answer, hooks) -> float:
    """P(answer) at the last position of one full forward with ``hooks`` (no cache, no batch)."""
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([list(tokens)]), fwd_hooks=hooks)
    return float(torch.softmax(logits[0, -1].float(), -1)[answer])


def test_staggered_trace_equals_unbatched_reference(knowledge) -> None:
    model, facts = knowledge
    S, L = 2, model.cfg.n_layers
    window = fk.default_window(L)
    trace = fk.causal_trace(model, facts, n_samples=S, seed=4, corruptions=("noise",),
                            single_kinds=("mlp", "attn"), positions="all")
    std = fk._subject_embed_std(model, facts)
    gen = torch.Generator().manual_seed(4)
    for f in facts:  # the noise each fact drew, in the order causal_trace drew it
        s0, s1 = f.subject_span
        noise = torch.randn((S, s1 - s0, model.cfg.d_model), generator=gen) * 3.0 * std
        _, clean = model.run_with_cache(torch.tensor([list(f.tokens)]))
        rows = trace[trace["fact"] == f.name]
        assert len(rows) == 5 * L * (len(f.tokens) - s0)
        mlp = rows[rows["kind"].str.startswith("mlp")]  # rows entering after the MLP's block
        picked = pd.concat([rows.sample(10, random_state=0), mlp.sample(8, random_state=1),
                            mlp[mlp["layer"].isin([0, L - 1])]])
        for _, r in picked.iterrows():
            base = r["kind"].split("_")[0]
            if base == "resid":
                names = [f"blocks.{r['layer']}.hook_resid_post"]
            else:
                w = 1 if r["kind"].endswith("_single") else window
                names = [f"blocks.{j}.hook_{base}_out" for j in fk._window_layers(r["layer"], w, L)]
            ref = 0.0
            for s in range(S):
                def add(act, hook, z=noise[s], s0=s0, s1=s1):
                    act = act.clone()
                    act[:, s0:s1] += z
                    return act

                def restore(act, hook, p=int(r["position"]), clean=clean):
                    act = act.clone()
                    act[:, p] = clean[hook.name][0, p]
                    return act
                hooks = [("hook_embed", add)] + [(n, restore) for n in names]
                ref += _full_forward_prob(model, f.tokens, f.answer_id, hooks) / S
            assert r["restored_prob"] == pytest.approx(ref, abs=1e-5), r.to_dict()


def test_mlp_restorations_skip_their_first_block_only_where_exact(knowledge) -> None:
    """An MLP restoration's first block is not run where resid_post = resid_mid + mlp_out (the
    block's other positions equal the corrupted run's); post-norm and parallel blocks, where
    that does not hold, still run it."""
    from interp import ModelConfig, build_model

    model, facts = knowledge
    assert fk.tracing._mlp_adds_to_resid_mid(model)
    patches = fk.tracing._build_patches(model, facts[0], ("resid", "mlp", "attn"), 3, ("mlp",))
    for p in patches:
        first = p.restore[0] if p.restore else p.layer + 1
        assert p.enters_after_mlp == p.kind.startswith("mlp")
        assert p.start == first + p.enters_after_mlp
    small = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=11, n_ctx=8)
    for cfg in (dict(norm_placement="post"), dict(parallel_attn_mlp=True), dict(attn_only=True)):
        other = build_model(ModelConfig(**small, **cfg))
        assert not fk.tracing._mlp_adds_to_resid_mid(other), cfg
    assert fk.tracing._mlp_adds_to_resid_mid(build_model(ModelConfig(**small)))


def _reference_ig(model, tokens, answer, layer, steps) -> torch.Tensor:
    """Integrated gradients of one layer by a full forward and backward per midpoint step."""
    _, cache = model.run_with_cache(torch.tensor([list(tokens)]))
    post = cache[f"blocks.{layer}.mlp.hook_post"][0, -1].float()
    total = torch.zeros_like(post)
    for k in range(steps):
        scaled = ((k + 0.5) / steps * post).clone().requires_grad_(True)

        def put(act, hook, scaled=scaled):
            return torch.cat([act[:, :-1], scaled[None, None].to(act.dtype)], 1)
        logits = model.run_with_hooks(torch.tensor([list(tokens)]),
                                      fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", put)])
        p = torch.softmax(logits[0, -1].float(), -1)[answer]
        (g,) = torch.autograd.grad(p, scaled)
        total += g
    return post * total / steps


@pytest.mark.parametrize("max_rows", [7, 512])
def test_batched_integrated_gradients_equal_unbatched_reference(knowledge, max_rows) -> None:
    """Every layer's steps in one stream (or in chunks of 7 rows, cutting layers in two)."""
    model, facts = knowledge
    f = facts[0]
    res = fk.integrated_gradients(model, f.tokens, f.answer_id, steps=6, tolerance=None,
                                  batch_size=max_rows)
    assert res.steps.tolist() == [6] * model.cfg.n_layers
    for layer in range(model.cfg.n_layers):
        ref = _reference_ig(model, f.tokens, f.answer_id, layer, 6)
        assert torch.allclose(res.attributions[layer], ref, atol=1e-5), layer


def test_staggered_forward_equals_one_forward_per_start(knowledge) -> None:
    """Rows joining at layers 0, 1 and n_layers give what a forward from each start gives."""
    model, _ = knowledge
    L = model.cfg.n_layers
    torch.manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 3))
    resid = {i: torch.randn(4, 3, model.cfg.d_model) for i in range(L + 1)}
    starts = [0, 1, 1, L]
    with torch.no_grad():
        out = staggered_forward(model, starts, tokens,
                                lambda layer, lo, hi: resid[layer][lo:hi],
                                lambda layer, n: None, lambda layer, n: [])
        for r, s in enumerate(starts):
            ref = model(tokens[r:r + 1], start_at_layer=s, residual=resid[s][r:r + 1],
                        return_type="hidden")
            assert torch.allclose(out[r], ref[0], atol=1e-5), r
    with pytest.raises(ValueError, match="sorted"):
        staggered_forward(model, [1, 0], tokens[:2], lambda *a: resid[0][:1],
                          lambda *a: None, lambda *a: [])


def test_batched_edits_equal_one_full_forward_per_prompt(knowledge) -> None:
    """Every fact's edits in shared batches, each row with its own neurons and only its last
    position recomputed (earlier keys and values cached), against a full forward of each
    prompt with that fact's neurons scaled at the last position by a plain hook."""
    model, facts = knowledge
    L, d = model.cfg.n_layers, model.cfg.d_mlp
    gen = torch.Generator().manual_seed(0)
    rows = []  # a different neuron set per fact, some layers shared, so batches mix them
    for i, f in enumerate(facts[:2]):
        for layer in (0, L - 1) if i == 0 else (L - 1,):
            for n in torch.randperm(d, generator=gen)[:3 + i].tolist():
                rows.append({"fact": f.name, "layer": layer, "neuron": n, "kept": True})
    kn = pd.DataFrame(rows)
    edits = fk.edit_knowledge_neurons(model, facts, kn, n_unrelated=2, batch_size=3)
    assert set(edits["fact"]) == {facts[0].name, facts[1].name}
    by_name = {f.name: f for f in facts}
    for r in edits.itertuples():
        target = by_name[r.target_fact]
        toks = target.prompts[r.prompt] if r.target == "self" else target.tokens
        sel = kn[kn["fact"] == r.fact]
        factor = 0.0 if r.mode == "suppress" else 2.0

        def scale(act, hook, sel=sel, factor=factor):
            act = act.clone()
            idx = torch.tensor(sel[sel["layer"] == hook.layer()]["neuron"].tolist())
            act[:, -1, idx] *= factor
            return act

        hooks = [(f"blocks.{layer}.mlp.hook_post", scale) for layer in sorted(set(sel["layer"]))]
        after = _full_forward_prob(model, toks, target.answer_id, hooks)
        before = _full_forward_prob(model, toks, target.answer_id, [])
        assert r.p_after == pytest.approx(after, abs=1e-5)
        assert r.p_before == pytest.approx(before, abs=1e-5)
    moved = edits[edits["target"] == "self"]
    assert (moved["p_after"] != moved["p_before"]).all()  # the edits reach the probabilities


@pytest.mark.parametrize("bias, scale", [(False, 1.0), (True, 0.5)])
def test_answer_probs_in_one_buffer_equal_softmax_and_autograd(knowledge, monkeypatch, bias,
                                                              scale) -> None:
    """``readout.answer_probs`` (chunks of one reused buffer, the softmax's gradient written in
    place) equals softmax(unembed) and its autograd gradient, per row, with an unembedding
    bias and a logit scale too, over more rows than one chunk and per-row answers."""
    from analyses.ffn import readout

    model, _ = knowledge
    monkeypatch.setattr(readout, "_CHUNK", 7)
    if bias:
        monkeypatch.setattr(model.unembed, "has_bias", True)
        monkeypatch.setattr(model.unembed, "b_U", torch.randn(model.cfg.d_vocab_out))
    monkeypatch.setattr(model, "cfg", dataclasses.replace(model.cfg, logit_scale=scale))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(19, model.cfg.d_model, generator=gen) * 3
    answers = torch.randint(model.cfg.d_vocab_out, (19,), generator=gen)
    assert readout._plain_unembed(model, hidden)
    p, g = readout.answer_probs(model, hidden, answers, grads=True)
    h = hidden.clone().requires_grad_(True)
    ref = torch.softmax(readout._unembed(model, h), -1)[torch.arange(19), answers]
    (ref_g,) = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-6)
    p1, none = readout.answer_probs(model, hidden, int(answers[3]))
    assert none is None
    torch.testing.assert_close(p1[3], p[3], rtol=1e-6, atol=0)
