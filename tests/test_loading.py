"""interp.loading: interp checkpoints, JSON configs, sources and bad input.

Per-family logit parity with transformers lives in tests/test_loading_hf.py; the real packaged
models (MiniLM, SmolLM2) in tests/test_loading_builtins.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import interp
from interp.errors import InterpError
from interp.loading import load_pretrained, save_checkpoint

torch.set_num_threads(1)


def _cfg(**kw):
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=50, n_ctx=16, act="swiglu",
                norm="rmsnorm", positional="rope", tie_embeddings=True)
    base.update(kw)
    return interp.ModelConfig(**base)


def test_checkpoint_roundtrip_with_metadata_and_tokenizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = interp.HookedTransformer(_cfg()).eval()
    from transformers import BertTokenizer

    model.tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])})
    path = save_checkpoint(model, tmp_path / "m.pt", task="induction", step=7, history=[1.0, 0.5])
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == "interp-checkpoint" and raw["metadata"]["step"] == 7
    loaded = load_pretrained(path)
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.checkpoint_metadata["task"] == "induction"
    assert (loaded.tokenizer.encode("a b", add_special_tokens=False)
            == model.tokenizer.encode("a b", add_special_tokens=False))
    assert loaded.cfg == model.cfg


def test_checkpoint_override_and_dtype(tmp_path: Path) -> None:
    model = interp.HookedTransformer(_cfg(tie_embeddings=False, architecture="encoder",
                                          positional="learned"))
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_pretrained(path, attn_kernel="eager", dtype="bfloat16")
    assert loaded.cfg.attn_kernel == "eager" and loaded.embed.W_E.dtype == torch.bfloat16


def test_checkpoint_bad_input(tmp_path: Path) -> None:
    model = interp.HookedTransformer(_cfg())
    with pytest.raises(InterpError, match=r"\.pt"):
        save_checkpoint(model, tmp_path / "m.ckpt")
    with pytest.raises(InterpError, match="plain types"):
        save_checkpoint(model, tmp_path / "m.pt", obj=object())
    path = save_checkpoint(model, tmp_path / "m.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InterpError, match="trunc.pt"):
        load_pretrained(trunc)
    ck = torch.load(path, weights_only=True)
    del ck["state_dict"]["blocks.1.attn.o.weight"]
    ck["state_dict"]["blocks.9.extra"] = torch.zeros(3)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(InterpError, match=r"blocks\.1\.attn\.o\.weight.*blocks\.9\.extra"):
        load_pretrained(tmp_path / "bad.pt")
    ck = torch.load(path, weights_only=True)
    ck["state_dict"]["ln_final.w"] = torch.ones(5)
    torch.save(ck, tmp_path / "shape.pt")
    with pytest.raises(InterpError, match=r"ln_final\.w.*\[5\]"):
        load_pretrained(tmp_path / "shape.pt")


def test_json_config_seeded(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(_cfg().to_dict()))
    a = load_pretrained(path, seed=3)
    b = load_pretrained(path, seed=3)
    c = load_pretrained(path, seed=4)
    assert torch.equal(a.embed.W_E, b.embed.W_E) and not torch.equal(a.embed.W_E, c.embed.W_E)
    assert load_pretrained(path, n_ctx=8).cfg.n_ctx == 8
    path.write_text('{"n_layers": 1}')
    with pytest.raises(InterpError, match="missing required"):
        load_pretrained(path)
    path.write_text("{not json")
    with pytest.raises(InterpError, match="not valid JSON"):
        load_pretrained(path)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(InterpError, match="does not exist.*minilm"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(InterpError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(InterpError, match="Unsupported model_type 'falcon'; supported: .*llama"):
        load_pretrained(tmp_path)
    with pytest.raises(InterpError, match="Unknown override"):
        load_pretrained(tmp_path, n_layerz=3)
    with pytest.raises(InterpError, match="Cannot load a int"):
        load_pretrained(3)


# ---------------------------------------------------------------------------------------------
# Hugging Face folders: weight formats and bad checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return folder, hf


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pytorch_bin_folder(llama_folder, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder, hf = llama_folder
    dst = _copy_folder(folder, tmp_path / "bin")
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    model = load_pretrained(dst)
    x = torch.randint(0, 60, (1, 7))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-5
    # a .bin that needs unpickling arbitrary objects is refused (weights_only=True)
    torch.save({"w": torch.zeros(1), "obj": _Evil()}, dst / "pytorch_model.bin")
    with pytest.raises(InterpError, match="safely"):
        load_pretrained(dst)


class _Evil:
    def __reduce__(self):  # pragma: no cover - never called: weights_only refuses the class
        return (print, ("code ran",))


def test_bad_hf_tensors_are_named(llama_folder, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = llama_folder
    sd = load_file(folder / "model.safetensors")

    def write(name: str, tensors: dict) -> Path:
        dst = _copy_folder(folder, tmp_path / name)
        save_file(tensors, dst / "model.safetensors")
        return dst

    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(InterpError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
                                          r" \(expected shape \[24, 16\]\)"):
        load_pretrained(write("missing", missing))
    with pytest.raises(InterpError,
                       match=r"unexpected tensor\(s\) 'model\.layers\.0\.extra\.weight'"):
        load_pretrained(write("extra", {**sd, "model.layers.0.extra.weight": torch.zeros(2)}))
    bad = dict(sd)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)
    with pytest.raises(InterpError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has "
                                          r"shape \[16, 16\], expected \[8, 16\]"):
        load_pretrained(write("shape", bad))


def test_truncated_safetensors_and_missing_weights(llama_folder, tmp_path: Path) -> None:
    folder, _ = llama_folder
    dst = _copy_folder(folder, tmp_path / "trunc")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InterpError,
                       match=r"model\.safetensors' is truncated: tensor '.*' ends at byte"):
        load_pretrained(dst)
    (dst / "model.safetensors").write_bytes(data[:4])
    with pytest.raises(InterpError, match="truncated"):
        load_pretrained(dst)
    (dst / "model.safetensors").unlink()
    with pytest.raises(InterpError, match="has no weights"):
        load_pretrained(dst)


def test_base_model_without_head_and_overrides(llama_folder, tmp_path: Path) -> None:
    """A bare LlamaModel folder has no LM head; overrides reach the config; device/dtype apply."""
    import transformers

    folder, hf = llama_folder
    base = hf.model
    base.save_pretrained(tmp_path / "base")
    model = load_pretrained(tmp_path / "base", attn_kernel="eager", dtype=torch.float64)
    assert (not model.cfg.has_unembed and model.cfg.attn_kernel == "eager"
            and model.W_E.dtype == torch.float64)
    x = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        ref = base(x).last_hidden_state.double()
        assert (model(x, return_type="hidden") - ref).abs().max() <= 1e-5
    assert isinstance(hf, transformers.PreTrainedModel)


def test_checkpoint_of_a_loaded_hf_model_keeps_tokenizer(tmp_path: Path) -> None:
    """A model loaded with a Hugging Face fast tokenizer round-trips through save_checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<s>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]")
    model = interp.HookedTransformer(_cfg(d_vocab=4), tokenizer=tok)
    loaded = load_pretrained(save_checkpoint(model, tmp_path / "hf_tok.pt"))
    assert (loaded.to_tokens("hello world").tolist() == model.to_tokens("hello world").tolist()
            == [[3, 1, 2]])


def test_sharded_safetensors_folder(llama_folder, tmp_path: Path) -> None:
    _, hf = llama_folder
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path)
    x = torch.randint(0, 60, (1, 6))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-5
    next(tmp_path.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(InterpError, match="does not exist; the checkpoint is incomplete"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_fast_gguf_dequantisation_is_bit_identical(qtype: str) -> None:
    """The vectorised torch kernels equal the gguf package's reference dequantisation."""
    import numpy as np
    from gguf import dequantize, quantize
    from gguf.constants import GGMLQuantizationType as Q

    from interp.loading.gguf import _dequant_fast

    q = Q[qtype]
    x = np.random.default_rng(0).normal(size=(3, 96)).astype(np.float32) * 3
    raw = quantize(x, q).view(np.uint8).reshape(3, -1)
    ours = _dequant_fast(raw, int(q))
    ref = np.asarray(dequantize(raw, q), dtype=np.float32)
    assert ours.shape == (3, 96) and torch.equal(ours, torch.from_numpy(ref))
    if qtype in ("Q4_0", "Q4_1"):
        # really quantised: not a pass-through
        assert (ours - torch.from_numpy(x)).abs().max() > 1e-3


def test_training_checkpoint_loads(tmp_path: Path) -> None:
    """Checkpoints written by interp.train (same format, extra top-level keys) load too."""
    ck = pytest.importorskip("interp.train.checkpoint")
    model = interp.HookedTransformer(_cfg())
    path = ck.write_checkpoint(tmp_path / "t.pt", {"config": model.cfg.to_dict(),
                                                    "state_dict": model.state_dict(),
                                                    "tokenizer": {"kind": "bytes"},
                                                    "task": {"name": "text"}})
    loaded = load_pretrained(path)
    assert (loaded.tokenizer.encode("hi") == [104, 105]
            and loaded.checkpoint_metadata["task"]["name"] == "text")
    x = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
