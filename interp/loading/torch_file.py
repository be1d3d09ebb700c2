"""Reading ``.pt`` / ``pytorch_model.bin`` files safely: the one ``torch.load`` of the package.

Both interp checkpoints (:mod:`interp.checkpoint`) and Hugging Face ``pytorch_model.bin``
weights (:mod:`interp.loading.hf`) come through :func:`load_torch_file`, so they share three
rules:

- ``weights_only=True`` always: the unpickler accepts tensors and plain types only, so a file
  from a stranger cannot run code. A refused file is reported as what it is (a pickle holding
  a Python object) with no advice to switch the safety off.
- Zip files (``torch.save``'s format since PyTorch 1.6) are memory-mapped (``mmap=True``) when
  asked; the legacy non-zip format cannot be, so it is read without a mapping instead of
  failing with torch's "mmap can only be used with ..." message.
- Whatever torch raises on a truncated or corrupt file becomes one :class:`InterpError` line
  naming the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError

#: the first bytes of a zip file (a local file header), as torch.save has written since 1.6
ZIP_MAGIC = b"PK\x03\x04"


def is_zip(path: Path) -> bool:
    """Whether ``path`` is in torch's zip format (else the legacy pickle stream)."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def _unsafe_global(e: BaseException) -> str | None:
    """The ``module.name`` torch's weights-only unpickler refused, if that was the failure."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return m.group(1) if m else None


def _detail(e: BaseException) -> str:
    """A one-line cause from torch's error, without its advice (torch's weights-only message
    recommends ``weights_only=False``, which would run the file's code)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = m.group(1) if m else (text.strip().splitlines()[0] if text.strip() else "")
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
    if not line or "weights_only" in line:
        return type(e).__name__
    return line[:200]


def load_torch_file(path: Path, *, what: str, mmap: bool = True) -> Any:
    """The object ``torch.save`` wrote to ``path``, read with ``weights_only=True``.

    ``what`` names the file in messages (``"Checkpoint"``, ``"Weights file"``); ``mmap`` maps
    zip files instead of reading them (legacy files are always read)."""
    path = Path(path)
    if not path.is_file():
        raise InterpError(f"{what} {str(path)!r} does not exist.")
    try:
        zipped = is_zip(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        if name := _unsafe_global(e):
            raise InterpError(
                f"{what} {str(path)!r} cannot be read safely: it holds a pickled Python object "
                f"({name}), not only tensors and plain data, and interp never runs code from a "
                "file; ask for the weights as safetensors or as a plain dict of tensors."
            ) from None
        raise InterpError(f"Cannot read {what.lower()} {str(path)!r}: it is truncated, corrupt "
                          f"or not a torch file ({_detail(e)}).") from None
    except Exception as e:  # torch.load raises many types on corrupt input
        raise InterpError(f"Cannot read {what.lower()} {str(path)!r}: it is truncated, corrupt "
                          f"or not a torch file ({_detail(e)}).") from None
