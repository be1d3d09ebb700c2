"""GGUF headers parsed and checked against the format (ggml's ``docs/gguf.md``) before any use.

A GGUF file is: magic ``GGUF``, a uint32 version, uint64 tensor and key-value counts, the
key-value pairs (a ``gguf_string_t`` key: uint64 length + UTF-8 bytes; a uint32 value type; the
value, arrays being a uint32 element type, a uint64 count and the elements), the tensor infos
(name, uint32 ``n_dimensions``, uint64 dimensions fastest-varying first, uint32 ``ggml_type``,
uint64 offset relative to the data section), padding to ``general.alignment`` (default 32),
then the tensor data.

:class:`GGUFFile` checks, as it reads: every read stays inside the file; counts fit in the
bytes left; value types are known; booleans are 0 or 1; strings are UTF-8; arrays nest at most
:data:`MAX_ARRAY_DEPTH` deep (the spec allows nesting, ggml reads none); keys and tensor names
are unique; ``general.alignment`` is a positive power of two (ggml's rule; the spec adds "a
multiple of 8"); tensors have 1 to 4 dimensions of at least 1, a known type whose block size
divides the first dimension, an offset that is a multiple of the alignment, and together tile
the data section in offset order, each at the aligned end of the previous one (how ggml and
gguf-py write them), with nothing after the last. A crafted header is therefore one
:class:`InterpError` naming the file and the key or tensor, never a ``ZeroDivisionError``,
``RecursionError`` or a tensor read from the wrong bytes.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from interp.errors import InterpError

#: value type -> struct format (ggml's gguf_type; BOOL=7, STRING=8, ARRAY=9 handled apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q",
           11: "<q", 12: "<d"}
INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
FLOAT_TYPES = frozenset({6, 12})
BOOL, STRING, ARRAY = 7, 8, 9
TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32",
              6: "FLOAT32", 7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64",
              12: "FLOAT64"}

MAX_ARRAY_DEPTH = 4
MAX_KEY_BYTES = 65535  # the spec: keys are at most 2^16 - 1 bytes
MAX_NAME_BYTES = 64  # the spec: tensor names are at most 64 bytes
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 2**40
DEFAULT_ALIGNMENT = 32

_FIX = "re-download the file or convert it again with llama.cpp's convert_hf_to_gguf.py"


class TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first (ne0 = columns)
    ggml_type: int
    offset: int  # from the start of the data section


def quant_sizes(ggml_type: int) -> tuple[int, int] | None:
    """(elements per block, bytes per block) of a ggml type, or None if unknown."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


def tensor_nbytes(t: TensorInfo) -> int:
    """Bytes of a (validated) tensor: whole blocks of its type."""
    sizes = quant_sizes(t.ggml_type)
    assert sizes is not None  # GGUFFile rejects unknown types
    block, type_size = sizes
    return math.prod(t.dims) // block * type_size


class _Cursor:
    """Bounds-checked reads from the header bytes; every failure names the file and what was
    being read."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> InterpError:
        return InterpError(f"GGUF file {str(self.path)!r}: {what}; the file is corrupt: {_FIX}.")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise InterpError(f"GGUF file {str(self.path)!r} is truncated ({self.size} bytes; "
                              f"its header runs past the end in {what}): {_FIX}.")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q", what)
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long (the limit is {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        """One value of type ``vtype`` for metadata key ``key``."""
        what = f"the value of key {key!r}"
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], what)
        if vtype == BOOL:
            b = self.scalar("<B", what)
            if b not in (0, 1):
                raise self.fail(f"key {key!r} holds the bool byte {b}; the spec allows 0 or 1")
            return bool(b)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            return self.array(key, depth)
        raise self.fail(f"key {key!r} has value type {vtype}; known types are 0 to 12")

    def array(self, key: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        what = f"the array of key {key!r}"
        etype, n = self.scalar("<I", what), self.scalar("<Q", what)
        # the least each element takes: a scalar its size, a string or array its header
        least = {BOOL: 1, STRING: 8, ARRAY: 12}.get(etype) or (
            struct.calcsize(SCALARS[etype]) if etype in SCALARS else 1)
        if n * least > self.size - self.pos:
            raise InterpError(f"GGUF file {str(self.path)!r} is truncated or corrupt ("
                              f"{self.size} bytes; its header runs past the end in {what}: "
                              f"{n} elements cannot fit in the {self.size - self.pos} bytes "
                              f"left): {_FIX}.")
        if etype in SCALARS:  # one unpack, not n Python calls (49k-token score arrays)
            fmt = SCALARS[etype]
            out = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos))
            self.pos += n * least
            return out
        return [self.value(etype, key, depth + 1) for _ in range(n)]


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed directly and validated (module
    docstring).

    Parsing here rather than with ``gguf.GGUFReader`` matters: the reader builds a numpy view per
    array element, which takes ~10 s on SmolLM2's 49k-token vocabulary; this takes ~0.2 s."""

    def __init__(self, path: Path, parts: tuple[Path, ...] = ()):
        """``parts``: a file shipped in consecutive pieces (PyPI packages split large files), read
        as their concatenation without writing it out; ``path`` names it in messages. The header
        must lie in the first piece (it is a few MB; pieces are tens of MB)."""
        self.path = path
        self.parts = tuple(parts) or (path,)
        self.part_sizes = tuple(p.stat().st_size for p in self.parts)
        size = sum(self.part_sizes)
        first = self.parts[0]
        mm = (np.memmap(first, dtype=np.uint8, mode="r") if self.part_sizes[0]
              else np.zeros(0, np.uint8))
        cur = _Cursor(memoryview(mm), path)  # the header only; tensor data is read with pread
        cur.need(4, "the magic bytes")
        if bytes(cur.buf[:4]) != b"GGUF":
            raise InterpError(f"{str(path)!r} is not a GGUF file (no GGUF magic bytes).")
        cur.pos = 4
        version = cur.scalar("<I", "the version")
        if version not in (2, 3):
            raise InterpError(f"GGUF version {version} of {str(path)!r} is not supported (2 or "
                              "3); convert the model again with a current llama.cpp.")
        n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the key count")
        left = size - cur.pos  # a key-value pair takes >= 14 bytes, a tensor info >= 29
        if n_kv * 14 + n_tensors * 29 > left:
            raise InterpError(f"GGUF file {str(path)!r} is truncated or corrupt ({size} "
                              f"bytes; its header runs past the end: {n_tensors} tensors and "
                              f"{n_kv} metadata keys cannot fit in {left} bytes): {_FIX}.")
        self.metadata: dict[str, Any] = {}
        self.types: dict[str, int] = {}  # key -> value type (a float key must hold a float)
        for _ in range(n_kv):
            key = cur.string("a metadata key", MAX_KEY_BYTES)
            if not key or key in self.metadata:
                raise cur.fail(f"metadata key {key!r} is empty or repeated")
            self.types[key] = cur.scalar("<I", f"the value type of key {key!r}")
            self.metadata[key] = cur.value(self.types[key], key)
        self.tensors = [self._tensor_info(cur) for _ in range(n_tensors)]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise cur.fail("two tensors have the same name")
        self.alignment = self._alignment(cur)
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self._check_layout(size)

    def _tensor_info(self, cur: _Cursor) -> TensorInfo:
        name = cur.string("a tensor name", MAX_NAME_BYTES)
        n_dims = cur.scalar("<I", f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has n_dimensions {n_dims}; ggml tensors have 1 to "
                           f"{MAX_DIMS}")
        dims = tuple(cur.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims))
        ggml_type, offset = cur.scalar("<I", f"tensor {name!r}"), cur.scalar("<Q", f"{name!r}")
        if not all(1 <= d <= MAX_DIM for d in dims):
            raise cur.fail(f"tensor {name!r} has dimensions {list(dims)}; each must be 1 to "
                           f"{MAX_DIM}")
        sizes = quant_sizes(ggml_type)
        if sizes is None:
            raise cur.fail(f"tensor {name!r} has an unknown ggml_type {ggml_type}")
        if dims[0] % sizes[0]:
            raise cur.fail(f"tensor {name!r} has {dims[0]} columns, not a multiple of the "
                           f"{sizes[0]}-element blocks of its ggml_type {ggml_type}")
        return TensorInfo(name, dims, ggml_type, offset)

    def _alignment(self, cur: _Cursor) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        align, vtype = self.metadata["general.alignment"], self.types["general.alignment"]
        if vtype not in INT_TYPES or align <= 0 or align & (align - 1):
            raise cur.fail(f"key 'general.alignment' is {align!r} ({TYPE_NAMES.get(vtype)}); "
                           "it must be a positive power of two (UINT32)")
        return align

    def _check_layout(self, size: int) -> None:
        """Each tensor inside the file, aligned, and all of them tiling the data section."""
        for t in self.tensors:
            end = self.data_start + t.offset + tensor_nbytes(t)
            if end > size:
                raise InterpError(f"GGUF file {str(self.path)!r} is truncated: tensor {t.name!r} "
                                  f"ends at byte {end}, the file has {size}: {_FIX}.")
            if t.offset % self.alignment:
                raise InterpError(f"GGUF file {str(self.path)!r}: tensor {t.name!r} has offset "
                                  f"{t.offset}, not a multiple of the alignment "
                                  f"{self.alignment}; the file is corrupt: {_FIX}.")
        at = end = 0
        for t in sorted(self.tensors, key=lambda t: t.offset):
            if t.offset != at:
                what = "overlaps the tensor before it" if t.offset < at else "leaves a gap"
                raise InterpError(f"GGUF file {str(self.path)!r}: tensor {t.name!r} has offset "
                                  f"{t.offset}, which {what} (expected {at}); tensors must "
                                  f"tile the data section: {_FIX}.")
            end = t.offset + tensor_nbytes(t)
            at = -(-end // self.alignment) * self.alignment
        if self.tensors and size > self.data_start + at:
            raise InterpError(f"GGUF file {str(self.path)!r} has {size - self.data_start - end} "
                              f"bytes after its last tensor; the file is corrupt: {_FIX}.")

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [*rows, row_bytes] (what ``gguf.quants.dequantize`` takes),
        read with ``os.pread``: no mapping keeps the file's pages resident after loading."""
        n = tensor_nbytes(t)
        data = np.empty(n, dtype=np.uint8)
        got, pos, start = 0, self.data_start + t.offset, 0
        for part, psize in zip(self.parts, self.part_sizes, strict=True):
            if got < n and pos < start + psize:  # this piece holds bytes [pos, ...)
                take = min(n - got, start + psize - pos)
                fd = os.open(part, os.O_RDONLY)
                try:
                    done = os.preadv(fd, [memoryview(data)[got:got + take]], pos - start)
                finally:
                    os.close(fd)
                got, pos = got + done, pos + done
                if done != take:
                    break
            start += psize
        if got != n:
            raise InterpError(f"GGUF file {str(self.path)!r} ended while reading tensor "
                              f"{t.name!r} (was it truncated while loading?).")
        rows = tuple(reversed(t.dims[1:]))
        return data.reshape(*rows, -1) if rows else data


# ---------------------------------------------------------------------------------------------
# typed metadata access: a key's value type and range checked, errors in GGUF keys
# ---------------------------------------------------------------------------------------------
MAX_INT = 2**31 - 1  # no size or count of a model interp can run comes near this


def _key_error(reader: GGUFFile, key: str, want: str) -> InterpError:
    value, vtype = reader.metadata.get(key), reader.types.get(key)
    shown = repr(value) if not isinstance(value, list) else f"an array of {len(value)}"
    return InterpError(f"GGUF file {str(reader.path)!r}: key {key!r} is {shown[:60]} "
                       f"({TYPE_NAMES.get(vtype, vtype)}); it must be {want}: {_FIX}.")


def meta_int(reader: GGUFFile, key: str, *, default: int | None = None, lo: int = 1) -> int | None:
    """An integer key (any GGUF integer type) in ``[lo, MAX_INT]``; ``default`` if absent."""
    if key not in reader.metadata:
        return default
    value = reader.metadata[key]
    if reader.types[key] not in INT_TYPES or not lo <= value <= MAX_INT:
        raise _key_error(reader, key, f"an integer from {lo} to {MAX_INT}")
    return value


def meta_float(reader: GGUFFile, key: str, *, default: float | None = None) -> float | None:
    """A positive finite float key (FLOAT32 or FLOAT64); ``default`` if absent."""
    if key not in reader.metadata:
        return default
    value = reader.metadata[key]
    if reader.types[key] not in FLOAT_TYPES or not (math.isfinite(value) and value > 0):
        raise _key_error(reader, key, "a finite FLOAT32 > 0")
    return float(value)


def meta_required(reader: GGUFFile, keys: tuple[str, ...]) -> None:
    """Raise naming every key of ``keys`` the file lacks."""
    missing = [k for k in keys if k not in reader.metadata]
    if missing:
        raise InterpError(f"GGUF file {str(reader.path)!r} lacks the metadata key(s) "
                          f"{', '.join(missing)}, required by the GGUF spec for this "
                          f"architecture; the file is incomplete: {_FIX}.")


def meta_check(reader: GGUFFile, ok: bool, what: str) -> None:
    """Raise ``what`` (a sentence about GGUF keys) naming the file unless ``ok``."""
    if not ok:
        raise InterpError(f"GGUF file {str(reader.path)!r}: {what}; the file is corrupt or "
                          f"not supported: {_FIX}.")
