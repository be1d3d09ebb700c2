"""The fast activation patching (analyses.circuits.runs: shared prefix in a KV cache, patched
forwards from the site's block, last-position unembedding) equals the plain definition: one
whole corrupted forward per pair and site with that site's clean activation copied in.

The reference below is written from the definition, independently of the code under test, and
run on models where each shortcut could go wrong: RoPE + GQA + RMSNorm (cached keys are
rotated), learned positions + LayerNorm + sliding window (the window reaches into the prefix),
and a prefix-LM mask reaching past the first difference (the cache must be skipped).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp
from analyses.circuits.ioi import ioi_pairs
from analyses.circuits.pairs import PromptPairs
from analyses.circuits.patching import activation_patching
from analyses.circuits.runs import PairRuns, shared_prefix

SMALL = dict(n_layers=3, d_model=32, n_heads=4, d_vocab=40, n_ctx=16)
MODELS = {
    "rope_gqa": dict(norm="rmsnorm", act="swiglu", n_kv_heads=2, positional="rope"),
    "learned_window": dict(positional="learned", mask="causal&sliding_window:4"),
    "prefix_lm": dict(positional="learned", mask="prefix_lm:7"),
}
HOOK = {"head": "attn.hook_z", "head_pos": "attn.hook_z", "resid_pre": "hook_resid_pre",
        "k": "attn.hook_k", "pattern": "attn.hook_pattern", "neuron": "mlp.hook_post",
        "mlp_out": "hook_mlp_out"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one thread is faster than two fighting over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str) -> interp.HookedTransformer:
    torch.manual_seed(0)
    model = interp.HookedTransformer(interp.ModelConfig(**SMALL, **MODELS[name]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _pairs(n: int = 5, T: int = 9, at: tuple[int, ...] = (5, 6)) -> PromptPairs:
    """Pairs differing at positions ``at`` (a shared prefix of ``min(at)`` tokens)."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 40, (n, T), generator=g)
    corr = clean.clone()
    for p in at:
        corr[:, p] = (clean[:, p] + 1 + torch.randint(0, 38, (n,), generator=g)) % 40
    return PromptPairs(tuple(clean), tuple(corr), torch.randint(0, 40, (n,), generator=g),
                       torch.randint(0, 40, (n,), generator=g))


def _reference(model, pairs: PromptPairs, layer: int, hook: str, where) -> float:
    """Mean logit difference over pairs of the corrupted run with ``where`` (an index after
    the batch dimension) of ``hook`` taken from the clean run: whole forwards, one at a time."""
    out = []
    for c, k, a, w in zip(pairs.clean, pairs.corrupted, pairs.answer, pairs.wrong, strict=True):
        _, cache = model.run_with_cache(c[None], names_filter=[hook])

        def patch(x, hook, clean=cache[hook]):
            x = x.clone()
            x[(slice(None), *where)] = clean[(slice(None), *where)]
            return x

        with torch.no_grad():
            logits = model.run_with_hooks(k[None], fwd_hooks=[(hook, patch)])[0, -1]
        out.append(float(logits[a] - logits[w]))
    return float(np.mean(out))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("what", ["head", "head_pos", "resid_pre", "k", "pattern", "neuron"])
def test_fast_patching_equals_one_whole_forward_per_site(name, what):
    model, pairs = _model(name), _pairs()
    layers = [1] if what == "neuron" else None
    df = activation_patching(model, pairs, what, layers=layers, batch_size=3, max_batch=12)
    assert len(df) > 1
    checked = 0
    for row in df.sample(n=min(len(df), 8), random_state=0).itertuples():
        hook = f"blocks.{row.layer}.{HOOK[what]}"
        if what == "resid_pre":
            where = (row.pos,)
        elif what == "neuron":
            where = (slice(None), row.neuron)
        elif what == "pattern":
            where = (row.head,)
        elif what == "head_pos":
            where = (row.pos, row.head)
        else:
            where = (slice(None), row.head)
        assert row.metric == pytest.approx(_reference(model, pairs, row.layer, hook, where),
                                           abs=2e-4), row
        checked += 1
    assert checked >= 4


def test_the_prefix_is_cached_only_where_it_is_exact():
    pairs = _pairs()
    b = next(pairs.batches(5))
    assert shared_prefix(_model("rope_gqa"), b) == 5
    assert shared_prefix(_model("learned_window"), b) == 5
    assert shared_prefix(_model("prefix_lm"), b) == 0  # position 0 sees position 6
    same = PromptPairs(pairs.clean, pairs.clean, pairs.answer, pairs.wrong)
    assert shared_prefix(_model("rope_gqa"), next(same.batches(5))) == 8  # the last recomputed
    runs = PairRuns(_model("rope_gqa"), b, ["blocks.2.attn.hook_z"], [2])
    assert runs.clean["blocks.2.attn.hook_z"].shape[1] == 4 and set(runs.resid) == {2}


def test_prefix_positions_patch_to_exactly_the_corrupted_run():
    """Before the first differing token clean = corrupted: those rows are the corrupted
    metric (score 0) without a forward; the others are not."""
    df = activation_patching(_model("rope_gqa"), _pairs(), "resid_pre", layers=[0])
    assert (df[df["pos"] < 5]["score"] == 0).all()
    assert df[df["pos"] >= 5]["score"].abs().max() > 0.05


def test_bad_input_messages_are_one_line_naming_the_fix():
    model = _model("rope_gqa")
    cases = [
        (lambda: PromptPairs.from_lists([[0, 1, 2]], [[0, 1]], [3], [4]), "same length"),
        (lambda: activation_patching(model, _pairs(), "blocks.0.attn.hook_zz"), "Closest"),
        (lambda: activation_patching(model, _pairs(), "residual"), "resid_pre"),
        (lambda: ioi_pairs(model, 4, template=9), "template must be in 0..5"),
    ]
    for call, fix in cases:
        with pytest.raises(interp.InterpError, match=fix) as err:
            call()
        assert "\n" not in str(err.value), str(err.value)


def test_shipped_smollm2_ioi_report_matches_its_data_and_the_readme():
    """reports/smollm2-ioi (written by `interp patch smollm2-135m --task ioi --pairs 100`):
    every head on >= 100 pairs, the Pearson r in its summary recomputed from its own CSV, and
    the README's numbers read from the same files."""
    import pandas as pd

    from analyses.app.sections.patch import _pearson

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    report = root / "reports" / "smollm2-ioi"
    base = pd.read_csv(report / "data" / "patch_baseline.csv").iloc[0]
    heads = pd.read_csv(report / "data" / "patch_heads.csv")
    assert base["n_pairs"] >= 100 and len(heads) == 30 * 9
    r = _pearson(heads["activation"], heads["attribution"])
    assert r == pytest.approx(base["pearson_heads"], abs=1e-6)
    for name in ("patch_heads", "patch_resid", "patch_attribution_vs_activation"):
        assert (report / "figures" / f"{name}.png").stat().st_size > 10_000
    top = heads.sort_values("activation", ascending=False).iloc[0]
    readme = (root / "README.md").read_text()
    assert f"L{int(top['layer'])}H{int(top['head'])} {top['activation']:.2f}" in readme
    assert f"IO - S {base['clean']:.2f} vs {base['corrupted']:.2f}" in readme
    assert f"Pearson {r:.3f} over the 270 heads" in readme
    assert f"{base['clean']:.2f}" in (report / "index.md").read_text()
