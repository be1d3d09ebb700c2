"""Head taxonomy (analyses.heads, analyses.parses, interp heads).

What is proved here:
- planted heads (hand-set weights, tests/heads_planted.py) get exactly their labels:
  previous-token, sink, uniform, duplicate-token and an induction circuit in a decoder, a
  fixed-offset (+2) head in a bidirectional encoder;
- every streamed score equals a brute-force computation from cached patterns, whatever the batching
  and padding (running sums are exact);
- Clark et al.'s word-level syntax scores equal an independent loop implementation;
- CoNLL-U errors name the line; bad CLI input is one line and exit code 2.
Real models (MiniLM, SmolLM2, trained induction models) are in tests/test_heads_real.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import interp
from analyses import heads as H
from analyses import parses
from analyses.app.cli import cli

sys.path.insert(0, str(Path(__file__).parent))
import heads_planted  # noqa: E402

DATA = Path(__file__).parent / "data"
CONLLU = DATA / "heads_sentences.conllu"


def labels(df: pd.DataFrame) -> dict[tuple[int, int], str]:
    return {(int(r.layer), int(r.head)): r.label for r in df.itertuples()}


# --------------------------------------------------------------------------- planted heads


def test_planted_decoder_heads_are_labelled():
    torch.manual_seed(0)
    res = H.analyze(heads_planted.decoder(), n_random=16, batch_size=8)
    got = labels(res.heads)
    assert got == heads_planted.DECODER_LABELS, res.heads[["layer", "head", "label", "criteria"]]
    h = res.heads.set_index(["layer", "head"])
    assert h.loc[(0, 0), "prev_token"] > 0.99 and h.loc[(0, 0), "positional_offset"] == -1
    assert h.loc[(0, 1), "sink_first"] > 0.99
    assert h.loc[(0, 2), "entropy_norm"] == pytest.approx(1.0, abs=1e-4)
    assert h.loc[(0, 3), "duplicate"] > 0.99
    # the induction head: prefix matching on all but the first second-copy token (whose match
    # is shared with position 0, which attends to itself in layer 0), and a pure copying OV circuit
    assert h.loc[(1, 0), "induction"] > 0.95
    assert h.loc[(1, 0), "copying"] == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(h.loc[(0, 0), "copying"])  # its OV writes where W_U does not read: no spectrum
    # only the induction head's confidence reflects it, and every label has a confidence in 0..1
    assert res.heads["confidence"].between(0, 1).all()


def test_planted_encoder_fixed_offset_head():
    res = H.analyze(heads_planted.encoder(), n_random=16, batch_size=8)
    got = labels(res.heads)
    assert got == heads_planted.ENCODER_LABELS, res.heads[["layer", "head", "label", "criteria"]]
    r = res.heads.set_index(["layer", "head"]).loc[(0, 0)]
    assert r["positional_offset"] == 2
    assert r["positional_share"] >= 0.9
    assert r["attn_offset_+2"] > 0.9


def test_unclassified_when_nothing_stands_out():
    """A random small model has diffuse heads; none may get a positional or induction label,
    and raising every threshold out of reach leaves only 'unclassified'."""
    torch.manual_seed(1)
    cfg = interp.ModelConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=50, n_ctx=64, init_std=0.02)
    model = interp.HookedTransformer(cfg).eval()
    res = H.analyze(model, n_random=8)
    assert (
        not res.heads["label"]
        .isin(["induction", "positional", "previous-token", "duplicate-token"])
        .any()
    )
    never = H.Thresholds(positional=2, prev_token=2, induction=2, duplicate=2, sink=2, semantic=2,
                         local=0, long_range=100, uniform=2)
    out = H.classify(res.heads, None, never)
    assert (out["label"] == "unclassified").all()
    assert out["confidence"].between(0, 1).all()


# --------------------------------------------------------------------------- brute force


def _random_decoder(seed: int = 0, **kw) -> interp.HookedTransformer:
    torch.manual_seed(seed)
    cfg = interp.ModelConfig(**{"n_layers": 2, "d_model": 32, "n_heads": 4, "d_vocab": 40,
                                "n_ctx": 64, "init_std": 0.3, **kw})
    return interp.HookedTransformer(cfg).eval()


def _patterns(model, tokens: torch.Tensor) -> np.ndarray:
    """[layer, head, q, k] of one unpadded sequence."""
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None], names_filter=lambda n: n.endswith("hook_pattern"), return_type=None
        )
    return np.stack(
        [cache["pattern", layer][0].numpy() for layer in range(model.cfg.n_layers)]
    ).astype(np.float64)


def _brute_token_stats(
    model, seqs: list[torch.Tensor], vocab: H.VocabInfo, causal: bool
) -> pd.DataFrame:
    """The TokenStats scores by plain loops over sequences, queries and keys."""
    L, Hn = model.cfg.n_layers, model.cfg.n_heads
    acc = {k: np.zeros((L, Hn)) for k in ("prev", "prev_n", "top_m1", "top_m1_n", "top_n",
                                          "first", "punct", "q", "dist", "udist", "entn", "rn")}
    pairs = {}  # (layer, head) -> list of (bucket, a, s)
    modes = {}  # (layer, head) -> argmax offsets
    W = torch.nn.functional.normalize(model.W_E.detach().double(), dim=-1).numpy()
    special = set(vocab.special_ids)
    punct = vocab.punct.numpy() if vocab.punct is not None else np.zeros(model.cfg.d_vocab, bool)
    for seq in seqs:
        P = _patterns(model, seq)
        ids = seq.numpy()
        T = len(ids)
        sink = np.array([i == 0 or ids[i] in special for i in range(T)])
        for layer in range(L):
            for h in range(Hn):
                p = P[layer, h]
                for q in range(T):
                    acc["q"][layer, h] += 1
                    acc["first"][layer, h] += p[q, 0]
                    acc["punct"][layer, h] += sum(p[q, k] for k in range(T) if punct[ids[k]])
                    if q >= 1:
                        acc["prev"][layer, h] += p[q, q - 1]
                        acc["prev_n"][layer, h] += 1
                    keys = [k for k in range(T) if (k <= q or not causal) and not sink[k]]
                    if keys:  # the positional argmax runs over non-sink keys
                        acc["top_n"][layer, h] += 1
                        best = keys[int(np.argmax(p[q, keys]))]
                        # Voita's share at -1 is over the real queries whose key q-1 the
                        # argmax may pick (not a special token's row, q-1 a non-sink key)
                        if ids[q] not in special and q - 1 in keys:
                            acc["top_m1_n"][layer, h] += 1
                            acc["top_m1"][layer, h] += int(best == q - 1)
                        modes.setdefault((layer, h), []).append(max(-32, min(32, best - q)))
                    if len(keys) >= 2:
                        r = sum(p[q, k] for k in keys)
                        if r > 1e-4:
                            a = np.array([p[q, k] / r for k in keys])
                            acc["dist"][layer, h] += sum(
                                a[i] * abs(q - k) for i, k in enumerate(keys)
                            )
                            acc["udist"][layer, h] += np.mean([abs(q - k) for k in keys])
                            ent = -sum(x * math.log(x) for x in a if x > 0)
                            acc["entn"][layer, h] += ent / math.log(len(keys))
                            acc["rn"][layer, h] += 1
                    for k in keys:
                        if k != q and not sink[q] and not punct[ids[k]] and ids[k] != ids[q]:
                            b = max(-32, min(32, k - q))
                            pairs.setdefault((layer, h), []).append(
                                (b, p[q, k], float(W[ids[q]] @ W[ids[k]]))
                            )
    rows = []
    for layer in range(L):
        for h in range(Hn):
            pr = pd.DataFrame(pairs.get((layer, h), []), columns=["b", "a", "s"])
            # partial correlation with offset fixed effects: demean within offset, then correlate
            if len(pr):
                ra = pr["a"] - pr.groupby("b")["a"].transform("mean")
                rs = pr["s"] - pr.groupby("b")["s"].transform("mean")
                sem = float((ra * rs).sum() / math.sqrt((ra**2).sum() * (rs**2).sum()))
            else:
                sem = np.nan
            rows.append(
                {
                    "layer": layer,
                    "head": h,
                    "prev_token": acc["prev"][layer, h] / acc["prev_n"][layer, h],
                    "top_offset_-1": acc["top_m1"][layer, h] / acc["top_m1_n"][layer, h],
                    "sink_first": acc["first"][layer, h] / acc["q"][layer, h],
                    "punct": acc["punct"][layer, h] / acc["q"][layer, h],
                    "mean_distance": acc["dist"][layer, h] / acc["rn"][layer, h],
                    "distance_ratio": acc["dist"][layer, h] / acc["udist"][layer, h],
                    "entropy_norm": acc["entn"][layer, h] / acc["rn"][layer, h],
                    "semantic": sem,
                    "mode_share": pd.Series(modes[(layer, h)]).value_counts().max()
                    / acc["top_n"][layer, h],
                }
            )
    return pd.DataFrame(rows)


def _padded_batches(seqs: list[torch.Tensor], batch_size: int) -> list[H.TokenBatch]:
    out = []
    for i in range(0, len(seqs), batch_size):
        part = seqs[i: i + batch_size]
        T = max(len(s) for s in part)
        tokens = torch.zeros(len(part), T, dtype=torch.long)
        valid = torch.zeros(len(part), T, dtype=torch.bool)
        for b, s in enumerate(part):
            tokens[b, : len(s)] = s
            valid[b, : len(s)] = True
        out.append(H.TokenBatch(tokens, valid))
    return out


@pytest.mark.parametrize("architecture", ["decoder", "encoder"])
def test_token_stats_equal_brute_force_under_any_batching(architecture):
    model = _random_decoder(architecture=architecture, has_unembed=architecture == "decoder")
    gen = torch.Generator().manual_seed(3)
    seqs = [
        torch.randint(1, 40, (int(n),), generator=gen)
        for n in torch.randint(5, 14, (7,), generator=gen)
    ]
    for s in seqs:
        s[0] = 0  # a BOS-like special first token
    punct = torch.zeros(40, dtype=torch.bool)
    punct[[5, 6, 7]] = True
    vocab = H.VocabInfo(bos_id=0, special_ids=(0,), punct=punct)
    ref = _brute_token_stats(model, seqs, vocab, causal=architecture == "decoder").set_index(
        ["layer", "head"]
    )
    frames = []
    for bs in (1, 3, 7):  # padding differs with the batching; results may not
        acc = H.TokenStats(model, vocab)
        H.scan(model, _padded_batches(seqs, bs), [acc])
        frames.append(acc.frame().set_index(["layer", "head"]))
    for f in frames:
        for col in ref.columns:
            np.testing.assert_allclose(
                f[col].to_numpy(), ref[col].to_numpy(), rtol=1e-5, atol=1e-6, err_msg=col
            )
        # BOS is always first here
        assert f["bos"].to_numpy() == pytest.approx(f["sink_first"].to_numpy())


def test_repeat_stats_equal_brute_force():
    model = _random_decoder(seed=2)
    batches = list(H.random_batches(model, n_seqs=5, half_len=6, batch_size=2, seed=1))
    acc = H.RepeatStats(model)
    H.scan(model, batches, [acc])
    got = acc.frame().set_index(["layer", "head"])
    ind, dup, n = np.zeros((2, 4)), np.zeros((2, 4)), 0
    for b in batches:
        start, half = b.repeat
        for seq in b.tokens:
            P = _patterns(model, seq)
            assert torch.equal(seq[start: start + half], seq[start + half: start + 2 * half])
            assert len(set(seq[start: start + half].tolist())) == half  # distinct tokens in a copy
            for q in range(start + half, start + 2 * half):
                ind += P[:, :, q, q - half + 1]
                dup += P[:, :, q, q - half]
                n += 1
    np.testing.assert_allclose(got["induction"].to_numpy(), (ind / n).reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(got["duplicate"].to_numpy(), (dup / n).reshape(-1), rtol=1e-5)


def test_copying_score_matches_full_vocabulary_circuit():
    """The d_head x d_head cyclic product has the same score as the [vocab, vocab] circuit."""
    model = _random_decoder(seed=4, norm="rmsnorm", n_kv_heads=2)
    with torch.no_grad():
        for b in model.blocks:
            b.ln1.w.uniform_(0.5, 1.5)
        model.ln_final.w.uniform_(0.5, 1.5)
    got = H.copying_scores(model).set_index(["layer", "head"])["copying"]
    for layer, block in enumerate(model.blocks):
        for h in range(4):
            full = (
                (model.W_E * block.ln1.w)
                @ block.attn.W_V[h // 2]
                @ block.attn.W_O[h]
                @ (model.ln_final.w[:, None] * model.W_U)
            )
            ev = torch.linalg.eigvals(full.double().detach())
            assert got[(layer, h)] == pytest.approx(float(ev.sum().real / ev.abs().sum()), abs=1e-6)


def test_copying_is_nan_without_unembedding():
    model = _random_decoder(architecture="encoder", has_unembed=False)
    assert H.copying_scores(model)["copying"].isna().all()


# --------------------------------------------------------------------------- syntax (Clark et al.)


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from interp.loading import builtin_path

    try:
        return AutoTokenizer.from_pretrained(str(builtin_path("minilm")))
    except interp.InterpError as e:
        pytest.skip(str(e))


def _brute_syntax(model, sentences, tok) -> pd.DataFrame:
    """Clark et al.'s method with loops, and an alignment by character search."""
    rows = {}
    causal = model.cfg.architecture == "decoder"
    for s in sentences:
        text = s.text
        enc = tok(
            text,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            add_special_tokens=not causal,
        )
        starts, ends = s.spans
        p2w = []
        for (a, b), sp in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True):
            while a < b and text[a].isspace():
                a += 1
            w = [i for i in range(len(s)) if starts[i] <= a < ends[i]]
            p2w.append(w[0] if (not sp and b > a and w) else -1)
        P = _patterns(model, torch.tensor(enc["input_ids"]))
        n = len(s)
        for layer in range(P.shape[0]):
            for h in range(P.shape[1]):
                Wm = np.zeros((n, n))
                for qw in range(n):
                    qp = [i for i, w in enumerate(p2w) if w == qw]
                    for kw in range(n):
                        kp = [i for i, w in enumerate(p2w) if w == kw]
                        Wm[qw, kw] = (
                            np.mean([sum(P[layer, h, i, j] for j in kp) for i in qp]) if qp else 0
                        )
                for dep, head in enumerate(s.heads):
                    if head < 0:
                        continue
                    rel = parses.relation_of(s.deprels[dep])
                    for direction, (q, t) in enumerate(((dep, head), (head, dep))):
                        if causal and t > q:
                            continue
                        row = Wm[q].copy()
                        row[q] = -np.inf
                        key = (rel, H.DIRECTIONS[direction], layer, h)
                        hit, tot = rows.get(key, (0, 0))
                        rows[key] = (hit + int(np.argmax(row) == t), tot + 1)
    return pd.DataFrame([(*k, v[0] / v[1], v[1]) for k, v in rows.items()],
                        columns=["relation", "direction", "layer", "head", "accuracy", "n"])


@pytest.mark.parametrize("architecture", ["encoder", "decoder"])
def test_syntax_scores_equal_loop_implementation(bert_tokenizer, architecture):
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=bert_tokenizer.vocab_size,
                             n_ctx=128, architecture=architecture, init_std=0.5,
                             has_unembed=False)
    model = interp.HookedTransformer(cfg, tokenizer=bert_tokenizer).eval()
    model.prepend_bos = False
    sentences = list(parses.read_conllu(CONLLU))[:8]
    rel = H.RelationIndex()
    acc = H.SyntaxStats(model, rel)
    H.scan(
        model, H.sentence_batches(model, sentences, batch_size=3, relations=rel, buffer=1), [acc]
    )
    got = acc.frame().set_index(["relation", "direction", "layer", "head"]).sort_index()
    ref = (
        _brute_syntax(model, sentences, bert_tokenizer)
        .set_index(["relation", "direction", "layer", "head"])
        .sort_index()
    )
    assert list(got.index) == list(ref.index)
    np.testing.assert_allclose(got["accuracy"].to_numpy(), ref["accuracy"].to_numpy())
    assert (got["n"].to_numpy() == ref["n"].to_numpy()).all()


def test_syntax_baseline_and_fixed_offset_head(bert_tokenizer):
    """A head that attends one piece ahead predicts word i+1 from each word's last piece, so its
    accuracy is the +1 offset's wherever that offset is the baseline (Clark et al.'s comparison)."""
    V = bert_tokenizer.vocab_size
    n_ctx = 64
    cfg = interp.ModelConfig(n_layers=1, d_model=n_ctx, n_heads=1, d_head=n_ctx, d_vocab=V,
                             n_ctx=n_ctx, architecture="encoder", positional="learned",
                             attn_only=True, norm="none", has_unembed=False)
    model = interp.HookedTransformer(cfg, tokenizer=bert_tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.pos_embed.W_pos.copy_(torch.eye(n_ctx))
        a = model.blocks[0].attn
        for i in range(n_ctx - 1):
            a.W_Q[0][i, i + 1] = 200.0
        a.W_K[0][torch.arange(n_ctx), torch.arange(n_ctx)] = 1.0
    sentences = list(parses.read_conllu(CONLLU))
    res = H.analyze(model, sentences=sentences, n_random=2)
    det = res.syntax[
        (res.syntax["relation"] == "det") & (res.syntax["direction"] == "dependent->head")
    ].iloc[0]
    # every determiner in these sentences sits right before its noun except 'this year'/'the ...'
    # with an adjective
    offs = [
        h - d
        for s in sentences
        for d, (h, r) in enumerate(zip(s.heads, s.deprels, strict=True))
        if r == "det"
    ]
    share_plus1 = np.mean([o == 1 for o in offs])
    assert det["baseline_offset"] == 1
    assert det["baseline_accuracy"] == pytest.approx(share_plus1)
    assert det["accuracy"] == pytest.approx(share_plus1)
    assert det["n"] == len(offs)


# --------------------------------------------------------------------------- parses


def _line(i, form, head, rel, misc="_"):
    return "\t".join([str(i), form, "_", "_", "_", "_", str(head), rel, "_", misc])


def test_conllu_multiword_tokens_and_spacing(tmp_path):
    text = "\n".join(
        [
            "# sent_id = a",
            "1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_",
            _line(1, "do", 3, "aux"),
            _line(2, "n't", 3, "advmod"),
            _line(3, "go", 0, "root", "SpaceAfter=No"),
            "3.1\tgo\t_\t_\t_\t_\t_\t_\t_\t_",
            _line(4, "!", 3, "punct"),
            "",
        ]
    )
    (s,) = parses.parse_conllu(text)
    assert s.text == "don't go!"
    assert s.heads == (2, 2, -1, 2)
    starts, ends = s.spans
    assert [s.text[a:b] for a, b in zip(starts, ends, strict=True)] == ["do", "n't", "go", "!"]


@pytest.mark.parametrize(
    "bad, needle",
    [
        (
            _line(1, "Hi", 0, "root") + "\n2\tthere\t_\t_\n",
            "line 2: expected 10 tab-separated fields, got 4",
        ),
        (
            _line(1, "Hi", 0, "root") + "\n" + _line(2, "x", "one", "dep") + "\n",
            "line 2: HEAD 'one' is not an integer",
        ),
        (
            _line(1, "Hi", 0, "root") + "\n" + _line(2, "x", 9, "dep") + "\n",
            "line 2: HEAD 9 of word 2 points past",
        ),
        (
            _line(1, "Hi", 0, "root") + "\n" + _line(3, "x", 1, "dep") + "\n",
            "line 2: word ID 3 out of sequence",
        ),
        (
            "# c\n" + _line(1, "Hi", 2, "dep") + "\n" + _line(2, "x", 1, "dep") + "\n",
            "line 2: the sentence has no root",
        ),
        ("# only a comment\n", "holds no sentences"),
        # issue 24: str.isdigit() accepts these; int() then fails bare or reads "٣" as 3
        ("\t".join(["\u00b2", "Hi", "_", "_", "_", "_", "0", "root", "_", "_"]) + "\n",
         "line 1: word ID '\u00b2' is not an integer"),
        (_line(1, "Hi", 0, "root") + "\n" + "\t".join(["2", "x", "_", "_", "_", "_", "\u0663",
                                                       "dep", "_", "_"]) + "\n",
         "line 2: HEAD '\u0663' is not an integer"),
        ("\t".join(["1-\u00b2", "Hi", "_", "_", "_", "_", "_", "_", "_", "_"]) + "\n",
         "line 1: bad multiword token range"),
    ],
)
def test_conllu_errors_name_the_line(tmp_path, bad, needle):
    path = tmp_path / "bad.conllu"
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(interp.InterpError) as e:
        list(parses.read_conllu(path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_align_pieces_from_offsets():
    """BPE offsets carrying the preceding space, a special token, and a piece that spans two
    syntactic words (GPT-2's "don" of "do|n't") all map to the right word."""
    s = parses.Sentence(
        ("Hi", "there", ",", "do", "n't"),
        (-1, 0, 0, 4, 0),
        ("root", "x", "punct", "aux", "x"),
        (True, False, True, False, True),
    )
    assert s.text == "Hi there, don't"
    starts, ends = s.spans
    offsets = np.array([[0, 0], [0, 2], [2, 8], [8, 9], [9, 13], [13, 15]])
    special = np.array([True, False, False, False, False, False])
    got = parses._align(offsets, special, s.text, starts, ends)
    assert got.tolist() == [-1, 0, 1, 2, 3, 4]


def test_bert_alignment_covers_every_word(bert_tokenizer):
    sentences = list(parses.read_conllu(CONLLU))
    enc = parses.encode_sentences(bert_tokenizer, sentences, add_special_tokens=True)
    for e in enc:
        assert set(e.piece2word[e.piece2word >= 0].tolist()) == set(range(len(e.sentence)))
        assert e.piece2word[0] == -1 and e.piece2word[-1] == -1  # [CLS], [SEP]


def test_relation_of_keeps_requested_subtypes():
    assert parses.relation_of("nmod:poss") == "nmod:poss"
    assert parses.relation_of("nsubj:pass") == "nsubj"
    assert parses.relation_of("obl:tmod") == "obl"


@pytest.mark.slow
def test_spacy_parses_map_to_ud():
    pytest.importorskip("spacy")
    try:
        nlp = parses.load_spacy()
    except interp.InterpError as e:
        pytest.skip(str(e))
    (s,) = list(parses.spacy_sentences(["Tom and Maria ate his apple."], nlp))
    rel = dict(zip(s.words, s.deprels, strict=True))
    assert rel["apple"] == "obj" and rel["his"] == "nmod:poss"
    # UD: cc on the following conjunct
    assert s.heads[s.words.index("and")] == s.words.index("Maria")


# --------------------------------------------------------------------------- compare, inputs


def test_compare_stacks_models_and_draws():
    from analyses.app.sections.heads import compare_figure

    df = H.compare({"dec": heads_planted.decoder(), "enc": heads_planted.encoder()}, n_random=4)
    assert set(df["model"]) == {"dec", "enc"}
    assert len(df) == 8 + 4
    assert labels(df[df["model"] == "enc"]) == heads_planted.ENCODER_LABELS
    fig = compare_figure(df)
    assert len(fig.axes) == 2


def test_empty_inputs_are_errors():
    model = heads_planted.decoder()
    with pytest.raises(interp.InterpError, match="layer"):
        H.scan(model, [], [], layers=[5])
    with pytest.raises(interp.InterpError, match="n_random"):
        H.analyze(model, n_random=0)


def test_memory_state_does_not_grow_with_batches():
    """The accumulators' state is fixed-size: the same tensors after 1 and after 10 batches."""
    model = _random_decoder()
    vocab = H.VocabInfo()

    def state_bytes(n):
        acc = H.TokenStats(model, vocab)
        H.scan(
            model,
            list(H.random_batches(model, n_seqs=n, half_len=8, batch_size=1, vocab=vocab)),
            [acc],
        )
        return sum(
            v.numel() * v.element_size()
            for k, v in vars(acc).items()
            if isinstance(v, torch.Tensor) and k not in ("W_E",) and v.dtype == torch.float64
        )

    assert state_bytes(1) == state_bytes(10)


# --------------------------------------------------------------------------- CLI


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def planted_pt(tmp_path_factory):
    from interp.loading import save_checkpoint

    path = tmp_path_factory.mktemp("m") / "planted.pt"
    save_checkpoint(heads_planted.decoder(), path)
    return path


def test_cli_writes_heads_csv(planted_pt, tmp_path):
    out = tmp_path / "rep"
    r = invoke("heads", planted_pt, "--out", out, "--n-random", 8, "-q", "--layer", 1, "--head", 0)
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "data" / "heads.csv")
    for col in ("layer", "head", "label", "confidence", "prev_token", "induction", "copying",
                "sink", "semantic"):
        assert col in df.columns
    assert labels(df) == heads_planted.DECODER_LABELS
    assert (out / "figures" / "heads_labels.png").is_file()
    assert (out / "figures" / "heads_focus.png").is_file()


def test_cli_bad_inputs(planted_pt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    assert_user_error(
        invoke("heads", planted_pt, "--text", empty, "--out", tmp_path / "a"), "empty"
    )
    bad = tmp_path / "bad.conllu"
    bad.write_text(_line(1, "Hi", 0, "root") + "\n2\tthere\n", encoding="utf-8")
    assert_user_error(
        invoke("heads", planted_pt, "--conllu", bad, "--out", tmp_path / "b"), "line 2"
    )
    assert_user_error(
        invoke("heads", planted_pt, "--layer", 7, "--out", tmp_path / "c"),
        "Layer 7 is out of range",
    )
    assert_user_error(
        invoke("heads", planted_pt, "--layer", 0, "--head", 4, "--out", tmp_path / "d"),
        "Head 4 is out of range",
    )
    assert_user_error(
        invoke("heads", planted_pt, "--head", 1, "--out", tmp_path / "e"), "--head needs --layer"
    )
    # a model that cannot read text: --conllu is refused with one line
    assert_user_error(
        invoke("heads", planted_pt, "--conllu", CONLLU, "--out", tmp_path / "f"), "tokenizer"
    )
    assert not any((tmp_path / x).exists() for x in "abcdef")
