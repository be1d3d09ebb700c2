"""Valid small model files and the ways the fuzz suite damages them (tests/test_fuzz_loading.py).

The originals: a tiny Llama (and GPT-2) Hugging Face folder (``save_pretrained``: config.json +
model.safetensors), the same Llama as a GGUF file (``gguf.GGUFWriter``, with the keys and tensor
names interp reads), an interp ``.pt`` checkpoint and a ModelConfig ``.json``. For each format:
a writer that applies one mutation (a tuple drawn from the format's strategy, so that a failing
case prints as data and known-bad cases can be given as ``@example``), and the strategies.
The GGUF file is edited through the test's own small reader and writer (:class:`GGDoc`), which
reproduce the GGUFWriter file byte for byte.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

import interp

_ids = itertools.count()

# JSON values of every kind, some absurd (huge integers, NaN, deep containers)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.integers(-3, 40) | st.floats()
    | st.text(max_size=4),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6)


class Originals:
    """The valid files the cases start from (kind -> path) and the models they load to."""

    def __init__(self, tmp: Path, files: dict[str, Path], models: dict[str, Any]):
        self.tmp, self.files, self.models = tmp, files, models

    def __repr__(self) -> str:  # hypothesis prints it with every failing example
        return f"Originals({str(self.tmp)!r})"


def llama_hf() -> Any:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def write_gguf(hf: Any, path: Path, add_bos: bool = False) -> None:
    """The Llama as llama.cpp would write it: GGUF names, q/k rows permuted (the inverse of
    ``interp.loading.gguf.reverse_permute``), F32 tensors, a small byte-level BPE vocabulary."""
    from gguf import GGUFWriter

    from interp.loading.gguf import BLOCK_NAMES, TOP_NAMES

    def permute(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = GGUFWriter(str(path), "llama")
    w.add_custom_alignment(32)
    w.add_block_count(2), w.add_context_length(32), w.add_embedding_length(16)
    w.add_feed_forward_length(24), w.add_head_count(4), w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(40)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default")
    merges = ["t h", "h e", "i n", "e r", "a n", "r e", "o n", "a t", "e n", "n d", "Ġ t"]
    tokens = ["<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", *(m.replace(" ", "")
                                                                    for m in merges)]
    tokens += [f"<x{i}>" for i in range(40 - len(tokens))]
    w.add_token_list(tokens), w.add_token_types([3] + [1] * 39), w.add_token_merges(merges)
    w.add_bos_token_id(0), w.add_eos_token_id(0), w.add_add_bos_token(add_bos)
    hf_to_gguf = {v: k for k, v in TOP_NAMES.items()}
    for k, v in hf.state_dict().items():
        if k not in hf_to_gguf:
            _, _, i, rest = k.split(".", 3)
            hf_to_gguf[k] = f"blk.{i}." + {b: a for a, b in BLOCK_NAMES.items()}[rest]
            v = permute(v, 4) if "q_proj" in k else permute(v, 2) if "k_proj" in k else v
        w.add_tensor(hf_to_gguf[k], v.float().numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def copy_folder(orig: Originals, kind: str) -> Path:
    dst = orig.tmp / f"{kind}{next(_ids)}"
    shutil.copytree(orig.files[kind], dst)
    return dst


def new_file(orig: Originals, kind: str, data: bytes) -> Path:
    path = orig.tmp / f"case{next(_ids)}{orig.files[kind].suffix}"
    path.write_bytes(data)
    return path


def flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
def st_parts(folder: Path) -> tuple[dict[str, Any], bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(orig: Originals, mutation: tuple) -> Path:
    """A copy of the Llama folder whose model.safetensors has ``mutation`` applied."""
    header, data = st_parts(orig.files["llama"])
    names = sorted(k for k in header if k != "__metadata__")
    h = json.loads(json.dumps(header))
    kind, *args = mutation
    name = None
    if kind in ("set", "drop", "entry", "del", "dup"):
        name = args[0] if isinstance(args[0], str) else names[args[0] % len(names)]
    raw, length = None, None
    if kind == "set":
        h[name][args[1]] = args[2]
    elif kind == "drop":
        del h[name][args[1]]
    elif kind == "entry":
        h[name] = args[1]
    elif kind == "del":
        del h[name]
    elif kind == "add":
        h[args[0]] = args[1]
    elif kind == "header":
        h = args[0]
    elif kind == "meta":
        h["__metadata__"] = args[0]
    elif kind == "length":
        length = args[0]
    elif kind == "append":
        data += args[0]
    elif kind == "pad":  # the format allows trailing spaces: loads the same model
        raw = json.dumps(h).encode() + b" " * args[0]
    elif kind == "reorder":  # key order carries no meaning: loads the same model
        items = list(h.items())
        random.Random(args[0]).shuffle(items)
        h = dict(items)
    elif kind == "dup":  # a repeated key (the format forbids it)
        raw = (json.dumps(h)[:-1] + f", {json.dumps(name)}: {json.dumps(h[name])}}}").encode()
    hb = raw if raw is not None else json.dumps(h).encode()
    folder = copy_folder(orig, "llama")
    n = len(hb) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + hb + data)
    return folder


_ST_VALUES = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "U32", "F64", "U8", "BOOL", "F8_E4M3",
                              "F4", "f32", ""]) | JSON,
    "shape": st.lists(st.integers(-3, 64), max_size=4) | JSON,
    "data_offsets": st.lists(st.integers(-70_000, 70_000), max_size=3) | JSON,
}
INDEX = st.integers(0, 99)
_FIELD = st.sampled_from(sorted(_ST_VALUES))
_ENTRY = st.fixed_dictionaries({"dtype": _ST_VALUES["dtype"], "shape": _ST_VALUES["shape"],
                                "data_offsets": _ST_VALUES["data_offsets"]})
ST_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), INDEX, _FIELD).flatmap(
        lambda t: st.tuples(*map(st.just, t), _ST_VALUES[t[2]])),
    st.tuples(st.just("drop"), INDEX, _FIELD),
    st.tuples(st.just("entry"), INDEX, JSON | _ENTRY),
    st.tuples(st.just("del"), INDEX),
    st.tuples(st.just("add"), st.text(max_size=8), JSON | _ENTRY),
    st.tuples(st.just("header"), JSON),
    st.tuples(st.just("meta"), JSON),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | st.integers(0, 20_000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("pad"), st.integers(0, 64)),
    st.tuples(st.just("reorder"), st.integers(0, 2**32)),
    st.tuples(st.just("dup"), INDEX),
)




# ---------------------------------------------------------------------------------------------
# GGUF: the test's own reader and writer of the files it makes (ggml's docs/gguf.md)
# ---------------------------------------------------------------------------------------------
_GG = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
       11: "<q", 12: "<d"}


class GGDoc:
    """A GGUF file this module wrote, as editable parts: ``kv`` ([key, type, value]),
    ``tensors`` ([name, dims, ggml_type, offset]), ``data`` (from the aligned data start), and
    ``structure``: the byte ranges that are format (lengths, types, counts, tensor infos, the
    alignment) rather than values, where a flipped bit must never give a different model."""

    def __init__(self, raw: bytes):
        self.raw, self.pos, self.structure = raw, 24, [(0, 24)]
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
        self.kv = []
        for _ in range(n_kv):
            key = self._str()
            vtype = self._u("<I", structural=True)
            start = self.pos
            self.kv.append([key, vtype, self._val(vtype)])
            if key == "general.alignment":
                self.structure.append((start, self.pos))
        self.tensors = []
        for _ in range(n_tensors):
            start = self.pos
            name, n_dims = self._str(), self._u("<I")
            dims = [self._u("<Q") for _ in range(n_dims)]
            self.tensors.append([name, dims, self._u("<I"), self._u("<Q")])
            self.structure.append((start, self.pos))
        data_start = -(-self.pos // 32) * 32
        self.structure.append((self.pos, data_start))  # padding
        self.data = raw[data_start:]

    def _u(self, fmt: str, structural: bool = False) -> Any:
        v = struct.unpack_from(fmt, self.raw, self.pos)[0]
        if structural:
            self.structure.append((self.pos, self.pos + struct.calcsize(fmt)))
        self.pos += struct.calcsize(fmt)
        return v

    def _str(self) -> str:
        n = self._u("<Q", structural=True)
        self.pos += n
        return self.raw[self.pos - n:self.pos].decode()

    def _val(self, vtype: int) -> Any:
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype, n = self._u("<I", structural=True), self._u("<Q", structural=True)
            return (etype, [self._val(etype) for _ in range(n)])
        return self._u(_GG[vtype])

    def write(self, counts: tuple[int, int] | None = None) -> bytes:
        counts = counts or (len(self.tensors), len(self.kv))
        out = bytearray(b"GGUF" + struct.pack("<IQQ", self.version, *counts))
        for key, vtype, value in self.kv:
            out += _gg_str(key) + struct.pack("<I", vtype) + _gg_val(vtype, value)
        for name, dims, ggml_type, offset in self.tensors:
            out += _gg_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type,
                                               offset)
        return bytes(out + bytes(-len(out) % 32)) + self.data


def _gg_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def _gg_val(vtype: int, value: Any) -> bytes:
    if isinstance(value, bytes):  # already encoded (deep nesting, unknown types)
        return value
    if vtype == 8:
        return _gg_str(value)
    if vtype == 9:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_gg_val(etype, x) for x in items)
    return struct.pack(_GG[vtype], value)


def nested(depth: int) -> bytes:
    """An array value nested ``depth`` deep: [[[...[]...]]]."""
    return struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)


GG_INT_KEYS = ("general.alignment", "llama.block_count", "llama.context_length",
               "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
               "llama.attention.head_count_kv", "llama.attention.key_length",
               "llama.attention.value_length", "llama.rope.dimension_count", "llama.vocab_size")
GG_FLOAT_KEYS = ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon")
GG_KEYS = (*GG_INT_KEYS, *GG_FLOAT_KEYS, "general.architecture", "llama.rope.scaling.type",
           "llama.expert_count", "tokenizer.ggml.tokens", "tokenizer.ggml.add_bos_token",
           "tokenizer.ggml.model", "tokenizer.ggml.merges")
GG_VALUES = st.one_of(
    st.tuples(st.just(4), st.integers(0, 2**32 - 1) | st.integers(0, 64)),
    st.tuples(st.just(5), st.integers(-2**31, 2**31 - 1)),
    st.tuples(st.just(10), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(0), st.integers(0, 255)),
    st.tuples(st.just(6), st.floats(width=32)),
    st.tuples(st.just(12), st.floats()),
    st.tuples(st.just(7), st.integers(0, 255)),
    st.tuples(st.just(8), st.text(max_size=6)),
    st.tuples(st.just(9), st.tuples(st.just(8), st.lists(st.text(max_size=3), max_size=4))),
    st.tuples(st.just(9), st.tuples(st.just(4), st.lists(st.integers(0, 2**32 - 1), max_size=4))),
    st.tuples(st.just(9), st.integers(1, 3000).map(nested)),
    st.tuples(st.integers(13, 2**32 - 1), st.just(b"")),
)


def gg_case(orig: Originals, edit: Any) -> Path:
    doc = GGDoc(orig.files["gguf"].read_bytes())
    counts = edit(doc)
    return new_file(orig, "gguf", doc.write(counts))


def set_kv(doc: GGDoc, key: str, vtype: int, value: Any) -> None:
    for entry in doc.kv:
        if entry[0] == key:
            entry[1:] = [vtype, value]
            return
    doc.kv.append([key, vtype, value])


GG_TENSOR_VALUES = {
    "name": st.text(max_size=8) | st.sampled_from(["output.weight", "blk.0.attn_q.weight",
                                                   "blk.00.attn_k.weight", "blk.9.ffn_up.weight",
                                                   "blk.0", "x.rotary_emb.inv_freq"]),
    "dims": st.lists(st.integers(0, 64) | st.integers(0, 2**64 - 1), max_size=6),
    "type": st.integers(0, 41) | st.integers(0, 2**32 - 1),
    "offset": st.integers(0, 20_000) | st.integers(0, 2**64 - 1),
}
GG_STRUCTURE = st.one_of(
    st.tuples(st.just("tensor"), INDEX, st.sampled_from(sorted(GG_TENSOR_VALUES))).flatmap(
        lambda t: st.tuples(*map(st.just, t), GG_TENSOR_VALUES[t[2]])),
    st.tuples(st.just("drop_tensor"), INDEX),
    st.tuples(st.just("del_kv"), st.sampled_from(GG_KEYS)),
    st.tuples(st.just("dup_kv"), st.sampled_from(GG_KEYS)),
    st.tuples(st.just("counts"), st.integers(0, 2**64 - 1) | st.integers(0, 60),
              st.integers(0, 2**64 - 1) | st.integers(0, 60)),
    st.tuples(st.just("version"), st.integers(0, 2**32 - 1) | st.integers(0, 4)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def gg_structure(doc: GGDoc, m: tuple) -> tuple[int, int] | None:
    kind, *args = m
    if kind == "tensor":
        doc.tensors[args[0] % len(doc.tensors)][["name", "dims", "type", "offset"].index(args[1])
                                                ] = args[2]
    elif kind == "drop_tensor":
        del doc.tensors[args[0] % len(doc.tensors)]
    elif kind == "del_kv":
        doc.kv = [e for e in doc.kv if e[0] != args[0]]
    elif kind == "dup_kv":
        doc.kv += [e for e in doc.kv if e[0] == args[0]]
    elif kind == "counts":
        return (args[0], args[1])
    elif kind == "version":
        doc.version = args[0]
    elif kind == "append":
        doc.data += args[0]
    return None




# ---------------------------------------------------------------------------------------------
# interp .pt checkpoints
# ---------------------------------------------------------------------------------------------
def pt_payload(orig: Originals) -> dict[str, Any]:
    return torch.load(orig.files["pt"], weights_only=True)


def pt_case(orig: Originals, payload: Any, **save: Any) -> Path:
    path = orig.tmp / f"case{next(_ids)}.pt"
    torch.save(payload, path, **save)
    return path


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 40) | st.floats()
    | st.text(max_size=4) | st.builds(torch.zeros, st.integers(0, 3)),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=5)
CONFIG_FIELDS = sorted(interp.ModelConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=4,
                                           n_ctx=4).to_dict())
_TOKENIZERS = st.one_of(
    PLAIN,
    st.fixed_dictionaries({"kind": st.sampled_from(["words", "hf_json", "wordpiece", "bytes",
                                                    "gpt2", "nope"])}, optional={
        "tokens": PLAIN | st.lists(st.text(max_size=3), max_size=4), "json": PLAIN,
        "vocab": PLAIN, "special": PLAIN, "bos_token": PLAIN, "padding_side": PLAIN}),
)
PT_MUTATIONS = st.one_of(
    st.tuples(st.just("top"), PLAIN),
    st.tuples(st.sampled_from(["config", "state_dict", "tokenizer", "metadata", "format",
                               "version"]), PLAIN),
    st.tuples(st.just("tokenizer"), _TOKENIZERS),
    st.tuples(st.just("cfg"), st.sampled_from(CONFIG_FIELDS), PLAIN),
    st.tuples(st.just("sd"), INDEX, PLAIN | st.builds(torch.ones, st.integers(0, 17),
                                                        dtype=st.just(torch.int32))),
    st.tuples(st.just("sd_key"), INDEX, st.integers() | st.text(max_size=8)),
    st.tuples(st.just("sd_del"), INDEX),
)


def pt_mutate(payload: dict[str, Any], m: tuple) -> Any:
    kind, *args = m
    sd = payload["state_dict"]
    key = sorted(sd)[args[0] % len(sd)] if kind.startswith("sd") else None
    if kind == "top":
        return args[0]
    if kind == "cfg":
        payload["config"][args[0]] = args[1]
    elif kind == "sd":
        sd[key] = args[1]
    elif kind == "sd_key":
        sd[args[1]] = sd.pop(key)
    elif kind == "sd_del":
        del sd[key]
    else:
        payload[kind] = args[0]
    return payload




# ---------------------------------------------------------------------------------------------
# config.json and ModelConfig .json files
# ---------------------------------------------------------------------------------------------
HF_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
           "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "hidden_act", "model_type",
           "architectures", "attention_bias", "sliding_window", "torch_dtype", "bos_token_id",
           "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "layer_norm_epsilon",
           "activation_function", "scale_attn_weights", "initializer_range", "use_cache")
HF_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(HF_KEYS), JSON | st.just("abc")),
    st.tuples(st.just("del"), st.sampled_from(HF_KEYS)),
    st.tuples(st.just("whole"), JSON),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
)


def json_text(raw: str, m: tuple) -> bytes:
    kind, *args = m
    if kind == "cut":
        return raw.encode()[:int(len(raw) * args[0])]
    if kind == "flip":
        return flip(raw.encode(), args[0] % len(raw), args[1])
    d = json.loads(raw)
    if kind == "set":
        d[args[0]] = args[1]
    elif kind == "del":
        d.pop(args[0], None)
    else:
        d = args[0]
    return json.dumps(d).encode()


MC_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CONFIG_FIELDS),
              JSON.filter(lambda v: not isinstance(v, int) or -3 <= v <= 64)),
    st.tuples(st.just("del"), st.sampled_from(CONFIG_FIELDS)),
    st.tuples(st.just("whole"), JSON),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
)
