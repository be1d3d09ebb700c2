"""Hugging Face checkpoints: local folders, in-memory ``transformers`` models, tokenizers.

A folder holds ``config.json`` and weights as ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with ``torch.load(weights_only=
True)`` only: a pickle from a stranger must not run code). Safetensors files are read tensor
by tensor (:class:`SafetensorsDict`, validated against the format in
:mod:`interp.loading.safetensors`), so the whole file is never held twice. ``config.json``'s
fields are type-checked (:mod:`interp.loading.config_json`) before transformers or a converter
sees them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError
from interp.loading.config_json import check_config_fields
from interp.loading.safetensors import SafetensorsDict, SafetensorsFile
from interp.loading.torch_file import load_torch_file

__all__ = ["WEIGHT_FILES", "SafetensorsDict", "SafetensorsFile", "folder_tokenizer",
           "hf_config_object", "read_config_json", "read_weights", "tokenizer_code",
           "wordpiece_tokenizer"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def read_config_json(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict: a JSON object with a string ``model_type`` whose fields interp
    reads have the right types (a wrong one names the file and the field)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InterpError(f"Folder {str(folder)!r} has no config.json; a Hugging Face checkpoint "
                          "folder needs config.json plus model.safetensors or pytorch_model.bin.")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise InterpError(f"{str(cfg_path)!r} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise InterpError(f"{str(cfg_path)!r} has no 'model_type'; it is not a transformers "
                          "config.")
    check_config_fields(d, cfg_path)
    return d


def hf_config_object(folder: Path, raw: dict[str, Any]) -> Any:
    """The transformers config object (its class supplies the defaults config.json omits)."""
    from transformers import AutoConfig

    try:  # never the folder's own code: config.json's fields are all interp reads
        return AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                          trust_remote_code=False)
    except Exception as e:  # transformers validates field types; its message names the field
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise InterpError(f"transformers cannot read {str(folder / 'config.json')!r}: {detail} "
                          "(correct that field, or remove it to use the default).") from None


def read_weights(folder: Path) -> Mapping[str, torch.Tensor]:
    """A name -> tensor mapping over the folder's weights (lazy for safetensors)."""
    st = folder / "model.safetensors"
    st_index = folder / "model.safetensors.index.json"
    pt = folder / "pytorch_model.bin"
    pt_index = folder / "pytorch_model.bin.index.json"
    if st.is_file():
        return SafetensorsDict([st])
    if st_index.is_file():
        return SafetensorsDict(_shards(st_index))
    if pt.is_file():
        return _torch_load(pt)
    if pt_index.is_file():
        out: dict[str, torch.Tensor] = {}
        for f in _shards(pt_index):
            out.update(_torch_load(f))
        return out
    raise InterpError(f"Folder {str(folder)!r} has no weights; expected one of "
                      f"{', '.join(WEIGHT_FILES)}.")


def _shards(index: Path) -> list[Path]:
    """The shard files an index's ``weight_map`` (tensor name -> file name) lists: plain file
    names in the index's own folder, never a path that leads elsewhere."""
    try:
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        raise InterpError(f"Shard index {str(index)!r} is unreadable (no weight_map): "
                          f"{_first_line(e)}") from None
    if not isinstance(wm, dict) or not wm:
        raise InterpError(f"Shard index {str(index)!r} field weight_map must be a non-empty "
                          "object of tensor name -> shard file name.")
    for name, file in wm.items():
        if (not isinstance(file, str) or not file or Path(file).name != file
                or file in (".", "..")):
            raise InterpError(f"Shard index {str(index)!r} field weight_map[{name!r}] is "
                              f"{file!r}; it must be the name of a file in the same folder.")
    return [index.parent / f for f in sorted(set(wm.values()))]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` (or shard): a dict of named tensors, read safely."""
    if not path.is_file():
        raise InterpError(f"Weights file {str(path)!r} does not exist; the checkpoint is "
                          "incomplete.")
    sd = load_torch_file(path, what="Weights file")
    if not isinstance(sd, dict):
        raise InterpError(f"Weights file {str(path)!r} holds a {type(sd).__name__}, not a state "
                          "dict (a dict of named tensors).")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InterpError(f"Weights file {str(path)!r} entry {k!r} is a "
                              f"{type(v).__name__}; a state dict maps names to tensors.")
    return sd


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
def wordpiece_tokenizer(vocab: list[str] | Path | str, do_lower_case: bool = True) -> Any:
    """BERT's WordPiece tokenizer from a vocabulary (a list of tokens, or a vocab.txt path).

    transformers 5's ``BertTokenizer`` is the fast, tokenizers-backed class and takes
    ``vocab=`` (a dict), not ``vocab_file=``."""
    from transformers import BertTokenizer

    if isinstance(vocab, str | Path):
        vocab = Path(vocab).read_text(encoding="utf-8").split("\n")
        if vocab and vocab[-1] == "":
            vocab = vocab[:-1]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=do_lower_case)


def folder_tokenizer(folder: Path, model_type: str) -> Any:
    """The folder's tokenizer, or None when it ships none (random test models)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model",
             "tokenizer.model")
    if (folder / "vocab.txt").is_file() and model_type == "bert":
        do_lower = True
        tc = folder / "tokenizer_config.json"
        if tc.is_file():
            try:
                config = json.loads(tc.read_text(encoding="utf-8"))
                do_lower = bool(config.get("do_lower_case", True))
            except json.JSONDecodeError:
                pass
        return wordpiece_tokenizer(folder / "vocab.txt", do_lower_case=do_lower)
    if not any((folder / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:  # trust_remote_code=False: transformers neither prompts nor runs the folder's code
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as e:
        if code := tokenizer_code(folder):
            raise InterpError(
                f"The tokenizer in {str(folder)!r} exists only as code ({', '.join(code)}, named "
                "by auto_map); interp never runs code from a model folder: give the folder a "
                "tokenizer.json, or a tokenizer_class that transformers ships."
            ) from None
        raise InterpError(f"Cannot load the tokenizer in {str(folder)!r}: "
                          f"{_first_line(e)}") from None


def tokenizer_code(folder: Path) -> list[str]:
    """The Python files a folder's ``auto_map`` names for its tokenizer (tokenizer_config.json
    or config.json), e.g. ``["tokenization_evil.py"]``: what transformers would have to run."""
    files: list[str] = []
    for name in ("tokenizer_config.json", "config.json"):
        try:
            raw = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
        entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        refs = entry if isinstance(entry, list) else [entry]
        for ref in refs:
            if isinstance(ref, str) and "." in ref:
                module = ref.split("--")[-1].rsplit(".", 1)[0]
                files.append(f"{module.replace('.', '/')}.py")
    return sorted(set(files))
