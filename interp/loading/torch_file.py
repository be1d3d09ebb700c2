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
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import torch

from interp.errors import InterpError

#: the first bytes of a zip file (a local file header), as torch.save has written since 1.6
ZIP_MAGIC = b"PK\x03\x04"


def is_zip(path: Path) -> bool:
    """Whether ``path`` is in torch's zip format (else the legacy pickle stream)."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def _is_pickle(path: Path) -> bool:
    """Whether ``path`` starts like a legacy torch file: a pickle's PROTO opcode (0x80)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def check_zip(path: Path, what: str = "Checkpoint") -> None:
    """Check a zip-format ``.pt`` is self-consistent before torch reads it.

    torch locates each record's bytes from the *local* header (its name and extra-field
    lengths) and reads storages without checking their CRC, so one changed length byte shifts
    where a tensor is read from: a silently different model. Here every record of the central
    directory must start with a local header naming the same record, no two records may share a
    name, each record's bytes must end before the next record (or the central directory)
    begins, and the bytes torch will read must match the record's CRC-32 (the zip application
    note, APPNOTE.TXT, sections 4.3.7, 4.3.12 and 4.4.7). A CRC of 0 means none was written
    (``torch.serialization.set_crc32_options(False)``) and is not checked. The check reads the
    file once (about 1 s per GB)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = sorted(z.infolist(), key=lambda i: i.header_offset)
            end_of_data = z.start_dir
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise InterpError(f"Cannot read {what.lower()} {str(path)!r}: its zip structure is "
                          f"corrupt ({e}); re-save or re-download it.") from None
    if len({i.filename for i in infos}) != len(infos):
        raise _bad_zip(path, what, "two records share a name")
    with open(path, "rb") as f:
        for info, nxt in zip(infos, [*infos[1:], None], strict=True):
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != ZIP_MAGIC:
                raise _bad_zip(path, what, f"record {info.filename!r} has no local header")
            n, m = struct.unpack("<HH", head[26:30])
            if f.read(n) != info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
                raise _bad_zip(path, what, f"record {info.filename!r} has a different local name")
            start = info.header_offset + 30 + n + m
            limit = nxt.header_offset if nxt is not None else end_of_data
            if start + info.compress_size > limit:
                raise _bad_zip(path, what, f"record {info.filename!r} runs into the next one")
            if info.CRC and _crc32(f, start, info.compress_size) != info.CRC:
                raise _bad_zip(path, what, f"record {info.filename!r} fails its CRC-32 check")


def _crc32(f: BinaryIO, start: int, size: int) -> int:
    """CRC-32 of ``size`` bytes from ``start``: exactly the bytes torch will read."""
    f.seek(start)
    crc = 0
    while size > 0:
        chunk = f.read(min(size, 1 << 24))
        if not chunk:
            return -1  # the file ends inside the record
        crc, size = zlib.crc32(chunk, crc), size - len(chunk)
    return crc


def _bad_zip(path: Path, what: str, problem: str) -> InterpError:
    return InterpError(f"Cannot read {what.lower()} {str(path)!r}: it is corrupt ({problem}); "
                       "re-save or re-download it.")


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
    line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", line).split())  # no colour, one line
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
    zipped = is_zip(path)
    if zipped:
        check_zip(path, what)
    elif not _is_pickle(path):
        raise InterpError(f"Cannot read {what.lower()} {str(path)!r}: it is not a torch file (it "
                          "starts with neither a zip nor a pickle header).")
    try:
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
