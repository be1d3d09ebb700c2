"""Models larger than one device: each unit (the embedding, every block, the final norm, the
unembedding) on its own device, or offloaded to disk, with activations moved between them.

``load_pretrained(..., device_map="auto" | {unit: device}, max_memory={device: size},
offload_dir=...)`` calls :func:`dispatch` after loading (and after weight processing).
The same idea as accelerate's ``dispatch_model``, written on interp's own blocks so that
nothing about the forward changes: a forward pre-hook on each unit moves its inputs
(tensors, and the tensors inside the attention context) to the unit's device, so every
hook point sees its tensor on the device of the layer that produced it, and run_with_cache,
run_with_hooks and interventions work unchanged.

Devices: any torch device (``"cpu"``, ``"cuda:0"``), or ``"disk"`` (alias ``"meta"``):
the unit's weights are written to ``offload_dir`` as one safetensors file, its parameters
become ``meta`` tensors, and each forward loads them onto the execution device (the first
real device of the map) just before the unit runs and drops them right after. So resident
memory holds one offloaded unit at a time.

The embedding always sits on a real device (inputs start there and ``model.device`` names
it); a tied unembedding shares its device. ``"auto"`` fills the devices of ``max_memory`` in
order (default: each GPU's free memory, then the CPU's available memory) unit by unit, in
forward order, and sends the rest to disk.

Limit: the loaders build the whole model on the CPU first and :func:`dispatch` places it
after, so the checkpoint must fit in CPU memory while it loads (resident memory drops once
units go to a GPU or to disk); loading straight into place, unit by unit, is not done yet.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.errors import InterpError

__all__ = ["DISK", "dispatch", "infer_device_map", "parse_size", "placement_units"]

DISK = "disk"
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"10GiB"``, ``"500MB"``, ``"1.5 GB"``."""
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or (m.group(2) and m.group(2).lower() not in _UNITS):
        raise InterpError(f"Cannot read memory size {size!r}; write e.g. 2000000000, '2GB' or "
                          "'1.5GiB'.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower() or "b"])


def placement_units(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a device map places, in forward order: each top-level child that holds
    weights, and each element of a top-level ModuleList (``blocks.0``, ``encoder.3``)."""
    units: dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            units.update({f"{name}.{i}": m for i, m in enumerate(child)})
        elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            units[name] = child
    return units


def _nbytes(module: nn.Module) -> int:
    seen = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _front(model: nn.Module) -> list[str]:
    """Units that run before the first layer stack (embeddings, positions, embedding norm):
    their outputs are added together, so they share the embedding's device."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            break
        if name in placement_units(model):
            out.append(name)
    return out


def _default_memory() -> dict[str, int]:
    """Free memory per GPU, then the CPU's available memory (90% of each, headroom for
    activations)."""
    out: dict[str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = int(torch.cuda.mem_get_info(i)[0] * 0.9)
    try:
        import psutil

        out["cpu"] = int(psutil.virtual_memory().available * 0.9)
    except ImportError:
        import os

        out["cpu"] = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.9)
    return out


def _tied(model: nn.Module) -> bool:
    unembed = getattr(model, "unembed", None)
    return bool(getattr(unembed, "_tied", None))


def infer_device_map(model: nn.Module,
                     max_memory: Mapping[str, int | str] | None = None) -> dict[str, str]:
    """``{unit: device}`` filling the devices of ``max_memory`` in order, unit by unit in
    forward order; what does not fit goes to ``"disk"`` (the embedding never does: it takes
    the first device even when over budget, since inputs start there)."""
    budget = {str(d): parse_size(s) for d, s in (max_memory or _default_memory()).items()}
    if not budget:
        raise InterpError("max_memory names no device; give e.g. {'cpu': '4GB'}.")
    devices = list(budget)
    used = dict.fromkeys(devices, 0)
    k, out, front = 0, {}, _front(model)
    for name, module in placement_units(model).items():
        size = _nbytes(module)
        if (name == "unembed" and _tied(model)) or (name != "embed" and name in front):
            out[name] = out["embed"]
            used[out[name]] += size
            continue
        while k < len(devices) and used[devices[k]] + size > budget[devices[k]]:
            if name == "embed":
                break
            k += 1
        dev = devices[min(k, len(devices) - 1)] if name == "embed" else (
            devices[k] if k < len(devices) else DISK)
        used[dev] = used.get(dev, 0) + size
        out[name] = dev
    return out


def _check_map(model: nn.Module, device_map: Mapping[str, str]) -> dict[str, str]:
    units = placement_units(model)
    dm = {k: (DISK if str(v) in ("disk", "meta") else str(v)) for k, v in device_map.items()}
    unknown = [k for k in dm if k not in units]
    missing = [k for k in units if k not in dm]
    if unknown or missing:
        raise InterpError(f"device_map must name every unit exactly: unknown {unknown}, missing "
                          f"{missing}; the units are {', '.join(units)}.")
    for dev in set(dm.values()) - {DISK}:
        try:
            torch.device(dev)
        except (RuntimeError, TypeError) as e:
            raise InterpError(f"device_map names {dev!r}, not a torch device or 'disk'.") from e
    if "embed" in dm and dm["embed"] == DISK:
        raise InterpError("The embedding cannot be offloaded to disk (inputs start there); "
                          "put 'embed' on 'cpu' or a GPU.")
    for name in _front(model):
        if dm[name] != dm.get("embed"):
            raise InterpError(f"{name!r} runs beside the embedding; give it the embedding's "
                              f"device ({dm.get('embed')!r}).")
    if _tied(model) and dm.get("unembed") != dm.get("embed"):
        raise InterpError("This model ties its unembedding to its embedding; give 'unembed' "
                          f"the embedding's device ({dm.get('embed')!r}).")
    return dm


def _move(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it on ``device`` (tuples, lists, dicts, and the attention
    context's attributes; objects already there are returned as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    attrs = getattr(obj, "__dict__", None)
    if not attrs or isinstance(obj, nn.Module):
        return obj
    moved = {k: _move(v, device) for k, v in attrs.items()}
    if all(moved[k] is attrs[k] for k in attrs):
        return obj
    new = object.__new__(type(obj))
    new.__dict__.update(moved)
    return new


class _Offloaded:
    """A unit's weights on disk; loaded for its forward, released after it."""

    def __init__(self, module: nn.Module, path: Path, device: torch.device):
        from safetensors.torch import save_file

        self.module, self.path, self.device = module, path, device
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        self.shapes = {k: (v.shape, v.dtype, isinstance(v, nn.Parameter))
                       for k, v in tensors.items()}
        self.release()

    def _set(self, name: str, tensor: torch.Tensor, param: bool) -> None:
        owner, _, attr = name.rpartition(".")
        mod = self.module.get_submodule(owner) if owner else self.module
        if param:
            mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            mod._buffers[attr] = tensor

    def load(self) -> None:
        from safetensors.torch import load_file

        for k, v in load_file(str(self.path), device=str(self.device)).items():
            self._set(k, v, self.shapes[k][2])

    def release(self) -> None:
        for k, (shape, dtype, param) in self.shapes.items():
            self._set(k, torch.empty(shape, dtype=dtype, device="meta"), param)


def _attach(module: nn.Module, device: torch.device, offload: _Offloaded | None) -> None:
    def before(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if offload is not None:
            offload.load()
        return _move(args, device), _move(kwargs, device)

    module.register_forward_pre_hook(before, with_kwargs=True)
    if offload is not None:
        module.register_forward_hook(lambda *_: offload.release())


def dispatch(model: nn.Module, device_map: str | Mapping[str, str],
             max_memory: Mapping[str, int | str] | None = None,
             offload_dir: str | Path | None = None) -> nn.Module:
    """Place ``model``'s units by ``device_map`` (``"auto"`` or ``{unit: device}``) and hook
    their inputs across devices; returns the model (changed in place), with
    ``model.hf_device_map`` (the map used, as transformers names it). Without
    ``offload_dir``, disk units go to a temporary folder removed when the model is."""
    if device_map == "auto":
        device_map = infer_device_map(model, max_memory)
    elif isinstance(device_map, str) or not isinstance(device_map, Mapping):
        raise InterpError(f"device_map must be 'auto' or a dict {{unit: device}}, got "
                          f"{device_map!r}; the units are "
                          f"{', '.join(placement_units(model))}.")
    dm = _check_map(model, device_map)
    units = placement_units(model)
    real = [d for d in dm.values() if d != DISK]
    exec_device = torch.device(real[0] if real else "cpu")
    folder = None
    for name, module in units.items():
        dev = dm[name]
        if dev == DISK:
            if folder is None and offload_dir is None:  # ours: removed with the model
                folder = Path(tempfile.mkdtemp(prefix="interp_offload_"))
                weakref.finalize(model, shutil.rmtree, folder, True)
            elif folder is None:
                folder = Path(offload_dir)  # type: ignore[arg-type]
                folder.mkdir(parents=True, exist_ok=True)
            module.to(exec_device)  # non-weight state (hook points) lives where it runs
            _attach(module, exec_device, _Offloaded(module, folder / f"{name}.safetensors",
                                                    exec_device))
        else:
            module.to(dev)
            _attach(module, torch.device(dev), None)
    model.hf_device_map = dict(dm)
    model.offload_folder = folder  # where disk units' weights are (None: no disk unit)
    return model
