"""Learned masks: adaptive span, hard-concrete head gates, selective attention (issue 22)."""

from __future__ import annotations

import math

import pytest
import torch

from analyses.masking import LossBatch, head_importance, mean_loss
from analyses.masking.learned import gate_importance_agreement, learned_gates, learned_spans
from interp import HookedTransformer, ModelConfig
from interp.components.learned_masks import BETA, HardConcreteGates, l0_penalty, span_penalty
from interp.errors import InterpError
from interp.train.tasks.mask_training import fit_learned_masks, with_learned_masks
from interp.train.tasks.offsets import Offsets

BASE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=23, n_ctx=16, attn_kernel="eager")


def _pair(seed: int = 0, **flags) -> tuple[HookedTransformer, HookedTransformer]:
    """A plain model and the same weights with ``flags`` on, both in eval mode."""
    torch.manual_seed(seed)
    plain = HookedTransformer(ModelConfig(**{**BASE, **flags.pop("base", {})})).eval()
    return plain, with_learned_masks(plain, **flags)


def _tokens(n: int = 16, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 23, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("base", [{}, {"n_kv_heads": 2}, {"positional": "rope"},
                                  {"soft_mask_penalty": 30.0}, {"positional": "alibi"}])
def test_full_span_is_plain_attention_exactly(base):
    plain, spanned = _pair(adaptive_span=True, span_ramp=4, base=base)
    toks = _tokens()
    assert torch.equal(plain(toks), spanned(toks))
    logits, cache = spanned.run_with_cache(toks)
    assert torch.equal(cache["blocks.1.attn.hook_span_mask"], torch.ones(4, 16, 16))


def test_gates_at_one_are_no_gates_exactly():
    plain, gated = _pair(l0_head_gates=True)
    toks = _tokens()
    assert torch.equal(plain(toks), gated(toks))
    _, cache = gated.run_with_cache(toks)
    assert torch.equal(cache["blocks.0.attn.hook_head_gates"], torch.ones(4))


def test_selective_attention_off_is_todays_model():
    torch.manual_seed(0)
    today = HookedTransformer(ModelConfig(**BASE)).eval()
    off = HookedTransformer(ModelConfig(**BASE, selective_attention=False,
                                        adaptive_span=False, l0_head_gates=False)).eval()
    off.load_state_dict(today.state_dict())  # strict: no new parameters, no new hooks
    assert set(off.hook_dict) == set(today.hook_dict)
    toks = _tokens()
    assert torch.equal(today(toks), off(toks))


def test_auto_kernel_runs_the_span_like_eager():
    plain, spanned = _pair(adaptive_span=True, span_ramp=2)
    with torch.no_grad():
        spanned.blocks[0].attn.span.span_frac.fill_(0.25)
    auto = with_learned_masks(HookedTransformer(ModelConfig(**{**BASE, "attn_kernel": "auto"})),
                              adaptive_span=True, span_ramp=2)
    auto.load_state_dict(spanned.state_dict())
    toks = _tokens()
    torch.testing.assert_close(auto(toks), spanned(toks))


def test_short_span_hides_far_keys_with_the_ramp():
    _, m = _pair(adaptive_span=True, span_ramp=2)
    with torch.no_grad():
        m.blocks[0].attn.span.span_frac.copy_(torch.tensor([0.0, 0.125, 0.25, 1.0]))  # z 0,2,4,16
    _, cache = m.run_with_cache(_tokens())
    mask, pat = cache["blocks.0.attn.hook_span_mask"], cache["blocks.0.attn.hook_pattern"]
    q, k = torch.arange(16)[:, None], torch.arange(16)[None, :]
    for h, z in enumerate([0, 2, 4, 16]):
        want = ((2 + z - (q - k)) / 2).clamp(0, 1)
        assert torch.equal(mask[h], want)
        far = (q - k) >= z + 2
        assert bool((pat[:, h][:, far] == 0).all())
    assert learned_spans(m)["span"].round(4).tolist()[:4] == [0.0, 2.0, 4.0, 16.0]


def test_span_gradient_is_finite_where_the_mask_is_zero():
    _, m = _pair(adaptive_span=True, span_ramp=2)
    with torch.no_grad():
        m.blocks[0].attn.span.span_frac.fill_(0.1)
    m.train()
    (m(_tokens()).logsumexp(-1).mean() + span_penalty(m)).backward()
    g = m.blocks[0].attn.span.span_frac.grad
    assert torch.isfinite(g).all() and bool((g != 0).any())


def test_closed_gate_removes_the_head_like_head_gates():
    plain, gated = _pair(l0_head_gates=True)
    with torch.no_grad():
        gated.blocks[1].attn.gates.log_alpha[2] = -10.0
    gates = torch.ones(2, 4)
    gates[1, 2] = 0.0
    plain.set_head_gates(gates)
    toks = _tokens()
    torch.testing.assert_close(gated(toks), plain(toks))
    table = learned_gates(gated)
    assert table["pruned"].tolist() == [False] * 6 + [True, False]


def test_gates_are_stochastic_in_training_and_fixed_at_eval():
    g = HardConcreteGates(64, init_log_alpha=0.0)
    g.train()
    a, b = g(), g()
    assert not torch.equal(a, b) and bool(((a >= 0) & (a <= 1)).all())
    assert bool((a == 0).any()) and bool((a == 1).any())  # the stretch reaches exact 0 and 1
    g.eval()
    assert torch.equal(g(), g())
    want = torch.sigmoid(torch.tensor(-BETA * math.log(0.1 / 1.1)))
    torch.testing.assert_close(g.open_probability(), want.expand(64))


def test_l0_penalty_counts_open_gates():
    _, gated = _pair(l0_head_gates=True)
    assert 7.9 < float(l0_penalty(gated).detach()) <= 8.0
    assert float(span_penalty(gated)) == 0.0


def test_selective_attention_is_causal_and_hooked():
    _, sel = _pair(selective_attention=True)
    toks = _tokens()
    out, cache = sel.run_with_cache(toks)
    later = toks.clone()
    later[:, 10:] = (later[:, 10:] + 1) % 23
    torch.testing.assert_close(sel(later)[:, :10], out[:, :10])
    F = cache["blocks.0.attn.hook_selection"]  # [batch, q, k]
    assert F.shape == (3, 16, 16) and bool((F >= 0).all())
    assert bool((F[:, :2] == 0).all()) and bool((F[:, :, 0] == 0).all())
    assert bool((F.diff(dim=1) >= 0).all())  # selections accumulate over queries
    plain, _ = _pair()
    assert not torch.allclose(plain(toks), out)


def test_selective_attention_refuses_the_kv_cache():
    _, sel = _pair(selective_attention=True)
    with pytest.raises(InterpError, match="use_past_kv_cache=False"):
        sel.generate(_tokens(4, 1), max_new_tokens=2, verbose=False)


@pytest.mark.parametrize("flags, match", [
    ({"adaptive_span": True, "attn_kernel": "sdpa"}, "attn_kernel='auto' or 'eager'"),
    ({"selective_attention": True, "attn_kernel": "linear"}, "attn_kernel='auto' or 'eager'"),
    ({"adaptive_span": True, "architecture": "encoder"}, "needs a causal decoder"),
    ({"selective_attention": True, "mask": "bidirectional"}, "needs a causal decoder"),
    ({"adaptive_span": True, "span_ramp": 0}, "span_ramp must be a positive integer"),
    ({"l0_head_gates": 1}, "l0_head_gates must be True or False"),
])
def test_bad_learned_mask_settings_get_one_line(flags, match):
    with pytest.raises(ValueError, match=match) as e:
        ModelConfig(**{**BASE, **flags})
    assert "\n" not in str(e.value)


def test_analysis_frames_refuse_a_model_without_masks():
    plain, _ = _pair()
    with pytest.raises(InterpError, match="adaptive_span=True"):
        learned_spans(plain)
    with pytest.raises(InterpError, match="l0_head_gates=True"):
        learned_gates(plain)


def test_offsets_labels_name_the_tuple_back():
    task = Offsets(n_tokens=3, offsets=[1, 4], seq_len=12, marker_prob=0.5)
    b = task.sample(64, torch.Generator().manual_seed(0))
    bb, tt = torch.nonzero(b.labels >= 0, as_tuple=True)
    assert len(bb) > 20 and bool((b.tokens[bb, tt] == task.marker_id).all())
    ans = b.labels[bb, tt] - task.marker_id - 1
    assert torch.equal(ans // 3, b.tokens[bb, tt - 1] - 1)
    assert torch.equal(ans % 3, b.tokens[bb, tt - 4] - 1)
    assert task.model_config().d_vocab == 1 + 3 + 1 + 9


@pytest.mark.slow
def test_learned_spans_match_the_planted_offsets():
    """Each head serving an offset k learns a span within 2x of k (Sukhbaatar et al. 2019)."""
    torch.set_num_threads(1)
    task = Offsets()
    torch.manual_seed(0)
    model = HookedTransformer(task.model_config())
    fit_learned_masks(model, task, steps=1500, span_coef=0.3, seed=0)
    ev = task.evaluate(model)
    assert ev["accuracy"] > 0.95
    spans = learned_spans(model)
    served = {ev[f"head_k{k}"] for k in task.params["offsets"]}
    assert len(served) == len(task.params["offsets"])  # one head per offset
    for h in served:
        need, z = ev[f"needed_span_h{h}"], float(spans["reach"][h])
        assert need / 2 <= z <= 2 * need, (h, need, z)


@pytest.mark.slow
def test_l0_gates_prune_half_the_induction_heads_in_importance_order():
    """Voita et al. (2019) pruning of the shipped induction model, against Michel et al."""
    from interp.checkpoint import load_checkpoint
    from interp.train.tasks.induction import Induction

    torch.set_num_threads(1)
    plain = load_checkpoint("interp/data/induction.pt")
    gated = with_learned_masks(plain, l0_head_gates=True)
    task = Induction()
    fit_learned_masks(gated, task, steps=600, lr=0.05, l0_coef=0.3, masks_only=True, seed=0)
    gen = torch.Generator().manual_seed(1)
    lbs = [LossBatch(b.tokens, b.labels) for b in (task.sample(32, gen) for _ in range(4))]
    agree = gate_importance_agreement(learned_gates(gated), head_importance(plain, lbs))
    assert agree["pruned_fraction"] >= 0.5
    assert agree["spearman_gate"] > 0.3 and agree["importance_pruned"] < agree["importance_kept"]
    assert mean_loss(gated, lbs) - mean_loss(plain, lbs) < 0.5


def test_masking_report_lists_learned_spans_and_gates(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import analyses.app.sections.masking as sec
    from analyses.app.cli import cli

    torch.manual_seed(0)
    plain = HookedTransformer(ModelConfig(**{**BASE, "d_vocab": 256, "n_ctx": 32}))
    model = with_learned_masks(plain, adaptive_span=True, l0_head_gates=True, span_ramp=4)
    with torch.no_grad():
        model.blocks[0].attn.gates.log_alpha[1] = -10.0
        model.blocks[1].attn.span.span_frac.fill_(0.25)
    monkeypatch.setattr(sec, "load_model", lambda *a, **k: model)
    out = tmp_path / "r"
    res = CliRunner().invoke(cli, ["masking", "m", "--seq-len", "16", "--max-tokens", "48",
                                   "--pruning-steps", "2", "--random-orders", "1", "--strategy",
                                   "causal", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    spans = pd.read_csv(out / "data" / "learned_spans.csv")
    assert spans.loc[spans.layer == 1, "span"].round(3).tolist() == [8.0] * 4
    gates = pd.read_csv(out / "data" / "learned_gates.csv")
    assert gates["pruned"].tolist() == [False, True] + [False] * 6
    text = "\n".join(p.read_text() for p in out.glob("*.md"))
    assert "1 of 8 heads pruned" in text and "Spearman(log_alpha" in text


def test_short_span_decodes_the_same_with_and_without_the_kv_cache():
    _, m = _pair(adaptive_span=True, span_ramp=2, base={"n_kv_heads": 2})
    with torch.no_grad():
        m.blocks[0].attn.span.span_frac.fill_(0.2)
        m.blocks[1].attn.span.span_frac.copy_(torch.tensor([0.05, 0.3, 1.0, 0.1]))
    prompt = _tokens(5, 2)
    cached = m.generate(prompt, max_new_tokens=6, verbose=False)
    fresh = m.generate(prompt, max_new_tokens=6, verbose=False, use_past_kv_cache=False)
    assert torch.equal(cached, fresh)
