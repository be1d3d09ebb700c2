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

Loading straight into place (:func:`assemble_placed`, used for Hugging Face safetensors
folders when no weight processing is asked for): the model is built on the ``meta`` device
and the family's converter runs once per group of units, on a view of the checkpoint where
only that group's tensors are read from disk and every other tensor is a ``meta`` stand-in of
the same shape; the group's converted weights go straight to their device (or to their
offload file), so resident memory holds about one unit at a time, not the model. A converter
that cannot run on stand-ins, other sources (GGUF, .pt) and weight processing (which folds
across units) load the whole model on the CPU first and :func:`dispatch` places it after.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.errors import InterpError

__all__ = ["DISK", "assemble_placed", "dispatch", "infer_device_map", "parse_size", "placed",
           "placement_units", "placing"]

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


def _resolve_map(model: nn.Module, device_map: str | Mapping[str, str],
                 max_memory: Mapping[str, int | str] | None) -> tuple[dict[str, str], torch.device]:
    """The checked ``{unit: device}`` map and the execution device of disk units."""
    if device_map == "auto":
        device_map = infer_device_map(model, max_memory)
    elif isinstance(device_map, str) or not isinstance(device_map, Mapping):
        raise InterpError(f"device_map must be 'auto' or a dict {{unit: device}}, got "
                          f"{device_map!r}; the units are "
                          f"{', '.join(placement_units(model))}.")
    dm = _check_map(model, device_map)
    real = [d for d in dm.values() if d != DISK]
    return dm, torch.device(real[0] if real else "cpu")


class _Placer:
    """Puts units where the map says, one at a time: on their device, or on disk (its weights
    written to the offload folder and replaced by ``meta`` tensors), with the input hooks."""

    def __init__(self, model: nn.Module, dm: dict[str, str], exec_device: torch.device,
                 offload_dir: str | Path | None):
        self.model, self.dm, self.exec_device = model, dm, exec_device
        self.offload_dir, self.folder = offload_dir, None

    def _folder(self) -> Path:
        if self.folder is None and self.offload_dir is None:  # ours: removed with the model
            self.folder = Path(tempfile.mkdtemp(prefix="interp_offload_"))
            weakref.finalize(self.model, shutil.rmtree, self.folder, True)
        elif self.folder is None:
            self.folder = Path(self.offload_dir)  # type: ignore[arg-type]
            self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def place(self, name: str, module: nn.Module) -> None:
        dev = self.dm[name]
        if dev == DISK:
            module.to(self.exec_device)  # non-weight state (hook points) lives where it runs
            path = self._folder() / f"{name}.safetensors"
            _attach(module, self.exec_device, _Offloaded(module, path, self.exec_device))
        else:
            module.to(dev)
            _attach(module, torch.device(dev), None)

    def finish(self) -> nn.Module:
        self.model.hf_device_map = dict(self.dm)
        self.model.offload_folder = self.folder  # disk units' weights (None: no disk unit)
        return self.model


def dispatch(model: nn.Module, device_map: str | Mapping[str, str],
             max_memory: Mapping[str, int | str] | None = None,
             offload_dir: str | Path | None = None) -> nn.Module:
    """Place ``model``'s units by ``device_map`` (``"auto"`` or ``{unit: device}``) and hook
    their inputs across devices; returns the model (changed in place), with
    ``model.hf_device_map`` (the map used, as transformers names it). Without
    ``offload_dir``, disk units go to a temporary folder removed when the model is."""
    dm, exec_device = _resolve_map(model, device_map, max_memory)
    placer = _Placer(model, dm, exec_device, offload_dir)
    for name, module in placement_units(model).items():
        placer.place(name, module)
    return placer.finish()


# --------------------------------------------------------------------------- straight into place


def _layer(key: str) -> int | None:
    """The first number in a checkpoint tensor's dotted name (its layer), None outside the
    layer stacks (embeddings, final norm, LM head)."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", key)
    return int(m.group(1)) if m else None


class _GroupView(Mapping):
    """The checkpoint with only the tensors of one layer index (or of no layer) read from
    disk; every other tensor a ``meta`` stand-in of its shape and dtype."""

    def __init__(self, weights: Any, layer: int | None):
        self.weights, self.layer = weights, layer

    def __getitem__(self, key: str) -> torch.Tensor:
        if _layer(key) == self.layer:
            return self.weights[key]
        return self.weights.meta(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def _groups(units: Mapping[str, nn.Module]) -> dict[int | None, list[str]]:
    """Units by the layer index their checkpoint tensors carry: ``blocks.3`` (and
    ``encoder.3``) under 3, the embeddings, final norm and unembedding under None."""
    out: dict[int | None, list[str]] = {}
    for name in units:
        tail = name.rpartition(".")[2]
        out.setdefault(int(tail) if "." in name and tail.isdigit() else None, []).append(name)
    return out


def _unit_state(name: str, module: nn.Module, converted: Mapping[str, torch.Tensor],
                dtype: torch.dtype, source: str) -> dict[str, torch.Tensor]:
    """Unit ``name``'s tensors from one converter pass, checked against the meta module and
    cast to ``dtype``; a ``meta`` one means the converter mixed groups (the caller falls back)."""
    own = module.state_dict()
    got = {k: converted.get(f"{name}.{k}") for k in own}
    out: dict[str, torch.Tensor] = {}
    for k, v in got.items():
        if v is None or v.device.type == "meta":
            raise _NotPlaceable(f"{name}.{k}")
        if tuple(v.shape) != tuple(own[k].shape):
            raise InterpError(f"Tensor {name}.{k!r} of the {source} has shape {list(v.shape)}, "
                              f"the model expects {list(own[k].shape)}.")
        if own[k].is_floating_point() and not v.is_floating_point():
            raise InterpError(f"Tensor {name}.{k!r} of the {source} has dtype {v.dtype}; the "
                              "model needs floating-point weights there.")
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


class _NotPlaceable(Exception):
    """A converter output that this group's pass could not compute from its own tensors."""


def assemble_placed(cfg: Any, convert: Callable[[Mapping[str, torch.Tensor], Any], dict],
                    weights: Any, device_map: str | Mapping[str, str], *,
                    max_memory: Mapping[str, int | str] | None = None,
                    offload_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                    source: str = "checkpoint") -> nn.Module | None:
    """The model of ``cfg`` with ``convert(weights, cfg)``'s tensors loaded straight where
    ``device_map`` puts each unit, one group of units (one layer index) at a time: peak memory
    about one layer, not the model. ``weights`` is a lazy checkpoint mapping with ``meta(key)``
    (:class:`~interp.loading.safetensors.SafetensorsDict`). None when the converter cannot run
    on ``meta`` stand-ins or mixes layers (the caller then loads fully and dispatches)."""
    from interp.loading._common import _build_on_meta, _check_counts, _fill_computed_buffers

    _check_counts(cfg, len(weights), source)
    dtype = dtype or torch.float32
    model = _build_on_meta(cfg)
    if dtype != torch.float32:
        model = model.to(dtype)  # meta: sizes for "auto" in the dtype the weights will have
    dm, exec_device = _resolve_map(model, device_map, max_memory)
    units = placement_units(model)
    placer = _Placer(model, dm, exec_device, offload_dir)
    try:
        for layer, names in _groups(units).items():
            converted = convert(_GroupView(weights, layer), cfg)
            states = {n: _unit_state(n, units[n], converted, dtype, source) for n in names}
            del converted
            for n in names:
                units[n].load_state_dict(states.pop(n), assign=True, strict=True)
                _fill_computed_buffers(units[n])
                units[n].to(dtype)
                placer.place(n, units[n])
    except (_NotPlaceable, InterpError, NotImplementedError, RuntimeError):
        return None  # a converter that needs real values across layers: load it all instead
        # (and a real error in the checkpoint is then reported by that full load)
    _fill_computed_buffers(model)
    with contextlib.suppress(StopIteration):
        left = next(n for n, t in model.named_buffers() if t.device.type == "meta"
                    and not any(n.startswith(u + ".") for u in units if dm[u] == DISK))
        raise InterpError(f"Tensor {left!r} was never loaded.")
    return placer.finish().eval()


#: the placement (device_map, max_memory, offload_dir) that the running load_pretrained call
#: places by, for loaders that can load straight into place; None otherwise
_PLACING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "interp_placing", default=None)


@contextlib.contextmanager
def placing(placement: dict[str, Any] | None) -> Iterator[None]:
    """Within the block, :func:`placed` loads by ``placement`` (this thread or task only)."""
    token = _PLACING.set(placement)
    try:
        yield
    finally:
        _PLACING.reset(token)


def placed(cfg: Any, convert: Callable[[Mapping[str, torch.Tensor], Any], dict], weights: Any, *,
           tokenizer: Any = None, dtype: torch.dtype | None = None, source: str = "checkpoint",
           adds_bos: bool | None = None) -> nn.Module | None:
    """The model loaded straight into the device map of the enclosing :func:`placing` block
    (about one layer resident at a time), or None: no map, weights that are not a lazy mapping
    with ``meta(key)``, or a converter that cannot run layer by layer. The loaders call this
    before building the whole state dict and fall back to it when None."""
    from interp.loading._common import adopt_bos_rule
    from interp.tokenize import tokenizer_adds_bos

    placement = _PLACING.get()
    if placement is None or not callable(getattr(weights, "meta", None)):
        return None
    model = assemble_placed(cfg, convert, weights, dtype=dtype, source=source, **placement)
    if model is not None:
        model.tokenizer = tokenizer
        if adds_bos is None and tokenizer is not None:
            adds_bos = tokenizer_adds_bos(tokenizer)
        adopt_bos_rule(model, adds_bos)
    return model
