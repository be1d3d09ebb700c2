"""GGUF files (llama.cpp's format): metadata to a config, tensors dequantised one at a time.

:class:`GGUFFile` parses the header; :class:`GGUFTensors` presents the file as a mapping
from Hugging Face tensor names to float32 tensors and reads and dequantises a tensor only when
the converter asks for it, so peak memory is the float32 model plus one tensor (not a float32
copy of the whole file). llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` of
Llama models (to rotate interleaved pairs); :func:`reverse_permute` undoes it, so ``hook_q``
and ``hook_k`` match transformers. Dequantised weights are Q4/Q8 values turned into float32:
the model computes in float32 on the weights the file actually holds.

Simple block formats (F32, F16, BF16, Q8_0, Q4_0, Q4_1) are dequantised by vectorised torch
code, bit-identical to ``gguf.quants`` and ten times faster; others fall back to ``gguf.quants``.
The parsed header and the tokenizer are cached per file in this process; weights are not.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from interp.errors import InterpError

#: GGUF general.architecture values we read (all use llama.cpp's Llama tensor names)
SUPPORTED_ARCHS = ("llama",)

#: GGUF tensor name pieces -> Hugging Face Llama names (per block ``blk.{i}.``)
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def reverse_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``, ``LlamaModel.permute``):
    per head, rows were reordered from [first half; second half] to interleaved pairs."""
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequant_fast(raw: np.ndarray, qtype: int) -> torch.Tensor | None:
    """Vectorised torch dequantisation of the simple block formats (F32, F16, BF16, Q8_0, Q4_0,
    Q4_1; layouts from ggml-common.h); None for others, which ``gguf.quants`` handles (its numpy
    kernels loop over row groups in Python: ~3 s for SmolLM2 against ~0.3 s here)."""
    rows = raw.shape[:-1]
    b = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.uint8)).reshape(-1, raw.shape[-1])
    if qtype == 0:  # F32
        return b.view(torch.float32).reshape(*rows, -1)
    if qtype == 1:  # F16
        return b.view(torch.float16).float().reshape(*rows, -1)
    if qtype == 30:  # BF16
        return b.view(torch.bfloat16).float().reshape(*rows, -1)
    if qtype == 8:  # Q8_0: fp16 scale d, 32 x int8
        blk = b.reshape(-1, 34)
        d = blk[:, :2].contiguous().view(torch.float16).float()
        return (d * blk[:, 2:].contiguous().view(torch.int8).float()).reshape(*rows, -1)
    if qtype in (2, 3):  # Q4_0: d, 16 bytes of nibbles (q - 8); Q4_1: d, m, nibbles (d * q + m)
        size = 18 if qtype == 2 else 20
        blk = b.reshape(-1, size)
        d = blk[:, :2].contiguous().view(torch.float16).float()
        qs = blk[:, size - 16:]
        # low nibbles are values 0..15, high 16..31
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
        if qtype == 2:
            return (d * (q - 8.0)).reshape(*rows, -1)
        m = blk[:, 2:4].contiguous().view(torch.float16).float()
        return (d * q + m).reshape(*rows, -1)
    return None


def _hf_name(name: str) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        if rest in BLOCK_NAMES:
            return f"model.layers.{i}.{BLOCK_NAMES[rest]}"
    return None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}


class TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first (ne0 = columns)
    ggml_type: int
    offset: int  # from the start of the data section


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed directly (the format is a short header of
    key-value pairs and tensor descriptors, then aligned tensor data).

    Parsing here rather than with ``gguf.GGUFReader`` matters: the reader builds a numpy view per
    array element, which takes ~10 s on SmolLM2's 49k-token vocabulary; this takes ~0.2 s.
    Every read is bounds-checked, so a truncated file is one clear error."""

    def __init__(self, path: Path):
        import struct

        self.path = path
        if path.stat().st_size:
            mm = np.memmap(path, dtype=np.uint8, mode="r")
        else:
            mm = np.zeros(0, np.uint8)
        buf = memoryview(mm)  # the header only; tensor data is read with pread (see raw)
        size = len(buf)
        pos = 0

        def need(n: int) -> None:
            if pos + n > size:
                raise InterpError(f"GGUF file {str(path)!r} is truncated ({size} bytes; its "
                                  "header runs past the end).")

        def scalar(fmt: str) -> Any:
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n)
            v = struct.unpack_from(fmt, buf, pos)[0]
            pos += n
            return v

        def string() -> str:
            nonlocal pos
            n = scalar("<Q")
            need(n)
            v = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
            pos += n
            return v

        def value(vtype: int) -> Any:
            if vtype in _SCALARS:
                return scalar(_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, n = scalar("<I"), scalar("<Q")
                return [value(etype) for _ in range(n)]
            raise InterpError(f"GGUF file {str(path)!r} has an unknown value type {vtype} "
                              "(corrupt file?).")

        need(4)
        if bytes(buf[:4]) != b"GGUF":
            raise InterpError(f"{str(path)!r} is not a GGUF file (no GGUF magic bytes).")
        pos = 4
        version = scalar("<I")
        if version not in (2, 3):
            raise InterpError(f"GGUF version {version} of {str(path)!r} is not supported (2 or 3).")
        n_tensors, n_kv = scalar("<Q"), scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            self.metadata[key] = value(scalar("<I"))
        self.tensors: list[TensorInfo] = []
        for _ in range(n_tensors):
            name = string()
            n_dims = scalar("<I")
            dims = tuple(scalar("<Q") for _ in range(n_dims))
            self.tensors.append(TensorInfo(name, dims, scalar("<I"), scalar("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        self.data_start = (pos + align - 1) // align * align
        for t in self.tensors:
            end = self.data_start + t.offset + self._nbytes(t)
            if end > size:
                raise InterpError(f"GGUF file {str(path)!r} is truncated: tensor {t.name!r} ends "
                                  f"at byte {end}, the file has {size}.")

    @staticmethod
    def _nbytes(t: TensorInfo) -> int:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        except (ValueError, KeyError):
            raise InterpError(f"GGUF tensor {t.name!r} has an unknown type "
                              f"{t.ggml_type}.") from None
        n = int(np.prod(t.dims)) if t.dims else 1
        return n // block * type_size

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [*rows, row_bytes] (what ``gguf.quants.dequantize`` takes),
        read with ``os.pread``: no mapping keeps the file's pages resident after loading."""
        n = self._nbytes(t)
        data = np.empty(n, dtype=np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(data)], self.data_start + t.offset)
        finally:
            os.close(fd)
        if got != n:
            raise InterpError(f"GGUF file {str(self.path)!r} ended while reading tensor "
                              f"{t.name!r}.")
        rows = tuple(reversed(t.dims[1:]))
        return data.reshape(*rows, -1) if rows else data


def open_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF file's header; a truncated or corrupt file is one InterpError."""
    try:
        import gguf  # noqa: F401  (dequantisation kernels)
    except ImportError:
        raise InterpError("Reading GGUF files needs the gguf package: pip install gguf") from None
    return GGUFFile(Path(path))


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.metadata.get(key, default)


def hf_config_dict(reader: GGUFFile) -> dict[str, Any]:
    """The transformers-style config a GGUF file's metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise InterpError(f"GGUF architecture {arch!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED_ARCHS)}.")
    a = f"{arch}."
    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    req = {k: _field(reader, a + k) for k in required}
    missing = [k for k, v in req.items() if v is None]
    if missing:
        raise InterpError(f"GGUF metadata lacks {', '.join(a + m for m in missing)}; "
                          "the file is incomplete.")
    names = {t.name for t in reader.tensors}
    n_heads = int(req["attention.head_count"])
    d = int(req["embedding_length"])
    vocab = _field(reader, a + "vocab_size")
    if vocab is None:
        tokens = reader.metadata.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else None
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": int(req["block_count"]),
        "hidden_size": d,
        "intermediate_size": int(req["feed_forward_length"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, a + "attention.key_length", d // n_heads)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
    }


class GGUFTensors(Mapping):
    """Hugging Face name -> float32 tensor over a GGUF file, dequantised on access."""

    def __init__(self, reader: GGUFFile, config: dict[str, Any], path: Path):
        self._reader, self._cfg, self._path = reader, config, path
        self._by_name: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            hf = _hf_name(t.name)
            if hf is None:
                self._by_name[t.name] = t  # unknown names surface as unexpected tensors
            else:
                self._by_name[hf] = t

    def __getitem__(self, key: str) -> torch.Tensor:
        from gguf import dequantize
        from gguf.constants import GGMLQuantizationType

        t = self._by_name[key]
        qtype = GGMLQuantizationType(t.ggml_type)
        raw = self._reader.raw(t)
        try:
            out = _dequant_fast(raw, t.ggml_type)
            if out is None:
                ref = np.ascontiguousarray(dequantize(raw, qtype), dtype=np.float32)
                out = torch.from_numpy(ref)
        except Exception as e:
            raise InterpError(f"Cannot dequantise GGUF tensor {t.name!r} ({qtype.name}) in "
                              f"{str(self._path)!r}: {e}") from None
        if key.endswith("self_attn.q_proj.weight"):
            out = reverse_permute(out, self._cfg["num_attention_heads"])
        elif key.endswith("self_attn.k_proj.weight"):
            out = reverse_permute(out, self._cfg["num_key_value_heads"])
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer stored in the GGUF metadata, built by transformers' GGUF support.

    transformers' converter is called directly (4 s for SmolLM2); ``AutoTokenizer.from_pretrained(
    gguf_file=...)`` builds the same tokenizer in ~20 s, so it is only the fallback."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:  # another transformers layout: the public, slower path
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise InterpError(f"Cannot build the tokenizer stored in {str(path)!r}: {e}") from None
    try:
        arch, tok_dict, tok_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InterpError(f"Cannot build the tokenizer stored in {str(path)!r}: {msg}") from None


@functools.lru_cache(maxsize=4)
def _header(path: str, mtime_ns: int, size: int) -> GGUFFile:
    """The parsed header, cached per (path, mtime, size): parsing SmolLM2's 49k-entry vocabulary
    takes ~0.5 s and analyses load the same built-in many times."""
    return open_gguf(Path(path))


@functools.lru_cache(maxsize=4)
def _tokenizer_state(path: str, mtime_ns: int, size: int) -> tuple[str, dict[str, Any]]:
    """The GGUF tokenizer as (tokenizer.json text, special tokens), cached: building it from the
    metadata takes seconds, rebuilding from the JSON a fraction of one, and every model gets its
    own tokenizer object (padding_side and friends are mutable)."""
    tok = gguf_tokenizer(Path(path))
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template")
    special = {k: getattr(tok, k, None) for k in keys if getattr(tok, k, None) is not None}
    return tok.backend_tokenizer.to_str(), special


def load_gguf(path: Path, fields: dict[str, Any], *, device: Any = None,
              dtype: torch.dtype | None = None) -> Any:
    """A GGUF file as a model with its tokenizer (``model.prepend_bos`` follows the file's
    ``tokenizer.ggml.add_bos_token``: SmolLM2's BOS is a chat marker, not a start of text).

    Weights are dequantised on every load (about 1 s for SmolLM2) rather than cached: a cache
    would hold a second float32 copy of the model for the life of the process."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from interp.loading._common import apply_overrides, assemble
    from interp.loading.families import get_family

    path = Path(path)
    st = os.stat(path)
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    reader = _header(*key)
    hf = hf_config_dict(reader)
    fam = get_family(hf["model_type"])
    cfg = fam.config_from_hf(hf)
    cfg = dataclasses.replace(cfg, extra={**cfg.extra, "source": str(path)})
    cfg = apply_overrides(cfg, fields)
    sd = fam.convert_state_dict(GGUFTensors(reader, hf, path), cfg)
    tok_json, special = _tokenizer_state(*key)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json), **special)
    model = assemble(cfg, sd, tokenizer=tok, device=device, dtype=dtype,
                     source=f"GGUF file {path.name!r}")
    model.prepend_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True))
    return model
