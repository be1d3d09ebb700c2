"""Steering: the vector lands where and as much as asked, ActAdd only on the prompt's first
positions, coefficient 0 is the plain model, bad input, and SmolLM2's sentiment curve (slow)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import interp
from analyses.app.cli import cli
from analyses.steering import (
    actadd_vector,
    caa_vector,
    lexicon_score,
    steer,
    steering_curve,
)
from interp.errors import HookNameError, InterpError

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    m = interp.load_pretrained("interp/data/induction.pt")
    m.eval()
    return m


@pytest.fixture(scope="module")
def prompts(model):
    ids = torch.randint(1, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    return [str(model.to_string(r.tolist())) for r in ids]


def test_steer_adds_exactly_and_restores(model, prompts) -> None:
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    _, clean = model.run_with_cache(prompts[0], names_filter=[HOOK])
    with steer(model, HOOK, v, 2.5):
        _, steered = model.run_with_cache(prompts[0], names_filter=[HOOK])
    torch.testing.assert_close(steered[HOOK], clean[HOOK] + 2.5 * v)
    _, after = model.run_with_cache(prompts[0], names_filter=[HOOK])
    assert torch.equal(after[HOOK], clean[HOOK])


def test_actadd_only_on_first_positions(model, prompts) -> None:
    v = actadd_vector(model, HOOK, prompts[0], prompts[1])
    assert v.ndim == 2 and v.shape[1] == model.cfg.d_model
    long = prompts[0] + " " + prompts[1]
    _, clean = model.run_with_cache(long, names_filter=[HOOK])
    with steer(model, HOOK, v, 1.0):
        _, steered = model.run_with_cache(long, names_filter=[HOOK])
    n = v.shape[0]
    torch.testing.assert_close(steered[HOOK][0, :n], clean[HOOK][0, :n] + v)
    assert torch.equal(steered[HOOK][0, n:], clean[HOOK][0, n:])


def test_curve_coefficient_zero_is_plain_model(model, prompts) -> None:
    v = caa_vector(model, HOOK, [(prompts[0], prompts[1])])
    curve = steering_curve(model, HOOK, v, prompts, [0.0, 50.0], max_new_tokens=5,
                           score=lambda t: float(len(t)))
    plain = model.generate(prompts, max_new_tokens=5, return_type="tokens",
                           padding_side="left")
    n_prompt = model.text_batch(prompts, None, "left").tokens.shape[1]
    zero = curve[curve.coeff == 0.0].continuation.tolist()
    assert zero == [str(model.to_string(r[n_prompt:].tolist())) for r in plain]
    assert curve[curve.coeff == 50.0].continuation.tolist() != zero
    assert set(curve.columns) == {"coeff", "prompt", "sample", "continuation", "score"}


def test_lexicon_score() -> None:
    assert lexicon_score("What a wonderful, lovely day") == pytest.approx(2 / 5)
    assert lexicon_score("terrible and awful") == pytest.approx(-2 / 3)
    assert lexicon_score("") == 0.0


def test_bad_input(model, prompts, tmp_path) -> None:
    with pytest.raises(HookNameError, match="Closest real names: blocks.1.hook_resid_pre"):
        with steer(model, "blocks.1.hook_resid_pree", torch.zeros(model.cfg.d_model), 1.0):
            pass
    with pytest.raises(InterpError, match="width 3 .* build the vector at the same hook"):
        with steer(model, HOOK, torch.zeros(3), 1.0):
            model(prompts[0])
    res = CliRunner().invoke(cli, ["steer", "interp/data/induction.pt", "--positive", "a",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--negative" in res.stderr


@pytest.mark.slow
def test_smollm2_caa_moves_sentiment() -> None:
    """A CAA sentiment vector on SmolLM2 moves the lexicon score with the coefficient."""
    m = interp.load_pretrained("smollm2-135m")
    m.eval()
    hook = "blocks.10.hook_resid_pre"
    v = caa_vector(m, hook)
    prompts = ["I think that the movie", "Yesterday my friend told me",
               "The new restaurant in town", "My weekend was"]
    curve = steering_curve(m, hook, v, prompts, [-2.0, 0.0, 2.0], max_new_tokens=16)
    mean = curve.groupby("coeff").score.mean()
    print(mean.to_dict())
    # measured (this checkout, greedy): -2 -> 0.000, 0 -> +0.017, +2 -> +0.071
    assert mean[2.0] > mean[0.0] and mean[2.0] - mean[-2.0] > 0.03, mean
