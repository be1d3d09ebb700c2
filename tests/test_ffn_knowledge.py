"""FFN knowledge storage (analyses/ffn/): facts, causal tracing, integrated
gradients, knowledge neurons, key-value memories, logit lens.

The fast paths (batched restorations from a cached corrupted run, KV-cached last-position
integrated gradients) are checked against naive full-forward implementations on tiny random
models of several architectures; the claims about where a trained model keeps its facts run
on the packaged ``knowledge`` checkpoint (interp/data/knowledge.pt).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import analyses.ffn as fk
import interp
from interp.errors import InterpError
from interp.train.tokenizers import WordTokenizer

torch.set_num_threads(1)

ARCHS = {
    "llama": dict(positional="rope", norm="rmsnorm", act="swiglu", n_kv_heads=1,
                  attn_qkv_bias=False, mlp_bias=False),
    "gpt2": dict(positional="learned", norm="layernorm", act="gelu"),
    "neox": dict(positional="rope", norm="layernorm", act="gelu", parallel_attn_mlp=True,
                 rotary_dim=4),
}


def random_model(arch: str = "llama", n_layers: int = 3, d_vocab: int = 24, seed: int = 0,
                 std: float = 0.3):
    """A tiny random decoder with peaky outputs (large init) so every layer matters."""
    torch.manual_seed(seed)
    cfg = interp.ModelConfig(n_layers=n_layers, d_model=16, n_heads=2, d_mlp=32, d_vocab=d_vocab,
                             n_ctx=32, init_std=std, **ARCHS[arch])
    return interp.HookedTransformer(cfg).eval()


def token_fact(tokens, span, answer, name="f", paraphrases=()) -> fk.PreparedFact:
    return fk.PreparedFact(name=name, prompt=name, subject=name, answer=str(answer),
                           answer_id=answer, tokens=tuple(tokens), subject_span=span,
                           paraphrase_tokens=tuple(map(tuple, paraphrases)))


# -------------------------------------------------------------------------------------- facts files
def test_shipped_facts_are_valid() -> None:
    facts = fk.load_facts(fk.default_facts_path())
    assert len(facts) >= 60
    assert len({f.relation for f in facts}) >= 5
    assert all(f.subject in f.prompt and f.answer and len(f.paraphrases) >= 1 for f in facts)
    assert len({(f.prompt, f.answer) for f in facts}) == len(facts)


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "The capital of France is", "subject": "France"}', "'answer'"),
    ('{"prompt": "The capital of France is", "subject": "Spain", "answer": "Paris"}',
     "does not occur"),
    ('{"prompt": "x y", "subject": "x", "answer": "z", "paraphrases": "x is"}', "paraphrases"),
    ('["prompt"]', "JSON object"),
])
def test_malformed_facts_name_the_line(tmp_path: Path, line: str, needle: str) -> None:
    good = json.dumps({"prompt": "The capital of Italy is", "subject": "Italy", "answer": "Rome"})
    path = tmp_path / "facts.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(InterpError) as e:
        fk.load_facts(path)
    msg = str(e.value)
    assert "line 3" in msg and needle in msg and "\n" not in msg


def test_missing_and_empty_facts_files(tmp_path: Path) -> None:
    with pytest.raises(InterpError, match="does not exist"):
        fk.load_facts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n# only a comment\n")
    with pytest.raises(InterpError, match="no facts"):
        fk.load_facts(tmp_path / "empty.jsonl")


def test_models_without_unembedding_or_ffn_are_refused() -> None:
    enc = interp.HookedTransformer(interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=10,
                                                      n_ctx=8, architecture="encoder",
                                                      has_unembed=False))
    with pytest.raises(InterpError, match="no unembedding"):
        fk.check_model(enc)
    attn_only = interp.HookedTransformer(interp.ModelConfig(n_layers=1, d_model=16, n_heads=2,
                                                            d_vocab=10, n_ctx=8, attn_only=True))
    with pytest.raises(InterpError, match="no dense FFN"):
        fk.check_model(attn_only)
    with pytest.raises(InterpError, match="unembedding"):
        fk.kv_memories(enc, [])


# ------------------------------------------------------------------------- word-level trained model
FACTS = [  # a tiny world, written for this test
    ("the capital of avalon is", "avalon", "camelot", ["avalon has the capital"]),
    ("the capital of borea is", "borea", "frost", ["borea has the capital"]),
    ("the capital of cydonia is", "cydonia", "mesa", ["cydonia has the capital"]),
    ("the language of avalon is", "avalon", "latin", ["avalon people speak"]),
    ("the language of borea is", "borea", "runic", ["borea people speak"]),
    ("the language of cydonia is", "cydonia", "martian", ["cydonia people speak"]),
]
TEXT = ["the old king of avalon rode to camelot", "snow fell on borea and the frost stayed",
        "on cydonia the mesa is red", "people speak latin in avalon"]


@pytest.fixture(scope="module")
def word_model():
    """A 2-layer model with a word tokenizer, trained for a few seconds until it knows FACTS."""
    words = sorted({w for p, _, a, ps in FACTS for w in (p + " " + a + " " + " ".join(ps)).split()}
                   | {w for t in TEXT for w in t.split()})
    tok = WordTokenizer(["<bos>", "<pad>", *words], bos_token="<bos>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, d_vocab=len(tok),
                             n_ctx=16)
    model = interp.HookedTransformer(cfg, tokenizer=tok)
    seqs = ([p + " " + a for p, _, a, _ in FACTS]
            + [q + " " + a for _, _, a, ps in FACTS for q in ps] + TEXT)
    tokens, mask, _ = fk._pad([model.to_tokens(s)[0].tolist() for s in seqs], tok.pad_token_id,
                              "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(tokens, attention_mask=mask, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def word_facts(word_model):
    return fk.prepare_facts(word_model, [fk.Fact(p, s, a, tuple(ps)) for p, s, a, ps in FACTS])


def test_prepare_facts_spans_and_answers(word_model, word_facts) -> None:
    f = word_facts[0]
    strs = word_model.to_str_tokens(f.prompt)
    assert strs[f.subject_span[0]:f.subject_span[1]] == ["avalon"]
    assert word_model.tokenizer.decode([f.answer_id]) == "camelot"
    assert len(f.prompts) == 2
    known, table = fk.known_facts(word_model, word_facts)
    assert len(known) == len(FACTS) and table["known"].all()
    with pytest.raises(InterpError, match="does not occur"):
        fk.prepare_facts(word_model, [fk.Fact("the capital of avalon is", "borea", "camelot")])


def test_logit_lens_ends_at_the_model_output(word_model, word_facts) -> None:
    ll = fk.logit_lens(word_model, word_facts)
    assert set(ll["layer"]) == {-1, 0, 1}
    final = ll[ll["layer"] == 1]
    probs = fk._last_probs(word_model, [f.tokens for f in word_facts])
    expected = [float(probs[i, f.answer_id]) for i, f in enumerate(word_facts)]
    assert final["answer_prob"].tolist() == pytest.approx(expected, abs=1e-5)
    assert final["kl_to_final"].max() < 1e-5 and (final["answer_rank"] == 1).all()
    assert ll[ll["layer"] == -1]["kl_to_final"].mean() > final["kl_to_final"].mean()


# ----------------------------------------------------------------------------- integrated gradients
def _zero_layer_prob(model, tokens, answer, layer) -> float:
    def zero(act, hook):
        act = act.clone()
        act[:, -1] = 0
        return act
    logits = model.run_with_hooks(torch.tensor([tokens]),
                                  fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", zero)])
    return float(torch.softmax(logits[0, -1].float(), -1)[answer])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_integrated_gradients_completeness(arch: str) -> None:
    """Attributions of each layer sum to P(answer) - P(answer | that layer zeroed), within 5%."""
    model = random_model(arch)
    tokens = [3, 7, 1, 9, 4, 11]
    with torch.no_grad():
        answer = int(model(torch.tensor([tokens]))[0, -1].argmax())
    res = fk.integrated_gradients(model, tokens, answer, steps=20)
    checked = 0
    for layer in range(model.cfg.n_layers):
        base = _zero_layer_prob(model, tokens, answer, layer)
        assert float(res.baseline_probs[layer]) == pytest.approx(base, abs=1e-5)
        delta = res.prob - base
        total = float(res.attributions[layer].sum())
        if abs(delta) > 1e-3:
            assert total == pytest.approx(delta, rel=0.05), (layer, total, delta)
            checked += 1
    assert checked >= 2


def test_integrated_gradients_right_rule_and_bad_input() -> None:
    model = random_model("gpt2")
    tokens = [2, 5, 8, 1]
    coarse = fk.integrated_gradients(model, tokens, 3, steps=4, rule="right").attributions
    fine = fk.integrated_gradients(model, tokens, 3, steps=200, rule="right").attributions
    mid = fk.integrated_gradients(model, tokens, 3, steps=20).attributions
    # the midpoint rule at 20 steps is closer to the converged integral than the right rule at 4
    assert (mid - fine).abs().sum() < (coarse - fine).abs().sum()
    with pytest.raises(InterpError, match="rule"):
        fk.integrated_gradients(model, tokens, 3, rule="left")


# ----------------------------------------------------------------------------------- causal tracing
def _naive_prob(model, clean, corrupted, noise, span, answer, hooks_at) -> float:
    """P(answer) with restorations done by plain hooks on a full forward (the reference)."""
    _, cache = model.run_with_cache(torch.tensor([clean]))
    hooks = []
    if noise is not None:
        def add(act, hook):
            act = act.clone()
            act[:, span[0]:span[1]] += noise
            return act
        hooks.append(("hook_embed", add))
    for name, pos in hooks_at:
        def restore(act, hook, name=name, pos=pos):
            act = act.clone()
            act[:, pos] = cache[name][0, pos]
            return act
        hooks.append((name, restore))
    logits = model.run_with_hooks(torch.tensor([corrupted]), fwd_hooks=hooks)
    return float(torch.softmax(logits[0, -1].float(), -1)[answer])


@pytest.mark.parametrize("arch, merge", [("llama", True), ("gpt2", True), ("neox", False),
                                         ("llama", False)])
def test_fast_causal_trace_equals_naive_restoration(arch: str, merge: bool) -> None:
    model = random_model(arch, n_layers=4)
    facts = [token_fact([0, 5, 6, 7, 2, 3], (1, 4), 9, "a"),
             token_fact([0, 8, 10, 12, 2, 3], (1, 4), 4, "b")]
    S, window = 2, 2
    trace = fk.causal_trace(model, facts, n_samples=S, window=window, seed=3,
                            corruptions=("noise",), single_kinds=("mlp", "attn"),
                            merge_positions=merge, max_rows=40)
    std = fk._subject_embed_std(model, facts)
    noise = torch.randn((S, 3, 16), generator=torch.Generator().manual_seed(3)) * 3.0 * std
    f = facts[0]
    rows = trace[trace["fact"] == "a"]
    assert set(rows["kind"]) == {"resid", "mlp", "attn", "mlp_single", "attn_single"}
    assert set(rows["position"]) == set(range(1, 6))
    for _, r in rows.sample(12, random_state=0).iterrows():
        base = r["kind"].split("_")[0]
        if base == "resid":
            at = [(f"blocks.{r['layer']}.hook_resid_post", r["position"])]
        else:
            w = 1 if r["kind"].endswith("_single") else window
            hook = "hook_mlp_out" if base == "mlp" else "hook_attn_out"
            at = [(f"blocks.{j}.{hook}", r["position"])
                  for j in fk._window_layers(r["layer"], w, 4)]
        ref = sum(_naive_prob(model, f.tokens, f.tokens, noise[s], f.subject_span, f.answer_id, at)
                  for s in range(S)) / S
        assert r["restored_prob"] == pytest.approx(ref, abs=1e-5), r.to_dict()
    corrupt = sum(_naive_prob(model, f.tokens, f.tokens, noise[s], f.subject_span, f.answer_id, [])
                  for s in range(S)) / S
    assert rows["corrupt_prob"].iloc[0] == pytest.approx(corrupt, abs=1e-5)
    # restoring the whole stream after the last layer at the last position gives the clean output
    top = rows[(rows["kind"] == "resid") & (rows["layer"] == 3) & (rows["position"] == 5)].iloc[0]
    assert top["restored_prob"] == pytest.approx(top["clean_prob"], abs=1e-5)


def test_token_replacement_trace_equals_naive() -> None:
    model = random_model("llama", n_layers=3)
    facts = [token_fact([0, 5, 6, 2, 3], (1, 3), 9, "a"),
             token_fact([0, 8, 10, 2, 3], (1, 3), 4, "b"),
             token_fact([0, 11, 12, 2, 3], (1, 3), 7, "c")]
    trace = fk.causal_trace(model, facts, n_samples=2, window=1, seed=5, corruptions=("replace",))
    subs = fk._replacements(facts[0], facts, 2, torch.Generator().manual_seed(5))
    assert len(subs) == 2
    f = facts[0]
    rows = trace[trace["fact"] == "a"]
    assert set(rows["kind"]) == {"resid", "mlp", "attn"} and (rows["n_samples"] == 2).all()
    for _, r in rows.sample(8, random_state=1).iterrows():
        name = {"resid": "hook_resid_post", "mlp": "hook_mlp_out",
                "attn": "hook_attn_out"}[r["kind"]]
        ref = sum(_naive_prob(model, f.tokens, [0, *s, 2, 3], None, f.subject_span, f.answer_id,
                              [(f"blocks.{r['layer']}.{name}", r["position"])]) for s in subs) / 2
        assert r["restored_prob"] == pytest.approx(ref, abs=1e-5)


def test_trace_roles_window_and_average() -> None:
    assert [fk.default_window(n) for n in (1, 2, 6, 12, 30, 48)] == [1, 1, 3, 5, 10, 10]
    assert list(fk._window_layers(5, 10, 48)) == list(range(0, 10))
    assert list(fk._window_layers(0, 3, 4)) == [0, 1]
    roles = [fk._position_role(p, (1, 4), 7) for p in range(1, 7)]
    assert roles == ["subject_first", "subject_middle", "subject_last", "subsequent_first",
                     "subsequent_further", "last"]
    long = token_fact(list(range(12)), (2, 7), 3)  # subject 2..6, further tokens 8..10
    assert fk._traced_positions(long, "roles") == [2, 4, 6, 7, 9, 11]
    assert fk._traced_positions(long, "all") == list(range(2, 12))
    model = random_model("gpt2", n_layers=2)
    facts = [token_fact([0, 5, 6, 2, 3], (1, 3), 9, "a"), token_fact([0, 8, 2, 3], (1, 2), 4, "b")]
    trace = fk.causal_trace(model, facts, n_samples=2, corruptions=("noise",))
    avg = fk.average_trace(trace)
    one = avg[(avg["kind"] == "mlp") & (avg["role"] == "subject_last")
              & (avg["layer"] == 0)].iloc[0]
    per_fact = trace[(trace["kind"] == "mlp") & (trace["role"] == "subject_last")
                     & (trace["layer"] == 0)]
    assert one["aie"] == pytest.approx(per_fact["indirect_effect"].mean()) and one["n_facts"] == 2
    with pytest.raises(InterpError, match="trace kind"):
        fk.causal_trace(model, facts, kinds=("mlp", "ffn"))


# -------------------------------------------------------------------------------- knowledge neurons
def test_knowledge_neurons_refine_and_edit(word_model, word_facts) -> None:
    ref = fk.refined_neurons(word_model, word_facts, steps=8)
    kn_all = fk.knowledge_neurons(word_model, word_facts, max_shared=None, refined=ref)
    kn = fk.knowledge_neurons(word_model, word_facts, max_shared=0, refined=ref)
    assert len(kn_all) == len(kn) and kn_all["kept"].all()
    # kept = shared with no fact of another answer; share >= 0.7 of 2 prompts means both
    assert (kn[kn["kept"]]["shared_with"] == 0).all() and (kn["share"] == 1.0).all()
    # the shared count is right for one neuron
    r = kn.iloc[0]
    owners = [i for i, sel in enumerate(ref)
              if (r["layer"], r["neuron"]) in sel and word_facts[i].name != r["fact"]]
    assert r["shared_with"] == len(owners)
    edits = fk.edit_knowledge_neurons(word_model, word_facts, kn_all, n_unrelated=3)
    assert set(edits["target"]) == {"self", "unrelated"}
    assert not (edits["target_fact"] == edits["fact"])[edits["target"] == "unrelated"].any()
    s = fk.summarize_edits(edits).set_index(["mode", "target"])
    assert s.loc[("suppress", "self"), "mean_rel_change"] < 0


def test_edit_hook_touches_only_chosen_neurons_at_last_position() -> None:
    act = torch.ones(2, 5, 6)
    # row 0 edits neurons 1 and 4 at its last position 4, row 1 only neuron 4 at position 2
    hook = fk._scale_hook(torch.tensor([0, 0, 1]), torch.tensor([4, 2]),
                          torch.tensor([1, 4, 4]), 0.0)
    out = hook(act, None)
    assert out.sum() == act.sum() - 3 and act.sum() == 60  # the input is not edited in place
    assert out[0, 4, 1] == 0 and out[0, 4, 4] == 0 and out[1, 2, 4] == 0
    assert out[1, 2, 1] == 1 and out[0, 2, 4] == 1 and out[1, 4, 4] == 1


# ------------------------------------------------------------------------------- key-value memories
def test_topk_contexts_stream_equals_global_topk() -> None:
    torch.manual_seed(0)
    store = fk.TopKContexts([0], d_mlp=4, k=3, context=2)
    all_acts, all_ctx = [], []
    for _ in range(4):
        tokens = torch.randint(0, 50, (2, 5))
        valid = torch.ones_like(tokens, dtype=torch.bool)
        valid[1, 3:] = False
        acts = torch.randn(2, 5, 4)
        win = store.windows(tokens, valid)
        store.update(0, acts[valid], win)
        all_acts.append(acts[valid])
        all_ctx.append(win)
    acts, ctx = torch.cat(all_acts), torch.cat(all_ctx)
    vals, idx = acts.topk(3, dim=0)
    assert torch.equal(store.values[0], vals)
    assert torch.equal(store.contexts[0], ctx[idx])
    # a window is the previous token, the token, then the next (-1 beyond the sequence)
    t = torch.tensor([[5, 6, 7]])
    assert store.windows(t, torch.ones_like(t, dtype=torch.bool)).tolist() == [
        [-1, 5, 6], [5, 6, 7], [6, 7, -1]]


def test_kv_memories_match_brute_force(word_model) -> None:
    batches = list(fk.corpus_batches(word_model, TEXT, batch_size=3))
    kv = fk.kv_memories(word_model, batches, top_k=4, context=3)
    assert len(kv.neurons) == 2 * 64 and set(kv.agreement["layer"]) == {0, 1}
    assert kv.agreement[["agreement_top1", "baseline_top1", "agreement_any",
                         "baseline_any"]].le(1).all().all()
    # brute force: every activation of layer 1, neuron 7, BOS excluded
    best, where = -1e9, None
    for tokens, mask in batches:
        _, cache = word_model.run_with_cache(tokens, attention_mask=mask)
        a = cache["blocks.1.mlp.hook_post"][..., 7]
        a = a.masked_fill(~mask.bool() | (tokens == word_model.tokenizer.bos_token_id), -1e9)
        if float(a.max()) > best:
            best = float(a.max())
            b, p = divmod(int(a.argmax()), a.shape[1])
            where = (tokens[b, max(1, p - 2):p + 1].tolist(),
                     tokens[b, p + 1] if p + 1 < tokens.shape[1] and mask[b, p + 1] else None)
    row = kv.neurons[(kv.neurons["layer"] == 1) & (kv.neurons["neuron"] == 7)].iloc[0]
    assert row["max_activation"] == pytest.approx(best, abs=1e-5)
    assert row["top_context"] == word_model.tokenizer.decode(where[0])
    # value projection: the promoted tokens are the top of (W_out * ln_final.w) @ W_U
    v = word_model.blocks[1].mlp.W_out[7]
    v = (v - v.mean()) * word_model.ln_final.w
    top = (v @ word_model.W_U).topk(5).indices.tolist()
    assert row["value_top"].split(" | ") == [word_model.tokenizer.decode([t]) for t in top]
    trig = fk.trigger_table(word_model, kv, [(1, 7)])
    assert len(trig) == 4 and trig["activation"].is_monotonic_decreasing


def test_agreement_is_one_when_values_predict_their_triggers() -> None:
    """A hand-built 1-layer model: neuron i fires on token i and its value writes token i + 1."""
    V = 8
    cfg = interp.ModelConfig(n_layers=1, d_model=V, n_heads=1, d_mlp=V, d_vocab=V, n_ctx=8,
                             act="relu", norm="none", positional="none", attn_qkv_bias=False,
                             attn_out_bias=False, mlp_bias=False)
    model = interp.HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        eye = torch.eye(V)
        model.embed.W_E.copy_(eye)
        model.blocks[0].mlp.fc_in.weight.copy_(eye)  # key i reads token i
        model.blocks[0].mlp.fc_out.weight.copy_(torch.roll(eye, 1, 0))  # value i writes token i + 1
        model.unembed.weight.copy_(eye)
    tokens = torch.arange(V)[None].repeat(2, 1)  # every token followed by its successor
    kv = fk.kv_memories(model, [(tokens, None)], top_k=2, context=2, n_shuffles=5)
    row = kv.agreement.iloc[0]
    assert row["agreement_top1"] == 1.0 and row["baseline_top1"] < 0.5
    assert kv.neurons["value_top"].str.split(" \\| ").str[0].tolist()[:3] == ["1", "2", "3"]


# ------------------------------------------------------------------------------ a planted mechanism
@pytest.mark.slow
def test_causal_tracing_finds_planted_subject_recall() -> None:
    """A knowledge-base model whose MLPs are switched off at the relation token (a permanent
    hook, in training and analysis) can only recall facts with MLPs at the subject; causal
    tracing must put the MLP effect there (and none at the last token)."""
    from interp.train import Knowledge

    # the task this test was written for: 92e3f74 changed Knowledge's defaults (biographies,
    # 3-token names), after which this 2-layer model's subject effect fell to 0.03 on some CPUs
    task = Knowledge(n_subjects=60, n_relations=2, min_name_len=2, bio_fraction=0.0)
    tok = task.tokenizer
    relations = torch.tensor([tok.index[r] for r in task.relations])
    torch.manual_seed(0)
    model = interp.HookedTransformer(interp.ModelConfig(n_layers=2, d_model=32, n_heads=2,
                                                        d_mlp=128, d_vocab=len(tok),
                                                        n_ctx=task.seq_len), tokenizer=tok)
    seen = {}
    model.register_forward_pre_hook(lambda mod, args: seen.__setitem__("tokens", args[0]))

    def off_at_relation(act, hook):
        return act * (~torch.isin(seen["tokens"], relations))[..., None].to(act.dtype)

    for layer in range(2):
        model.add_hook(f"blocks.{layer}.hook_mlp_out", off_at_relation, is_permanent=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        b = task.sample(64, gen)
        logits = model(b.tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.labels.flatten(),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    known, _ = fk.known_facts(model, fk.prepare_facts(model, task.facts()))
    assert len(known) >= 100
    avg = fk.average_trace(fk.causal_trace(model, fk.select_facts(known, 12), n_samples=3,
                                           corruptions=("noise",)))
    mlp = avg[avg["kind"] == "mlp"]
    best = mlp.loc[mlp["aie"].idxmax()]
    assert best["role"].startswith("subject") and best["aie"] > 0.05, mlp
    assert mlp[mlp["role"] == "last"]["aie"].abs().max() < 1e-6
    # while the residual stream at the last token carries the answer from attention
    resid = avg[(avg["kind"] == "resid") & (avg["role"] == "last")]
    assert resid["aie"].max() > 0.3


# ------------------------------------------------------------------------------ the knowledge model
@pytest.fixture(scope="module")
def knowledge():
    """The packaged ``knowledge`` checkpoint (interp.train), its known facts."""
    try:
        from interp.train import load_checkpoint, shipped

        model = load_checkpoint(shipped("knowledge"))
    except (ImportError, InterpError) as e:
        pytest.skip(f"packaged knowledge checkpoint unavailable: {e}")
    facts = fk.prepare_facts(model, fk.facts_for_model(model))
    known, _ = fk.known_facts(model, facts)
    return model, known


@pytest.mark.slow
def test_knowledge_model_strongest_mlp_effect_at_subject(knowledge) -> None:
    model, known = knowledge
    facts = fk.select_facts(known, 20, seed=0)
    avg = fk.average_trace(fk.causal_trace(model, facts, n_samples=3, corruptions=("noise",)))
    mlp = avg[avg["kind"] == "mlp"]
    best = mlp.loc[mlp["aie"].idxmax()]
    assert best["role"].startswith("subject"), mlp.pivot_table(index="role", columns="layer",
                                                               values="aie", observed=True)


@pytest.mark.slow
def test_knowledge_model_suppressing_neurons_is_specific(knowledge) -> None:
    model, known = knowledge
    facts = fk.select_facts(known, 20, seed=0)
    # Dai et al.'s selection as the issue states it (0.2 x max, shared by >= 70% of prompts); the
    # task's facts have one prompt each, and max_shared=None keeps neurons other facts share too
    kn = fk.knowledge_neurons(model, facts, max_shared=None)
    s = fk.summarize_edits(fk.edit_knowledge_neurons(model, known, kn)).set_index(
        ["mode", "target"])
    assert s.loc[("suppress", "self"), "mean_rel_change"] <= -0.5, s
    assert s.loc[("suppress", "unrelated"), "mean_abs_rel_change"] < 0.1, s


# ------------------------------------------------------------------------------------- command line
def _invoke(*args):
    from click.testing import CliRunner

    from analyses.app.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_cli_ffn_writes_the_report(tmp_path: Path, word_model, monkeypatch) -> None:
    import analyses.app.sections.ffn as section

    monkeypatch.setattr(section, "load_model", lambda *a, **k: word_model)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": p, "subject": s, "answer": a,
                                         "paraphrases": ps}) + "\n"
                             for p, s, a, ps in FACTS))
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEXT))
    out = tmp_path / "rep"
    r = _invoke("ffn", "word.pt", "--facts", facts, "--text", text, "--max-facts", 3, "--samples",
                2, "--ig-steps", 4, "--top-k", 3, "--out", out, "--quiet")
    assert r.exit_code == 0, (r.output, r.exception)
    import pandas as pd

    trace = pd.read_csv(out / "data" / "causal_trace.csv")
    assert {"fact", "kind", "layer", "position", "indirect_effect"} <= set(trace.columns)
    assert trace["fact"].nunique() == 3 and set(trace["corruption"]) == {"noise", "replace"}
    for name in ("knowledge_neurons", "kv_memories", "logit_lens", "kv_triggers", "ffn_facts"):
        assert (out / "data" / f"{name}.csv").is_file(), name
    for fig in ("ffn_trace_noise", "ffn_trace_example", "ffn_logit_lens", "ffn_kv_agreement"):
        assert (out / "figures" / f"{fig}.png").is_file(), fig
    md = (out / "index.md").read_text()
    assert "Meng" in md and "Dai" in md and "Geva" in md and "6 of 6 right" in md


def test_cli_ffn_bad_input(tmp_path: Path, word_model, monkeypatch) -> None:
    import analyses.app.sections.ffn as section

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the capital of avalon is", "subject": "avalon", '
                   '"answer": "camelot"}\n{oops\n')
    _one_line_error(_invoke("ffn", "word.pt", "--facts", bad, "--out", tmp_path / "o1"), "line 2")
    nosubj = tmp_path / "nosubj.jsonl"
    nosubj.write_text('{"prompt": "the capital of avalon is", "subject": "borea", '
                      '"answer": "camelot"}\n')
    _one_line_error(_invoke("ffn", "word.pt", "--facts", nosubj, "--out", tmp_path / "o2"),
                    "does not occur")
    enc = interp.HookedTransformer(interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=10,
                                                      n_ctx=8, architecture="encoder",
                                                      has_unembed=False))
    monkeypatch.setattr(section, "load_model", lambda *a, **k: enc)
    _one_line_error(_invoke("ffn", "minilm", "--out", tmp_path / "o3"), "no unembedding")
    assert not (tmp_path / "o3").exists()
