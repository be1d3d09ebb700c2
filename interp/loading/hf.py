"""Hugging Face checkpoints: local folders, in-memory ``transformers`` models, tokenizers.

A folder holds ``config.json`` and weights as ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with ``torch.load(weights_only=
True)`` only: a pickle from a stranger must not run code). Safetensors files are read tensor
by tensor (:class:`SafetensorsDict`), so the whole file is never held twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One safetensors file: its header parsed and checked against the file size up front, each
    tensor read on request straight into its own buffer (``os.pread``).

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    byte offsets), then the raw tensor bytes. Reading tensor by tensor rather than memory-mapping
    keeps exactly one copy of each weight in the process: a mapping would add the file's pages to
    the resident set for as long as any weight still pointed into it (measured: 1.6x the fp32
    size after use for a 0.5 GB checkpoint, against 1.0x here)."""

    def __init__(self, path: Path):
        import struct

        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InterpError(f"Safetensors file {str(path)!r} is truncated ({size} bytes, "
                                  "no header).")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise InterpError(f"Safetensors file {str(path)!r} is truncated or corrupt: its "
                                  f"header claims {n} bytes, the file has {size}.")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InterpError(f"Safetensors file {str(path)!r} has a corrupt header: "
                                  f"{_first_line(e)}") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _ST_DTYPES[e["dtype"]]
                begin, end = (int(x) for x in e["data_offsets"])
                shape = tuple(int(x) for x in e["shape"])
            except (KeyError, TypeError, ValueError):
                raise InterpError(f"Safetensors file {str(path)!r}: tensor {name!r} has an "
                                  "unreadable header entry.") from None
            if self.base + end > size:
                raise InterpError(f"Safetensors file {str(path)!r} is truncated: tensor {name!r} "
                                  f"ends at byte {self.base + end}, the file has {size}.")
            numel = 1
            for d in shape:
                numel *= d
            if (end - begin) != numel * torch.empty((), dtype=dtype).element_size():
                raise InterpError(f"Safetensors file {str(path)!r}: tensor {name!r} has "
                                  f"{end - begin} bytes for shape {list(shape)}.")
            self.entries[name] = (dtype, shape, begin, end)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                view, done = memoryview(buf.numpy()), 0
                while done < end - begin:
                    got = os.preadv(fd, [view[done:]], self.base + begin + done)
                    if got <= 0:
                        raise InterpError(f"Safetensors file {str(self.path)!r} ended while "
                                          f"reading tensor {name!r}.")
                    done += got
            finally:
                os.close(fd)
        return buf.view(dtype).reshape(shape)


class SafetensorsDict(Mapping):
    """A read-only mapping name -> tensor over one or more safetensors files (shards), reading
    each tensor only when asked; every file's header is validated when the mapping is made."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            if not f.is_file():
                raise InterpError(f"Weights file {str(f)!r} listed in the index does not exist; "
                                  "the checkpoint is incomplete.")
            st = SafetensorsFile(f)
            for k in st.entries:
                self._where[k] = st

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def read_config_json(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InterpError(f"Folder {str(folder)!r} has no config.json; a Hugging Face checkpoint "
                          "folder needs config.json plus model.safetensors or pytorch_model.bin.")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InterpError(f"{str(cfg_path)!r} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise InterpError(f"{str(cfg_path)!r} has no 'model_type'; it is not a transformers "
                          "config.")
    return d


def hf_config_object(folder: Path, raw: dict[str, Any]) -> Any:
    """The transformers config object (its class supplies the defaults config.json omits)."""
    from transformers import AutoConfig

    try:  # never the folder's own code: config.json's fields are all interp reads
        return AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                          trust_remote_code=False)
    except Exception as e:
        raise InterpError(f"transformers cannot read {str(folder / 'config.json')!r}: "
                          f"{_first_line(e)}") from None


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
    try:
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InterpError(f"Shard index {str(index)!r} is unreadable (no weight_map): "
                          f"{_first_line(e)}") from None
    return [index.parent / f for f in sorted(set(wm.values()))]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InterpError(f"Weights file {str(path)!r} does not exist; the checkpoint is "
                          "incomplete.")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise InterpError(f"Cannot read {str(path)!r} safely (truncated, corrupt, or a pickle "
                          f"with code?): {_first_line(e)}") from None
    if not isinstance(sd, dict):
        raise InterpError(f"{str(path)!r} does not hold a state dict.")
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
