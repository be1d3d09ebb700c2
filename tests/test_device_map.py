"""Models across devices (issue 21): ``load_pretrained(..., device_map=..., max_memory=...)``
places units on devices and on disk, and logits, every cached activation and interventions
equal the single-device model's. This machine tests ``cpu`` with disk offload (``meta``
parameters loaded per forward); a GPU, when present, is tested as well."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import interp
from interp.loading import save_checkpoint
from interp.loading.placement import dispatch, infer_device_map, parse_size, placement_units


def _model(**kw) -> interp.HookedTransformer:
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=3, d_model=32, n_heads=4, d_vocab=256, n_ctx=64, **kw)
    return interp.HookedTransformer(cfg).eval()


TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
MASK = torch.ones(2, 12, dtype=torch.long)
MASK[1, 9:] = 0


def _same_run(a: torch.nn.Module, b: torch.nn.Module) -> None:
    la, ca = a.run_with_cache(TOKENS, attention_mask=MASK)
    lb, cb = b.run_with_cache(TOKENS, attention_mask=MASK)
    torch.testing.assert_close(lb.cpu(), la)
    assert sorted(cb.keys()) == sorted(ca.keys()) and len(ca) > 40
    for k in ca.keys():
        torch.testing.assert_close(cb[k].cpu(), ca[k], msg=k)
    torch.testing.assert_close(cb.accumulated_resid().cpu(), ca.accumulated_resid())
    torch.testing.assert_close(cb.decompose_resid().cpu(), ca.decompose_resid())

    def ablate(z: torch.Tensor, hook) -> torch.Tensor:
        z[:, :, 1] = 0.0
        return z

    hooks = [("blocks.1.attn.hook_z", ablate)]
    torch.testing.assert_close(b.run_with_hooks(TOKENS, fwd_hooks=hooks).cpu(),
                               a.run_with_hooks(TOKENS, fwd_hooks=hooks))


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"positional": "rope"}])
def test_cpu_and_disk_offload_equal_one_device(kw, tmp_path: Path) -> None:
    ref = _model(**kw)
    units = list(placement_units(ref))
    dm = {u: "cpu" for u in units}
    dm.update({"blocks.1": "disk", "blocks.2": "meta"})
    if not kw.get("tie_embeddings"):
        dm["unembed"] = "disk"
    model = dispatch(copy.deepcopy(ref), dm, offload_dir=tmp_path)
    assert model.blocks[1].attn.qkv.weight.device.type == "meta"  # not resident between runs
    assert (tmp_path / "blocks.1.safetensors").exists()
    _same_run(ref, model)
    assert model.blocks[2].mlp.fc_in.weight.device.type == "meta"


def test_load_pretrained_auto_with_max_memory(tmp_path: Path) -> None:
    ref = _model()
    save_checkpoint(ref, tmp_path / "m.pt")
    block = sum(p.numel() * 4 for p in ref.blocks[0].parameters())
    front = sum(p.numel() * 4 for n in ("embed", "pos_embed")
                for p in getattr(ref, n).parameters())
    budget = {"cpu": front + 2 * block}  # the embeddings and two blocks; the rest to disk
    model = interp.load_pretrained(tmp_path / "m.pt", device_map="auto", max_memory=budget,
                                   offload_dir=tmp_path / "off")
    assert model.hf_device_map == infer_device_map(ref, budget)
    assert [model.hf_device_map[f"blocks.{i}"] for i in range(3)] == ["cpu", "cpu", "disk"]
    assert model.hf_device_map["unembed"] == "disk"
    _same_run(ref, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_cpu_split_equal_one_device() -> None:
    ref = _model()
    dm = {u: "cpu" for u in placement_units(ref)}
    dm.update({"blocks.0": "cuda:0", "blocks.2": "cuda:0", "unembed": "cuda:0"})
    model = dispatch(copy.deepcopy(ref), dm)
    _, cache = model.run_with_cache(TOKENS)
    assert cache["blocks.0.hook_resid_post"].device.type == "cuda"  # where it was produced
    assert cache["blocks.1.hook_resid_post"].device.type == "cpu"
    la, ca = ref.run_with_cache(TOKENS, attention_mask=MASK)
    lb, cb = model.run_with_cache(TOKENS, attention_mask=MASK)
    torch.testing.assert_close(lb.cpu(), la, atol=1e-4, rtol=1e-4)
    for k in ca.keys():
        torch.testing.assert_close(cb[k].cpu(), ca[k], atol=1e-4, rtol=1e-4, msg=k)


def test_bad_maps_are_one_line_errors() -> None:
    m = _model(tie_embeddings=True)
    units = {u: "cpu" for u in placement_units(m)}
    with pytest.raises(interp.InterpError, match="missing"):
        dispatch(m, {"embed": "cpu"})
    with pytest.raises(interp.InterpError, match="cannot be offloaded"):
        dispatch(m, {**units, "embed": "disk", "pos_embed": "disk", "unembed": "disk"})
    with pytest.raises(interp.InterpError, match="ties"):
        dispatch(m, {**units, "unembed": "disk"})
    with pytest.raises(interp.InterpError, match="embedding's device"):
        dispatch(m, {**units, "pos_embed": "disk"})
    with pytest.raises(interp.InterpError, match="not a torch device"):
        dispatch(m, {**units, "blocks.0": "gpu7"})
    with pytest.raises(interp.InterpError, match="'auto' or a dict"):
        dispatch(m, "balanced")
    with pytest.raises(interp.InterpError, match="memory size"):
        parse_size("lots")
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("2 MB") == 2_000_000


def test_info_prints_memory_per_dtype_and_context(tmp_path: Path) -> None:
    """``interp info``'s estimate equals the bytes a full cache really holds."""
    import json

    from click.testing import CliRunner

    from analyses.app.cli import cli

    cfg = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_vocab": 300, "n_ctx": 48}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    text = CliRunner().invoke(cli, ["info", str(path)])
    assert text.exit_code == 0 and "full cache" in text.output, text.output
    rows = json.loads(CliRunner().invoke(cli, ["info", str(path), "--json"]).output)["memory"]
    assert {(r["dtype"], r["context"]) for r in rows} == {
        (d, 48) for d in ("float32", "bfloat16", "float16")}
    model = interp.load_pretrained(path, seed=0)
    _, cache = model.run_with_cache(torch.zeros(1, 48, dtype=torch.long))
    f32 = next(r for r in rows if r["dtype"] == "float32")
    assert f32["full_cache_bytes"] == sum(v.numel() * 4 for v in cache.values())
    assert f32["parameters_bytes"] == 4 * model.param_count()
    assert f32["resid_hook_bytes"] == 48 * 32 * 4
    assert next(r for r in rows if r["dtype"] == "float16")["full_cache_bytes"] * 2 == (
        f32["full_cache_bytes"])


def test_temporary_offload_folder_goes_with_the_model() -> None:
    import gc

    m = _model()
    dm = {u: "cpu" for u in placement_units(m)} | {"blocks.0": "disk"}
    dispatch(m, dm)
    folder = m.offload_folder
    assert [p.name for p in folder.iterdir()] == ["blocks.0.safetensors"]
    m(TOKENS)  # runs with the weights loaded from that folder
    del m
    gc.collect()
    assert not folder.exists()
