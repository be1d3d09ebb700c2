"""SAEs and transcoders trained and measured from an on-disk activation store (issue 23 with
issue 21's store): training from the store matches training on the same rows in memory, the
streamed metrics equal the in-memory ones, the document split and first-position rule hold,
token sequences and top examples come back from the stored ids, and bad input is one line."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import interp
from analyses.app.cli import cli
from analyses.dictionary.metrics import (
    feature_frequencies,
    reconstruction_stats,
    streaming_stats,
    top_examples,
)
from analyses.dictionary.sae import SAEConfig
from analyses.dictionary.stream import StoreSplit, store_top_examples
from analyses.dictionary.study import store_study
from analyses.dictionary.train import train_sae
from interp.errors import InterpError
from interp.tokenize import encode

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
SEQ = 32


def _texts(n: int = 60) -> list[str]:
    return [f"doc {i}: " + "the cat sat on a mat; " * (1 + i % 7) for i in range(n)]


@pytest.fixture(scope="module")
def model() -> interp.HookedTransformer:
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=256, n_ctx=64)
    return interp.HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def store(model, tmp_path_factory) -> interp.ActivationStore:
    out = tmp_path_factory.mktemp("acts")
    interp.write_activations(model, _texts(), [H0, H1], out, seq_len=SEQ, shard_tokens=1000,
                             source={"model": "random.json"})
    return interp.ActivationStore(out)


def _rows(split: StoreSplit, key: str = "x") -> torch.Tensor:
    return torch.cat([b[key] for b in split.batches(512, shuffle=False)])


def test_split_is_by_document_without_first_positions(store) -> None:
    assert len(store.shards) >= 5  # the reading window (2 shards) is smaller than the store
    train, held = StoreSplit(store, H0, split="train"), StoreSplit(store, H0, split="eval")
    docs = {s: set(_rows(x, "doc").tolist()) for s, x in (("train", train), ("eval", held))}
    assert docs["eval"] == {d for d in range(60) if d % 5 == 4}
    assert docs["train"] == set(range(60)) - docs["eval"]
    every = torch.cat([store.shard(i)["pos"] for i in range(len(store.shards))])
    assert train.n_rows + held.n_rows == int((every % SEQ != 0).sum())
    assert (_rows(train, "pos") % SEQ != 0).all()
    # fixed-size shuffled batches, the same for the same seed, cycling past one pass
    a = [b["pos"] for b in itertools.islice(train.batches(256, seed=3, cycle=True), 40)]
    b = [b["pos"] for b in itertools.islice(train.batches(256, seed=3, cycle=True), 40)]
    assert all(x.shape == (256,) for x in a) and 40 * 256 > train.n_rows
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], next(train.batches(256, seed=4))["pos"])


@pytest.mark.parametrize("out", [None, H1], ids=["sae", "transcoder"])
def test_training_from_store_matches_in_memory(store, out) -> None:
    """Same rows, same seed: the store's shuffled passes and in-memory uniform draws give
    SAEs of the same quality on the held-out documents (within 0.01 explained variance)."""
    train = StoreSplit(store, H0, out, split="train")
    held = StoreSplit(store, H0, out, split="eval")
    x, y = _rows(train), _rows(train, "y")
    cfg = SAEConfig(d_in=32, d_sae=128, architecture="topk", k=8, hook_name=H0,
                    hook_name_out=out)
    kw = {"steps": 400, "batch_size": 256, "seed": 0}
    mem, _ = train_sae(x, cfg, targets=None if out is None else y, **kw)
    disk, hist = train_sae(train, cfg, **kw)
    ev = {n: reconstruction_stats(s, _rows(held), _rows(held, "y"))["explained_variance"]
          for n, s in (("memory", mem), ("disk", disk))}
    assert ev["memory"] > 0.9 and abs(ev["memory"] - ev["disk"]) < 0.01, ev
    assert len(hist) >= 100 and hist.l0.iloc[-1] == 8
    # a whole ActivationStore reads every row at cfg's hooks
    whole, _ = train_sae(store, cfg, steps=5, batch_size=64)
    assert whole.cfg.hook_name == H0


def test_streamed_metrics_equal_in_memory(store) -> None:
    held = StoreSplit(store, H0, split="eval")
    sae, _ = train_sae(StoreSplit(store, H0, split="train"),
                       SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=H0), steps=60)
    acts = _rows(held)
    stats, freqs = streaming_stats(sae, held.batches(100, shuffle=False))
    ref = reconstruction_stats(sae, acts)
    assert stats.keys() == ref.keys()
    for key, v in ref.items():
        assert stats[key] == pytest.approx(v, rel=1e-4, abs=1e-5), key
    ref_f = feature_frequencies(sae, acts)
    assert torch.allclose(torch.tensor(freqs.to_numpy()), torch.tensor(ref_f.to_numpy()),
                          rtol=1e-4, atol=1e-6)


def test_pieces_and_top_examples_come_from_stored_ids(model, store) -> None:
    held = StoreSplit(store, H0, split="eval")
    texts = _texts()
    want = [ids[s:s + SEQ] for d, t in enumerate(texts) if d % 5 == 4
            for ids in [encode(model, t)] for s in range(0, len(ids), SEQ)]
    assert held.pieces(10**9) == want
    assert sum(map(len, held.pieces(100))) == 100
    sae, _ = train_sae(StoreSplit(store, H0, split="train"),
                       SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name=H0),
                       steps=60)
    feats = [0, 5, 9]
    every = StoreSplit(store, H0, split="eval", drop_first=False)
    got = store_top_examples(every, sae, features=feats, k=3, window=6)
    # the same examples from running the model over the same sequences (one at a time, so
    # no padding)
    ref = top_examples(model, sae, [torch.tensor([p]) for p in want], features=feats, k=3,
                       window=6)
    assert len(got) == len(ref) > 0
    assert torch.allclose(torch.tensor(got.activation.to_numpy()),
                          torch.tensor(ref.activation.to_numpy()), atol=1e-4)
    assert (got.token == ref.token).all()


def test_store_study_states_metrics(model, store) -> None:
    st = store_study(model, store, hook_name=H0, steps=100, expansion=4, k=8, n_features=2,
                     n_examples=2, ce_tokens=400)
    assert st.stats["l0"] == 8 and st.stats["train_tokens"] > 3 * st.stats["tokens"]
    assert 300 < st.stats["ce_tokens"] <= 400
    assert st.stats["ce_zero_ablated"] > st.stats["ce_clean"]
    assert 0 < st.stats["ce_recovered"] <= 1.05 and len(st.examples) == 4


def test_bad_input_one_line(model, store, tmp_path: Path) -> None:
    with pytest.raises(InterpError, match="set d_in=32"):
        train_sae(store, SAEConfig(d_in=16, d_sae=32, hook_name=H0), steps=1)
    with pytest.raises(InterpError, match="not blocks.1.attn.hook_z"):
        StoreSplit(store, "blocks.1.attn.hook_z")
    tiny = tmp_path / "tiny"
    interp.write_activations(model, _texts(3), [H0], tiny, seq_len=SEQ)
    with pytest.raises(InterpError, match="store activations of more documents"):
        store_study(None, interp.ActivationStore(tiny), hook_name=H0, steps=1)
    runner = CliRunner()
    cases = [
        (["random.json", "--from-activations", str(tmp_path / "none")], "has no index.json"),
        (["minilm", "--from-activations", str(store.path)], "holds activations of random.json"),
        (["random.json", "--from-activations", str(store.path)], "pick one with --hook"),
        (["random.json", "--from-activations", str(store.path), "--hook", "blocks.0.hook_z"],
         "not blocks.0.hook_z"),
        (["random.json", "--from-activations", str(store.path), "--text", __file__],
         "pass one of them"),
    ]
    for args, msg in cases:
        res = runner.invoke(cli, ["sae", *args, "--out", str(tmp_path / "rep")])
        assert res.exit_code == 2, (args, res.output)
        line = res.output.strip()
        assert msg in line and "\n" not in line, (args, line)


@pytest.mark.slow
def test_cli_sae_from_activations(tmp_path: Path) -> None:
    """`interp activations` then `interp sae --from-activations` end to end on a random
    byte-level model from a .json config, with a report and a saved SAE."""
    cfg = tmp_path / "model.json"
    cfg.write_text('{"n_layers": 2, "d_model": 32, "n_heads": 4, "d_vocab": 256, "n_ctx": 64}')
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_texts()) + "\n")
    runner = CliRunner()
    acts = tmp_path / "acts"
    res = runner.invoke(cli, ["activations", str(cfg), "--hooks", H0, "--corpus", str(corpus),
                              "--out", str(acts), "--seq-len", str(SEQ)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "rep"
    res = runner.invoke(cli, ["sae", str(cfg), "--from-activations", str(acts), "--steps", "100",
                              "--out", str(out), "-q", "--save", str(tmp_path / "saved")])
    assert res.exit_code == 0, (res.output, res.exception)
    md = (out / "index.md").read_text()
    assert "Activations stored by `interp activations`" in md and "CE loss recovered" in md
    assert (out / "data" / "sae_top_examples.csv").is_file()
