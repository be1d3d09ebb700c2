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
The header is validated against the format in :mod:`interp.loading.gguf_format`, and the
metadata interp reads against the types and ranges of the spec's ``llama.*`` keys here, so a
crafted file is one :class:`InterpError` naming the file and the GGUF key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interp.errors import InterpError
from interp.loading.gguf_format import (
    STRING,
    GGUFFile,
    TensorInfo,
    meta_check,
    meta_float,
    meta_int,
    meta_required,
)
from interp.loading.gguf_gemma3 import BLOCK_NAMES as GEMMA3_BLOCK_NAMES
from interp.loading.gguf_gemma3 import gemma3_config_dict, gemma3_tensor

__all__ = ["GGUFFile", "GGUFTensors", "TensorInfo", "hf_config_dict", "load_gguf", "open_gguf",
           "reverse_permute"]

#: GGUF general.architecture values we read (Gemma 3's names and conventions: gguf_gemma3)
SUPPORTED_ARCHS = ("llama", "gemma3")

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

#: ggml's integer tensor types (I8, I16, I32, I64): never model weights
_INTEGER_TYPES = frozenset({24, 25, 26, 27})


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


def _block_names(hf_model_type: str) -> dict[str, str]:
    """GGUF block tensor name pieces -> transformers' names, for the converted model type."""
    return GEMMA3_BLOCK_NAMES if hf_model_type == "gemma3_text" else BLOCK_NAMES


def _hf_name(name: str, block_names: dict[str, str] = BLOCK_NAMES) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 2)
    if (len(parts) == 3 and parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit()
            and parts[2] in block_names):  # isascii: "²".isdigit() is true, int("²") fails
        return f"model.layers.{int(parts[1])}.{block_names[parts[2]]}"
    return None


_GGUF_TOP = {hf: gguf for gguf, hf in TOP_NAMES.items()}


def _gguf_names(message: str, block_names: dict[str, str] = BLOCK_NAMES) -> str:
    """A converter's message with Hugging Face tensor names put back as the file's GGUF names
    (``'model.layers.1.mlp.up_proj.weight'`` -> ``'blk.1.ffn_up.weight'``)."""
    gguf_block = {hf: gguf for gguf, hf in block_names.items()}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in _GGUF_TOP:
            return repr(_GGUF_TOP[name])
        block = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if block and block.group(2) in gguf_block:
            return repr(f"blk.{block.group(1)}.{gguf_block[block.group(2)]}")
        return m.group(0)

    return re.sub(r"'((?:model|lm_head)\.[\w.]+)'", sub, message)


def open_gguf(path: Path, parts: tuple[Path, ...] = ()) -> GGUFFile:
    """Parse a GGUF file's header (of the concatenation of ``parts`` if given); a truncated or
    corrupt file is one InterpError."""
    try:
        import gguf  # noqa: F401  (dequantisation kernels)
    except ImportError:
        raise InterpError("Reading GGUF files needs the gguf package: pip install gguf") from None
    return GGUFFile(Path(path), parts=tuple(parts))


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.metadata.get(key, default)


def _vocab_size(reader: GGUFFile, a: str) -> int:
    """``{arch}.vocab_size``, else the length of ``tokenizer.ggml.tokens`` (equal if both)."""
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        meta_check(reader, isinstance(tokens, list) and all(isinstance(t, str) for t in tokens),
                   "key 'tokenizer.ggml.tokens' must be an array of strings")
    vocab = meta_int(reader, a + "vocab_size")
    if vocab is not None and tokens is not None:
        meta_check(reader, vocab == len(tokens), f"key '{a}vocab_size' is {vocab} but "
                   f"'tokenizer.ggml.tokens' has {len(tokens)} entries")
    if vocab is None:
        meta_check(reader, bool(tokens), f"neither '{a}vocab_size' nor 'tokenizer.ggml.tokens' "
                   "gives the vocabulary size")
        vocab = len(tokens)
    return vocab


def _unsupported_keys(reader: GGUFFile, a: str, scaled_rope: bool = False) -> None:
    """Keys that would change the model in ways interp does not implement: refused, since
    ignoring them would load a silently different model (``scaled_rope``: the architecture's
    own reader maps RoPE scaling)."""
    scaling = None if scaled_rope else reader.metadata.get(a + "rope.scaling.type")
    meta_check(reader, scaling in (None, "none"), f"key '{a}rope.scaling.type' is {scaling!r}; "
               "scaled RoPE is not supported")
    factor = None if scaled_rope else reader.metadata.get(a + "rope.scaling.factor")
    meta_check(reader, factor in (None, 0.0, 1.0), f"key '{a}rope.scaling.factor' is "
               f"{factor!r}; scaled RoPE is not supported")
    experts = reader.metadata.get(a + "expert_count", 0)
    meta_check(reader, experts in (0, 1), f"key '{a}expert_count' is {experts!r}; mixture-of-"
               "experts GGUF files are not supported")


def hf_config_dict(reader: GGUFFile) -> dict[str, Any]:
    """The transformers-style config a GGUF file's metadata describes, every key it reads
    checked for type and range (the spec's LLaMA section: ``llama.context_length``,
    ``embedding_length``, ``block_count``, ``feed_forward_length``,
    ``attention.head_count`` and ``attention.layer_norm_rms_epsilon`` are required)."""
    arch = _field(reader, "general.architecture")
    if reader.types.get("general.architecture") != STRING or arch not in SUPPORTED_ARCHS:
        raise InterpError(f"GGUF architecture {arch!r} (key 'general.architecture') of "
                          f"{str(reader.path)!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ARCHS)}.")
    a = f"{arch}."
    meta_required(reader, tuple(a + k for k in (
        "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
        "context_length", "attention.layer_norm_rms_epsilon")))
    n_heads = meta_int(reader, a + "attention.head_count")
    d = meta_int(reader, a + "embedding_length")
    n_kv = meta_int(reader, a + "attention.head_count_kv", default=n_heads)
    meta_check(reader, n_heads % n_kv == 0, f"key '{a}attention.head_count' ({n_heads}) is not "
               f"a multiple of '{a}attention.head_count_kv' ({n_kv})")
    head_dim = meta_int(reader, a + "attention.key_length")
    if head_dim is None:
        meta_check(reader, d % n_heads == 0, f"key '{a}embedding_length' ({d}) is not a multiple "
                   f"of '{a}attention.head_count' ({n_heads}) and '{a}attention.key_length' "
                   "is not given")
        head_dim = d // n_heads
    meta_check(reader, head_dim % 2 == 0, f"the head size {head_dim} (from '{a}embedding_length' "
               "and 'attention.head_count' or 'attention.key_length') must be even for RoPE")
    for key in ("attention.value_length", "rope.dimension_count"):
        v = meta_int(reader, a + key, default=head_dim)
        meta_check(reader, v == head_dim, f"key '{a}{key}' is {v}, not the head size {head_dim}; "
                   "only full-width RoPE with equal key and value sizes is supported")
    _unsupported_keys(reader, a, scaled_rope=arch == "gemma3")
    bos = "tokenizer.ggml.add_bos_token"
    meta_check(reader, bos not in reader.metadata or reader.types[bos] == 7,
               f"key {bos!r} must be a BOOL")
    names = {t.name for t in reader.tensors}
    base = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": meta_int(reader, a + "block_count"),
        "hidden_size": d,
        "intermediate_size": meta_int(reader, a + "feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": _vocab_size(reader, a),
        "max_position_embeddings": meta_int(reader, a + "context_length"),
        "rope_theta": meta_float(reader, a + "rope.freq_base", default=10000.0),
        "rms_norm_eps": meta_float(reader, a + "attention.layer_norm_rms_epsilon"),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "gemma3":
        return gemma3_config_dict(reader, {k: v for k, v in base.items() if k != "hidden_act"})
    return base


class GGUFTensors(Mapping):
    """Hugging Face name -> float32 tensor over a GGUF file, dequantised on access."""

    def __init__(self, reader: GGUFFile, config: dict[str, Any], path: Path):
        self._reader, self._cfg, self._path = reader, config, path
        self._gemma3 = config["model_type"] == "gemma3_text"
        block_names = _block_names(config["model_type"])
        self._by_name: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            if t.ggml_type in _INTEGER_TYPES:  # a cast to float would load a different model
                raise InterpError(f"GGUF tensor {t.name!r} in {str(path)!r} has integer ggml_type "
                                  f"{t.ggml_type}; model weights are float or quantised floats.")
            hf = _hf_name(t.name, block_names)
            if hf is None:  # not left to the converter: it ignores some names (inv_freq)
                raise InterpError(f"GGUF file {str(path)!r} has tensor {t.name!r}, which is not "
                                  f"a {config['architectures'][0]} tensor interp knows "
                                  "(token_embd, output_norm, output, blk.N.attn_*/ffn_*/post_*); "
                                  "the file does not match its architecture.")
            if hf in self._by_name:
                raise InterpError(f"GGUF file {str(path)!r} has tensors "
                                  f"{self._by_name[hf].name!r} and {t.name!r}, which are the "
                                  "same weight; a file holds each weight once.")
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
        if self._gemma3:  # no q/k permutation; norms stored as 1 + w
            return gemma3_tensor(key, out)
        heads = None
        if key.endswith("self_attn.q_proj.weight"):
            heads = self._cfg["num_attention_heads"]
        elif key.endswith("self_attn.k_proj.weight"):
            heads = self._cfg["num_key_value_heads"]
        if heads is not None:
            if out.shape[0] % (2 * heads):  # the converter's shape check names the tensor
                return out
            out = reverse_permute(out, heads)
        return out

    def meta(self, key: str) -> torch.Tensor:
        """Tensor ``key``'s shape as a float32 ``meta`` tensor, nothing read or dequantised
        (placement converts one layer at a time with the others standing in as these)."""
        return torch.empty(tuple(reversed(self._by_name[key].dims)), device="meta")

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


def metadata_tokenizer(reader: GGUFFile) -> Any:
    """The tokenizer described by already-parsed metadata, built by transformers' GGUF
    converters: the route for a file shipped in pieces, which transformers cannot open.

    The key renames are transformers' own table (``GGUF_TOKENIZER_MAPPING``); the BOS default of
    a SentencePiece vocabulary and the special tokens follow ``get_gguf_tokenizer``, so the
    tokenizer equals the one built from the assembled file (tests/test_gemma3_real.py)."""
    try:
        from transformers import PreTrainedTokenizerFast

        try:  # transformers 5
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_TOKENIZER_MAPPING,
                convert_gguf_tokenizer,
            )
        except ImportError:  # transformers 4.x kept them in integrations.ggml
            from transformers.integrations.ggml import (  # type: ignore[no-redef]
                GGUF_TOKENIZER_MAPPING,
                convert_gguf_tokenizer,
            )
    except ImportError:
        raise InterpError(f"Building the tokenizer of {str(reader.path)!r} (a GGUF in pieces) "
                          "needs transformers with GGUF support: pip install -U transformers"
                          ) from None
    meta = reader.metadata
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = groups["tokenizer"], groups["tokenizer_config"]
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    tokens = tok_dict.get("tokens") or []
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        tid = meta.get(f"tokenizer.ggml.{key}")
        ok = isinstance(tid, int) and 0 <= tid < len(tokens)
        meta_check(reader, tid is None or ok, f"key 'tokenizer.ggml.{key}' ({tid!r}) is not a "
                   "token id of 'tokenizer.ggml.tokens'")
        tok_config[name] = tokens[tid] if ok else None
    try:
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InterpError(f"Cannot build the tokenizer stored in {str(reader.path)!r}: {msg}"
                          ) from None


FileKey = tuple[tuple[str, int, int], ...]  # (path, mtime_ns, size) per piece


def _file_key(paths: tuple[Path, ...]) -> FileKey:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(p.resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _header(key: FileKey) -> GGUFFile:
    """The parsed header, cached per (path, mtime, size) of each piece: parsing SmolLM2's
    49k-entry vocabulary takes ~0.5 s and analyses load the same built-in many times."""
    paths = tuple(Path(k[0]) for k in key)
    return open_gguf(paths[0], parts=paths if len(paths) > 1 else ())


@functools.lru_cache(maxsize=4)
def _tokenizer_state(key: FileKey) -> tuple[str, dict[str, Any]]:
    """The GGUF tokenizer as (tokenizer.json text, special tokens), cached: building it from the
    metadata takes seconds, rebuilding from the JSON a fraction of one, and every model gets its
    own tokenizer object (padding_side and friends are mutable)."""
    tok = gguf_tokenizer(Path(key[0][0])) if len(key) == 1 else metadata_tokenizer(_header(key))
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template")
    special = {k: getattr(tok, k, None) for k in keys if getattr(tok, k, None) is not None}
    return tok.backend_tokenizer.to_str(), special


def load_gguf(path: Path, fields: dict[str, Any], *, device: Any = None,
              dtype: torch.dtype | None = None, parts: tuple[Path, ...] = ()) -> Any:
    """A GGUF file as a model with its tokenizer (``model.prepend_bos`` follows the file's
    ``tokenizer.ggml.add_bos_token``: SmolLM2's BOS is a chat marker, not a start of text;
    Gemma 3's is the start of every text). ``parts``: the file's pieces, read as one file
    (``path`` is then the first piece and names the model).

    Weights are dequantised on every load (about 1 s for SmolLM2) rather than cached: a cache
    would hold a second float32 copy of the model for the life of the process."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from interp.loading._common import apply_overrides, assemble, naming, one_line
    from interp.loading.families import get_family
    from interp.loading.placement import placed

    path = Path(path)
    key = _file_key(tuple(Path(p) for p in parts) or (path,))
    reader = _header(key)
    hf = hf_config_dict(reader)
    fam = get_family(hf["model_type"])
    with naming(path, "GGUF file"):
        try:
            cfg = fam.config_from_hf(hf)
        except (ValueError, TypeError) as e:  # checked keys make this a last resort
            if isinstance(e, InterpError):
                raise
            raise InterpError(f"its metadata does not give a valid model: {one_line(str(e))}"
                              ) from None
    cfg = dataclasses.replace(cfg, extra={**cfg.extra, "source": str(path)})
    cfg = apply_overrides(cfg, fields)
    with naming(path, "GGUF file"):
        tok_json, special = _tokenizer_state(key)
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json), **special)
        adds_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True))
        tensors = GGUFTensors(reader, hf, path)
        model = placed(cfg, fam.convert_state_dict, tensors, tokenizer=tok, dtype=dtype,
                       source=f"GGUF file {path.name!r}", adds_bos=adds_bos)
        if model is not None:  # loaded layer by layer into load_pretrained's device map
            return model
        try:
            sd = fam.convert_state_dict(tensors, cfg)
        except InterpError as e:
            raise InterpError(_gguf_names(str(e), _block_names(hf["model_type"]))) from None
        model = assemble(cfg, sd, tokenizer=tok, device=device, dtype=dtype,
                         source=f"GGUF file {path.name!r}", adds_bos=adds_bos)
    return model
