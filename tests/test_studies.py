"""Training studies (issue 22): pre/post-norm and masking strategies, their CLI reports."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from analyses.studies import MarkovCorpus
from analyses.studies.loop import count_spikes, seeded
from analyses.studies.masking import mlm_corrupt
from analyses.studies.norm import init_grad_norms, norm_config
from interp import HookedTransformer


def _cli(args: list[str]):
    from analyses.app.cli import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_corpus_floors_are_ordered_and_sampling_is_seeded():
    c = MarkovCorpus(vocab=16, branching=3)
    assert 0 < c.entropy_rate() < c.unigram_entropy() <= math.log(16) + 1e-9
    assert 0 < c.bayes_next_accuracy() < c.bayes_cloze_accuracy() <= 1
    a = c.sample(4, 12, torch.Generator().manual_seed(3))
    b = c.sample(4, 12, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.max() < 16
    # every transition the sample takes is one of the chain's
    assert bool((c.trans[a[:, :-1], a[:, 1:]] > 0).all())


def test_mlm_corruption_is_bert_80_10_10():
    c = MarkovCorpus()
    toks = c.sample(256, 64, torch.Generator().manual_seed(0))
    inputs, labels = mlm_corrupt(toks, c, torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert torch.equal(labels[chosen], toks[chosen])
    masked = (inputs == c.mask_id) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.03
    assert torch.equal(inputs[~chosen], toks[~chosen])


def test_count_spikes():
    flat = np.ones(50)
    assert count_spikes(flat) == 0
    spiky = flat.copy()
    spiky[[30, 40]] = 2.0
    spiky[45] = np.nan
    assert count_spikes(spiky) == 3


def test_post_ln_has_the_larger_gradients_near_the_output_at_init():
    """Xiong et al. (2020): at init the last layers' gradients are larger for post-LN than for
    pre-LN (whose gradients shrink towards the output)."""
    c = MarkovCorpus()
    g = torch.Generator().manual_seed(0)
    batches = [c.sample(8, 32, g) for _ in range(2)]
    grads = {}
    for norm in ("pre", "post"):
        model = seeded(0, lambda norm=norm: HookedTransformer(norm_config(c, 6, norm,
                                                                         seq_len=32)))
        grads[norm] = init_grad_norms(model, batches)
        assert list(grads[norm].columns) == ["layer", "grad_block", "grad_ffn_out"]
    pre, post = grads["pre"]["grad_block"], grads["post"]["grad_block"]
    assert post.iloc[-1] > 2 * pre.iloc[-1]
    assert pre.iloc[-1] < pre.iloc[0]


def test_study_norm_cli_report_is_seed_reproducible(tmp_path):
    args = ["study", "norm", "--depths", "1,2", "--seeds", "0,1", "--steps", "4", "--warmup",
            "2", "--threads", "1", "-q"]
    r1 = _cli([*args, "--out", str(tmp_path / "a")])
    assert r1.exit_code == 0, r1.output
    r2 = _cli([*args, "--out", str(tmp_path / "b")])
    assert r2.exit_code == 0, r2.output
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "figures" / "study_norm.png").stat().st_size > 1000
    for name in ("norm_runs", "norm_init_grads", "norm_history", "norm_summary", "norm_floors"):
        assert (a / "data" / f"{name}.csv").read_bytes() == (b / "data" / f"{name}.csv"
                                                             ).read_bytes(), name
    runs = pd.read_csv(a / "data" / "norm_runs.csv")
    assert len(runs) == 2 * 2 * 2 * 2  # norms x depths x warm-ups x seeds
    assert {"norm", "depth", "warmup", "seed", "final_loss", "failed", "spikes",
            "max_grad_norm"} <= set(runs.columns)
    assert sorted(runs.warmup.unique()) == [0, 2]
    grads = pd.read_csv(a / "data" / "norm_init_grads.csv")
    assert len(grads) == 2 * 2 * (1 + 2)  # norms x seeds x layers over depths
    hist = pd.read_csv(a / "data" / "norm_history.csv")
    assert len(hist) == len(runs) * 4
    text = (a / "index.md").read_text()
    assert "Xiong et al. 2020" in text and "Failure rate without warm-up" in text


def test_study_masking_cli_report(tmp_path):
    out = tmp_path / "m"
    r = _cli(["study", "masking", "--seeds", "0", "--steps", "3", "--threads", "1", "-q",
              "--out", str(out)])
    assert r.exit_code == 0, r.output
    runs = pd.read_csv(out / "data" / "masking_runs.csv")
    assert runs.strategy.tolist() == ["causal", "mlm", "prefix", "soft", "learned"]
    for col in ("next_token_accuracy", "cloze_accuracy"):
        assert runs[col].between(0, 1).all()
    assert (out / "figures" / "study_masking.png").stat().st_size > 1000
    ceil = pd.read_csv(out / "data" / "masking_ceilings.csv")
    assert ceil.bayes_cloze_accuracy.iloc[0] > ceil.bayes_next_token_accuracy.iloc[0]
    assert "Devlin et al. 2019" in (out / "index.md").read_text()


@pytest.mark.parametrize(("args", "match"), [
    (["study", "norm", "--depths", "two"], "--depths 'two' must be comma-separated integers"),
    (["study", "norm", "--depths", "0"], "needs integers >= 1"),
    (["study", "masking", "--strategies", "causal,gpt"], "unknown ['gpt']"),
    (["study", "masking", "--seeds", ""], "--seeds '' needs integers"),
])
def test_study_bad_input_is_one_line(args, match, tmp_path):
    r = _cli([*args, "--out", str(tmp_path / "x"), "-q"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.output
