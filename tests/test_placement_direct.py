"""Loading straight into a device map (issue 21): ``load_pretrained(folder, device_map=...)``
builds the model on ``meta`` and converts one layer group at a time, so no full copy of the
weights is ever held; the result equals loading everything and dispatching it.

What is proved here:
- an HF safetensors folder and a GGUF file loaded into a map with disk units give the
  full-load-then-dispatch model's logits, cache and interventions, and never build the full
  state dict (``assemble`` is not called);
- the checkpoint is read layer group by layer group, each group placed before the next is read;
- a converter that mixes layers falls back to the full load (same model, no error);
- ``"auto"`` sizes GPUs on the meta model: a mocked ``cuda:0`` budget gets the first units
  (the cuda code path itself runs where a GPU is present, in test_device_map.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import interp
from interp.loading import _common
from interp.loading import safetensors as st
from interp.loading.placement import (
    _Placer,
    assemble_placed,
    dispatch,
    infer_device_map,
    placement_units,
)

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))


def _folder(tmp_path: Path, n_layers: int = 3) -> Path:
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=n_layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path / "llama"
    hf.save_pretrained(out, safe_serialization=True)
    return out


def _map(model: torch.nn.Module) -> dict[str, str]:
    dm = {u: "cpu" for u in placement_units(model)}
    dm.update({"blocks.1": "disk", "blocks.2": "disk", "unembed": "disk"})
    return dm


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    la, ca = a.run_with_cache(TOKENS)
    lb, cb = b.run_with_cache(TOKENS)
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    assert sorted(ca.keys()) == sorted(cb.keys())
    for k in ca.keys():
        torch.testing.assert_close(cb[k], ca[k], rtol=0, atol=0, msg=k)

    def ablate(z: torch.Tensor, hook: object) -> torch.Tensor:
        z[:, :, 0] = 0.0
        return z

    hooks = [("blocks.2.attn.hook_z", ablate)]
    torch.testing.assert_close(b.run_with_hooks(TOKENS, fwd_hooks=hooks),
                               a.run_with_hooks(TOKENS, fwd_hooks=hooks), rtol=0, atol=0)


def _no_full_assemble(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the whole state dict was assembled")

    monkeypatch.setattr(_common, "assemble", refuse)
    import interp.loading as loading

    monkeypatch.setattr(loading, "assemble", refuse)


def test_folder_straight_into_place_equals_full_load_and_dispatch(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    ref = interp.load_pretrained(folder)
    old = dispatch(copy.deepcopy(ref), _map(ref), offload_dir=tmp_path / "old")
    reads: list[tuple[str, str]] = []
    real_read, real_place = st.SafetensorsFile.read, _Placer.place
    monkeypatch.setattr(st.SafetensorsFile, "read",
                        lambda self, name: reads.append(("read", name)) or real_read(self, name))
    monkeypatch.setattr(_Placer, "place",
                        lambda self, n, m: reads.append(("place", n)) or real_place(self, n, m))
    _no_full_assemble(monkeypatch)
    model = interp.load_pretrained(folder, device_map=_map(ref), offload_dir=tmp_path / "new")
    assert model.hf_device_map == old.hf_device_map
    assert model.blocks[1].attn.qkv.weight.device.type == "meta"  # on disk between forwards
    assert (tmp_path / "new" / "blocks.2.safetensors").exists()
    # every tensor read once; layer i's tensors all read after blocks.(i-1) was placed and
    # before blocks.i is: one layer's weights in memory at a time
    names = [n for what, n in reads if what == "read"]
    assert len(names) == len(set(names)) == len(st.SafetensorsDict([folder /
                                                                    "model.safetensors"]))
    for i in range(3):
        at = reads.index(("place", f"blocks.{i}"))
        mine = [j for j, (what, n) in enumerate(reads) if what == "read" and f"layers.{i}." in n]
        assert mine and max(mine) < at
        if i:
            assert min(mine) > reads.index(("place", f"blocks.{i - 1}"))
    _same(old, model)
    _same(ref, model)


def test_gguf_straight_into_place_equals_full_load(tmp_path, monkeypatch):
    from tests.fuzz_formats import llama_hf, write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(llama_hf(), path)
    ref = interp.load_pretrained(path)
    dm = {u: "cpu" for u in placement_units(ref)}
    dm.update({"blocks.1": "disk"})
    import interp.loading.gguf as gguf

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the whole state dict was assembled")

    monkeypatch.setattr(_common, "assemble", refuse)
    model = interp.load_pretrained(path, device_map=dm, offload_dir=tmp_path / "off")
    assert gguf is not None and model.blocks[1].mlp.fc_out.weight.device.type == "meta"
    assert model.prepend_bos == ref.prepend_bos and model.tokenizer is not None
    la = ref(TOKENS % ref.cfg.d_vocab)
    torch.testing.assert_close(model(TOKENS % ref.cfg.d_vocab), la, rtol=0, atol=0)


def test_a_converter_that_mixes_layers_falls_back(tmp_path):
    folder = _folder(tmp_path, n_layers=2)
    from interp.loading.families import get_family

    fam = get_family("llama")
    ref = interp.load_pretrained(folder)
    weights = st.SafetensorsDict([folder / "model.safetensors"])

    def mixing(sd: object, cfg: object) -> dict:
        out = fam.convert_state_dict(sd, cfg)
        out["blocks.1.ln1.w"] = out["blocks.1.ln1.w"] + out["blocks.0.ln1.w"]  # across layers
        return out

    assert assemble_placed(ref.cfg, mixing, weights, {u: "cpu" for u in placement_units(ref)}
                           ) is None
    same = assemble_placed(ref.cfg, fam.convert_state_dict, weights,
                           {u: "cpu" for u in placement_units(ref)})
    assert same is not None
    torch.testing.assert_close(same(TOKENS), ref(TOKENS), rtol=0, atol=0)


def test_auto_sizes_a_mocked_gpu_on_the_meta_model():
    cfg = interp.ModelConfig(n_layers=4, d_model=32, n_heads=4, d_vocab=256, n_ctx=64)
    model = _common._build_on_meta(cfg)
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    front = sum(p.numel() * 4 for n in ("embed", "pos_embed")
                for p in getattr(model, n).parameters())
    dm = infer_device_map(model, {"cuda:0": front + block, "cuda:1": block, "cpu": block})
    assert [dm["embed"], dm["blocks.0"], dm["blocks.1"], dm["blocks.2"], dm["blocks.3"]] == [
        "cuda:0", "cuda:0", "cuda:1", "cpu", "disk"]
