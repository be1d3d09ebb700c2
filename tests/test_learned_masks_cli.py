"""Learned masks from the CLI and in the shipped models (issue 22): ``interp train offsets
--span-coef``, ``interp train TASK --prune CKPT --l0-coef``, ``offsets_span.pt`` and
``induction_gates.pt``."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from analyses.masking import LossBatch, head_importance, mean_loss
from analyses.masking.learned import gate_importance_agreement, learned_gates, learned_spans
from interp.checkpoint import load_checkpoint, read_checkpoint
from interp.train import shipped, task_from


def _cli(args: list[str]):
    from analyses.app.cli import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_train_offsets_with_span_coef_writes_a_span_model(tmp_path):
    out = tmp_path / "o.pt"
    r = _cli(["train", "offsets", "--span-coef", "0.3", "--steps", "4", "--config",
              '{"d_model": 32}', "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    model = load_checkpoint(out)
    assert model.cfg.adaptive_span and not model.cfg.l0_head_gates
    ckpt = read_checkpoint(out)
    m = ckpt["train"]["metrics"]
    assert ckpt["task"]["name"] == "offsets" and ckpt["train"]["train_config"]["span_coef"] == 0.3
    spans = learned_spans(model)["span"].tolist()
    assert spans == pytest.approx([m[f"span_L0H{h}"] for h in range(4)])
    assert all(s < 32 for s in spans)  # the penalty moved every span off the full context
    assert len(ckpt["train"]["history"]) == 1  # logged every 10 steps and at the end


def test_prune_trains_only_the_gates_of_a_checkpoint(tmp_path):
    out = tmp_path / "g.pt"
    src = shipped("induction")
    r = _cli(["train", "induction", "--prune", str(src), "--l0-coef", "0.3", "--lr", "0.05",
              "--steps", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    gated, plain = load_checkpoint(out), load_checkpoint(src)
    assert gated.cfg.l0_head_gates
    base = plain.state_dict()
    for k, v in gated.state_dict().items():  # weights frozen: only log_alpha moved
        if not k.endswith("log_alpha"):
            assert torch.equal(v, base[k]), k
    m = read_checkpoint(out)["train"]["metrics"]
    assert {"before_loss_repeat", "heldout_loss_before", "heldout_loss", "n_pruned"} <= set(m)
    assert "heldout_loss_before=" in r.output and "n_pruned=" in r.output  # the summary line


@pytest.mark.parametrize(("args", "match"), [
    (["train", "knowledge", "--prune", "interp/data/induction.pt", "--l0-coef", "0.1"],
     "was trained on task 'induction', not 'knowledge'"),
    (["train", "offsets", "--span-coef", "0", "--l0-coef", "0"], "needs span_coef > 0"),
    (["train", "induction", "--prune", "interp/data/induction.pt", "--l0-coef", "0.1",
      "--config", "tiny"], "keeps the checkpoint's model config"),
    (["train", "offsets", "--param", "offsets=[2,40]", "--span-coef", "0.1"], "offsets entry"),
])
def test_learned_mask_training_bad_input_is_one_line(args, match, tmp_path):
    r = _cli([*args, "--steps", "1", "--out", str(tmp_path / "x.pt"), "-q"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.output


def test_shipped_span_model_learned_the_planted_offsets():
    """offsets_span.pt (interp train offsets --span-coef 0.3 --steps 1500): each head serving a
    planted offset k reaches (z + ramp) within 2x of k (Sukhbaatar et al. 2019)."""
    model = load_checkpoint(shipped("offsets_span"))
    task = task_from(model)
    ev = task.evaluate(model)
    assert ev["accuracy"] > 0.95
    spans = learned_spans(model)
    served = {ev[f"head_k{k}"]: k for k in task.params["offsets"]}
    assert sorted(served.values()) == [2, 5, 10]  # one head per offset
    for h, k in served.items():
        assert k / 2 <= float(spans["reach"][h]) <= 2 * k, (h, k, spans)


def test_shipped_gates_prune_half_the_heads_in_importance_order():
    """induction_gates.pt (--prune induction.pt --l0-coef 0.3): >= 50% of heads pruned, the
    loss change it costs, and agreement with Michel et al.'s importance."""
    gated = load_checkpoint(shipped("induction_gates"))
    plain = load_checkpoint(shipped("induction"))
    task = task_from(plain)
    gen = torch.Generator().manual_seed(1)
    lbs = [LossBatch(b.tokens, b.labels) for b in (task.sample(32, gen) for _ in range(4))]
    agree = gate_importance_agreement(learned_gates(gated), head_importance(plain, lbs))
    assert agree["pruned_fraction"] >= 0.5
    assert agree["spearman_gate"] > 0.3 and agree["importance_pruned"] < agree["importance_kept"]
    delta = mean_loss(gated, lbs) - mean_loss(plain, lbs)
    assert 0 < delta < 0.5
    m = read_checkpoint(shipped("induction_gates"))["train"]["metrics"]
    assert m["n_pruned"] == int(learned_gates(gated)["pruned"].sum())


def test_masking_report_reads_the_shipped_gates(tmp_path):
    out = tmp_path / "r"
    r = _cli(["masking", str(shipped("induction_gates")), "--seq-len", "16", "--max-tokens",
              "48", "--pruning-steps", "2", "--random-orders", "1", "--strategy", "causal",
              "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    gates = pd.read_csv(out / "data" / "learned_gates.csv")
    assert int(gates["pruned"].sum()) >= 4
    assert f"{int(gates['pruned'].sum())} of 8 heads pruned" in (out / "index.md").read_text()
