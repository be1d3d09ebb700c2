"""TransformerLens' library functions, fed an interp model, give the numbers a hand-written
loop gives (issue 19).

- ``transformer_lens.patching``: every ``get_act_patch_*`` used in TL's demos equals a
  patching loop written here with ``run_with_hooks`` (a small random GQA model, full grids;
  SmolLM2 on a few cells, slow). k/v patching iterates KV heads, as TL does.
- ``transformer_lens.head_detector.detect_head``: the score of each head is the share of its
  attention on the detection pattern, computed here from ``run_with_cache`` (the shipped
  two-layer induction model: a previous-token head in layer 0, an induction head in layer 1).
- ``transformer_lens.SVDInterpreter``: the OV singular vectors equal an SVD of W_V W_O
  projected on W_U (up to the sign of each vector).
- ``transformer_lens.evals`` (sanity check, induction loss) and
  ``transformer_lens.utilities.test_prompt`` (``transformer_lens.utils`` in TL 2) on SmolLM2.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from transformer_lens import SVDInterpreter, evals, head_detector
from transformer_lens import utilities as tl_utils

import interp
from interp import ModelConfig, build_model

INDUCTION = Path(interp.__file__).parent / "data" / "induction.pt"

#: TL function -> (activation, axes, how one index selects the patched slice)
PATCHERS = {
    "get_act_patch_resid_pre": ("resid_pre", ("layer", "pos"), lambda i: (slice(None), i[1])),
    "get_act_patch_attn_out": ("attn_out", ("layer", "pos"), lambda i: (slice(None), i[1])),
    "get_act_patch_mlp_out": ("mlp_out", ("layer", "pos"), lambda i: (slice(None), i[1])),
    "get_act_patch_attn_head_out_by_pos": (
        "z", ("layer", "pos", "head"), lambda i: (slice(None), i[1], i[2])),
    "get_act_patch_attn_head_q_by_pos": (
        "q", ("layer", "pos", "head"), lambda i: (slice(None), i[1], i[2])),
    "get_act_patch_attn_head_k_by_pos": (
        "k", ("layer", "pos", "head"), lambda i: (slice(None), i[1], i[2])),
    "get_act_patch_attn_head_v_by_pos": (
        "v", ("layer", "pos", "head"), lambda i: (slice(None), i[1], i[2])),
    "get_act_patch_attn_head_pattern_by_pos": (
        "pattern", ("layer", "head", "pos"), lambda i: (slice(None), i[1], i[2])),
    "get_act_patch_attn_head_out_all_pos": (
        "z", ("layer", "head"), lambda i: (slice(None), slice(None), i[1])),
    "get_act_patch_attn_head_k_all_pos": (
        "k", ("layer", "head"), lambda i: (slice(None), slice(None), i[1])),
    "get_act_patch_attn_head_v_all_pos": (
        "v", ("layer", "head"), lambda i: (slice(None), slice(None), i[1])),
    "get_act_patch_attn_head_pattern_all_pos": ("pattern", ("layer", "head"), lambda i: (
        slice(None), i[1])),
}


def act_name(act: str, layer: int) -> str:
    if act in ("resid_pre", "attn_out", "mlp_out"):
        return f"blocks.{layer}.hook_{act}"
    return f"blocks.{layer}.attn.hook_{act}"


def hand_patch(model, corrupted, clean_cache, metric, act: str, cells, select) -> list[float]:
    """The metric after patching each cell's clean activation into the corrupted run."""
    out = []
    for cell in cells:
        name = act_name(act, cell[0])

        def hook(x, hook, cell=cell, name=name):
            x = x.clone()
            x[select(cell)] = clean_cache[name][select(cell)]
            return x

        logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])
        out.append(float(metric(logits).detach()))
    return out


def grid(model, act: str, axes: tuple[str, ...], n_pos: int) -> list[tuple[int, ...]]:
    heads = model.cfg.n_kv_heads if act in ("k", "v") else model.cfg.n_heads
    size = {"layer": model.cfg.n_layers, "pos": n_pos, "head": heads}
    return list(itertools.product(*(range(size[a]) for a in axes)))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=50, n_ctx=16,
        positional="rope", norm="rmsnorm", act="swiglu",
    )
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(0, 50, (2, 2, 4), generator=g)
    _, cache = model.run_with_cache(clean)
    return model, corrupted, cache, lambda logits: logits[:, -1, 7].mean() - logits[:, -1, 3].mean()


@pytest.mark.parametrize("fn", list(PATCHERS))
def test_patching_equals_a_hand_loop_on_a_small_gqa_model(small, fn: str) -> None:
    model, corrupted, cache, metric = small
    act, axes, select = PATCHERS[fn]
    got = getattr(tlp, fn)(model, corrupted, cache, metric)
    cells = grid(model, act, axes, corrupted.shape[1])
    want = hand_patch(model, corrupted, cache, metric, act, cells, select)
    assert got.shape == tuple(max(c[i] for c in cells) + 1 for i in range(len(axes)))
    torch.testing.assert_close(got.flatten(), torch.tensor(want), atol=1e-6, rtol=1e-6)
    base = float(metric(model(corrupted)))
    assert any(abs(w - base) > 1e-4 for w in want), "no patch changed the metric"


@pytest.fixture(scope="module")
def smollm2():
    try:
        model = interp.load_pretrained("smollm2-135m")
    except interp.InterpError as e:  # the package that holds the weights is missing
        pytest.skip(str(e))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("fn", [
    "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_resid_pre",
])
def test_patching_equals_a_hand_loop_on_smollm2(smollm2, fn: str) -> None:
    model = smollm2
    clean = model.to_tokens("When John and Mary went to the shops, John gave the bag to")
    corrupted = model.to_tokens("When John and Mary went to the shops, Mary gave the bag to")
    _, cache = model.run_with_cache(clean)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    act, axes, select = PATCHERS[fn]
    T = clean.shape[1]
    picks = {"layer": (2, 9), "pos": (T - 1, 2), "head": (0, 2)}  # 2 KV heads in the range
    cells = list(zip(*(picks[a] for a in axes), strict=True))
    index_df = pd.DataFrame(cells, columns=[a if a != "head" else "head" for a in axes])
    got = getattr(tlp, fn)(model, corrupted, cache, metric, index_axis_names=None,
                           index_df=index_df)
    want = hand_patch(model, corrupted, cache, metric, act, cells, select)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=1e-4)


def _induction_model():
    return interp.load_pretrained(str(INDUCTION))


def _score(pattern: torch.Tensor, detection: torch.Tensor) -> float:
    """TL's "mul" score with exclude_bos: the share of non-BOS attention on the pattern."""
    pattern = pattern.clone()
    pattern[:, 0] = 0
    return float((pattern * detection).sum() / pattern.sum())


@pytest.mark.parametrize("kind", ["previous_token_head", "induction_head", "duplicate_token_head"])
def test_detect_head_equals_scores_from_the_cache(kind: str) -> None:
    model = _induction_model()
    ids = torch.randint(1, model.cfg.d_vocab, (15,), generator=torch.Generator().manual_seed(0))
    words = " ".join(model.tokenizer.tokens[i] for i in ids.tolist() * 2)  # repeated once
    scores = head_detector.detect_head(model, words, kind, exclude_bos=True)
    tokens = model.to_tokens(words)
    detection = getattr(head_detector, f"get_{kind}_detection_pattern")(tokens.cpu())
    _, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    want = torch.tensor([
        [_score(cache["pattern", layer][h], detection) for h in range(model.cfg.n_heads)]
        for layer in range(model.cfg.n_layers)
    ])
    torch.testing.assert_close(scores.float(), want, atol=1e-5, rtol=1e-5)
    if kind == "induction_head":  # the trained model's layer-1 induction heads
        assert float(scores[1].max()) > 0.5 > float(scores[0].max())


def test_svd_interpreter_ov_vectors_equal_a_hand_svd() -> None:
    model = _induction_model()
    got = SVDInterpreter(model).get_singular_vectors("OV", layer_index=1, head_index=2,
                                                     num_vectors=3)
    attn = model.blocks[1].attn
    with torch.no_grad():
        _, _, vh = torch.linalg.svd(attn.W_V[2] @ attn.W_O[2])
        want = (model.W_U.T @ vh[:3].T).unsqueeze(1)
    assert got.shape == (model.cfg.d_vocab, 1, 3)
    for i in range(3):  # singular vectors are defined up to their sign
        a, b = got[:, 0, i], want[:, 0, i]
        assert torch.allclose(a, b, atol=1e-4) or torch.allclose(a, -b, atol=1e-4), i


@pytest.mark.slow
def test_tl_evals_and_test_prompt_on_smollm2(smollm2, capsys) -> None:
    model = smollm2
    loss = evals.sanity_check(model)
    assert 0.5 < float(loss) < 5.0  # TL's rule of thumb: < 5 the model is probably OK
    torch.manual_seed(0)
    induction = evals.induction_loss(model, batch_size=2, subseq_len=30, device="cpu")
    # random tokens cost ~ln(49152) = 10.8 nats unrepeated; SmolLM2 copies the repeat
    assert float(induction) < 4.0
    tl_utils.test_prompt("The capital of France is", " Paris", model, top_k=3)
    out = capsys.readouterr().out
    assert "Rank: 0" in out and "Paris" in out
