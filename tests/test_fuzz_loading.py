"""Crafted containers (issue 24): every load gives the original model or one clear line.

Each case starts from a small valid file this module writes: a tiny Llama (and GPT-2) Hugging
Face folder (``save_pretrained``: config.json + model.safetensors), the same Llama as a GGUF file
(``gguf.GGUFWriter``, with the keys and tensor names interp reads), an interp ``.pt`` checkpoint
(:func:`interp.save_checkpoint`) and a ModelConfig ``.json``. It then truncates the file, flips
a bit, or crafts a header or field, and loads the result. The contract: the load gives a model
equal to the original (every state_dict tensor, dtype included, and the config), or raises
:class:`InterpError` whose message is one line naming the file; never another exception, never
a silently different model.

What no loader can promise, and the strategies therefore leave out: bytes that are *values*
rather than structure (tensor data, a GGUF float such as ``rope.freq_base``, a key's spelling,
pickled numbers). None of these formats carries a checksum, so a changed value there is simply
another valid file. Where a mutation sets a value that may be valid (a config.json field, a
GGUF key of the right type), a load may change the config but must keep every weight.

Runs derandomized (a fixed sequence of examples per test) with no deadline, in under a minute
on two cores.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import interp
from interp.errors import InterpError
from interp.loading import load_pretrained, save_checkpoint

torch.set_num_threads(1)

FUZZ = settings(max_examples=250, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
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


def _llama_hf() -> Any:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _write_gguf(hf: Any, path: Path) -> None:
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
    w.add_bos_token_id(0), w.add_eos_token_id(0), w.add_add_bos_token(False)
    hf_to_gguf = {v: k for k, v in TOP_NAMES.items()}
    for k, v in hf.state_dict().items():
        if k not in hf_to_gguf:
            _, _, i, rest = k.split(".", 3)
            hf_to_gguf[k] = f"blk.{i}." + {b: a for a, b in BLOCK_NAMES.items()}[rest]
            v = permute(v, 4) if "q_proj" in k else permute(v, 2) if "k_proj" in k else v
        w.add_tensor(hf_to_gguf[k], v.float().numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture(scope="module")
def orig(tmp_path_factory: pytest.TempPathFactory) -> Originals:
    import transformers

    from interp.tokenizers import WordTokenizer

    transformers.logging.set_verbosity_error()
    tmp = tmp_path_factory.mktemp("fuzz")
    hf = _llama_hf()
    hf.save_pretrained(tmp / "llama")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=32)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp / "gpt2")
    _write_gguf(hf, tmp / "llama.gguf")
    cfg = interp.ModelConfig(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_vocab=6, n_ctx=16,
                             act="swiglu", norm="rmsnorm", positional="rope", tie_embeddings=True)
    torch.manual_seed(0)
    tok = WordTokenizer(["<bos>", "a", "b", "c", "d", "e"])
    save_checkpoint(interp.HookedTransformer(cfg, tokenizer=tok), tmp / "m.pt", step=3)
    (tmp / "m.json").write_text(json.dumps(cfg.to_dict()))
    files = {"llama": tmp / "llama", "gpt2": tmp / "gpt2", "gguf": tmp / "llama.gguf",
             "pt": tmp / "m.pt", "json": tmp / "m.json"}
    models = {k: _load(p) for k, p in files.items()}
    x = torch.randint(0, 40, (1, 7))
    with torch.no_grad():  # the originals are the real thing: GGUF and folder match transformers
        assert torch.allclose(models["gguf"](x), hf(x).logits, atol=1e-5)
        assert torch.allclose(models["llama"](x), hf(x).logits, atol=1e-5)
    return Originals(tmp, files, models)


def _load(path: Path) -> Any:
    return load_pretrained(path, seed=0) if path.suffix == ".json" else load_pretrained(path)


def _plain_cfg(model: Any, leave_out: str | None = None) -> dict[str, Any]:
    d = model.cfg.to_dict()
    d["extra"] = {k: v for k, v in d["extra"].items() if k != "source"}
    return {k: v for k, v in d.items() if k != leave_out}


def _same_weights(a: Any, b: Any) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"tensor {k} differs"


def _check(path: Path, original: Any, *, may_load: bool = True, config: str = "same",
           name: str | None = None) -> Any:
    """Load ``path``: an InterpError naming it (and ``name``, if given), or, if ``may_load``, a
    model equal to ``original``. ``config``: ``"same"``, ``"any"`` (a value was legitimately
    changed: weights must still match), ``"random"`` (a .json: random weights, config checked
    only by ModelConfig) or a field name (the config may differ in that field only). Returns
    the model, or None after an error."""
    try:
        model = _load(path)
    except InterpError as e:
        _remove(path)
        msg = str(e)
        if currently_in_test_context():  # --hypothesis-show-statistics counts the outcomes
            event("error: " + re.sub(r"'[^']*'|\d+", "_", msg)[:70])
        assert str(path) in msg, f"the message does not name {path}: {msg}"
        assert "\n" not in msg and "weights_only=False" not in msg, msg
        assert name is None or name in msg, f"the message does not name {name!r}: {msg}"
        return None
    _remove(path)
    if currently_in_test_context():
        event("loaded")
    assert may_load, f"{path} loaded, but it must not"
    assert name is None, f"{path} loaded, but it must fail naming {name!r}"
    if config == "random":
        return model
    if config != "any":
        leave_out = None if config == "same" else config
        assert _plain_cfg(model, leave_out) == _plain_cfg(original, leave_out)
        assert getattr(model, "prepend_bos", None) == getattr(original, "prepend_bos", None)
    _same_weights(model, original)
    return model


def _remove(path: Path) -> None:
    """Delete a case once checked (thousands of cases would otherwise fill the temp folder)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _copy_folder(orig: Originals, kind: str) -> Path:
    dst = orig.tmp / f"{kind}{next(_ids)}"
    shutil.copytree(orig.files[kind], dst)
    return dst


def _new_file(orig: Originals, kind: str, data: bytes) -> Path:
    path = orig.tmp / f"case{next(_ids)}{orig.files[kind].suffix}"
    path.write_bytes(data)
    return path


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
def _st_parts(folder: Path) -> tuple[dict[str, Any], bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(orig: Originals, mutation: tuple) -> Path:
    """A copy of the Llama folder whose model.safetensors has ``mutation`` applied."""
    header, data = _st_parts(orig.files["llama"])
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
    folder = _copy_folder(orig, "llama")
    n = len(hb) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + hb + data)
    return folder


_ST_VALUES = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "U32", "F64", "U8", "BOOL", "F8_E4M3",
                              "F4", "f32", ""]) | JSON,
    "shape": st.lists(st.integers(-3, 64), max_size=4) | JSON,
    "data_offsets": st.lists(st.integers(-70_000, 70_000), max_size=3) | JSON,
}
_INDEX = st.integers(0, 99)
_FIELD = st.sampled_from(sorted(_ST_VALUES))
_ENTRY = st.fixed_dictionaries({"dtype": _ST_VALUES["dtype"], "shape": _ST_VALUES["shape"],
                                "data_offsets": _ST_VALUES["data_offsets"]})
ST_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), _INDEX, _FIELD).flatmap(
        lambda t: st.tuples(*map(st.just, t), _ST_VALUES[t[2]])),
    st.tuples(st.just("drop"), _INDEX, _FIELD),
    st.tuples(st.just("entry"), _INDEX, JSON | _ENTRY),
    st.tuples(st.just("del"), _INDEX),
    st.tuples(st.just("add"), st.text(max_size=8), JSON | _ENTRY),
    st.tuples(st.just("header"), JSON),
    st.tuples(st.just("meta"), JSON),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | st.integers(0, 20_000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("pad"), st.integers(0, 64)),
    st.tuples(st.just("reorder"), st.integers(0, 2**32)),
    st.tuples(st.just("dup"), _INDEX),
)


@FUZZ
@given(ST_MUTATIONS)
@example(("set", "model.norm.weight", "data_offsets", [-64, 0]))  # read the header as weights
@example(("header", [1, 2]))  # a JSON array: TypeError
@example(("set", "model.norm.weight", "shape", [-4, -4]))  # a negative shape: RuntimeError
@example(("set", "model.norm.weight", "dtype", "I32"))  # integers into a float weight
@example(("pad", 7))
def test_crafted_safetensors_header(orig: Originals, mutation: tuple) -> None:
    folder = _st_write(orig, mutation)
    _check(folder, orig.models["llama"])


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 7))
def test_safetensors_header_bit_flips(orig: Originals, pos: int, bit: int) -> None:
    raw = (orig.files["llama"] / "model.safetensors").read_bytes()
    folder = _copy_folder(orig, "llama")
    (n,) = struct.unpack("<Q", raw[:8])
    (folder / "model.safetensors").write_bytes(_flip(raw, pos % (8 + n), bit))
    _check(folder, orig.models["llama"])


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_safetensors(orig: Originals, frac: float) -> None:
    raw = (orig.files["llama"] / "model.safetensors").read_bytes()
    folder = _copy_folder(orig, "llama")
    (folder / "model.safetensors").write_bytes(raw[:int(len(raw) * frac)])
    _check(folder, orig.models["llama"], may_load=False)


# ---------------------------------------------------------------------------------------------
# GGUF: the test's own reader and writer of the files it makes (ggml's docs/gguf.md)
# ---------------------------------------------------------------------------------------------
_GG = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
       11: "<q", 12: "<d"}


class _GGDoc:
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


def _nested(depth: int) -> bytes:
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
    st.tuples(st.just(9), st.integers(1, 3000).map(_nested)),
    st.tuples(st.integers(13, 2**32 - 1), st.just(b"")),
)


def _gg_case(orig: Originals, edit: Any) -> Path:
    doc = _GGDoc(orig.files["gguf"].read_bytes())
    counts = edit(doc)
    return _new_file(orig, "gguf", doc.write(counts))


def _set_kv(doc: _GGDoc, key: str, vtype: int, value: Any) -> None:
    for entry in doc.kv:
        if entry[0] == key:
            entry[1:] = [vtype, value]
            return
    doc.kv.append([key, vtype, value])


@FUZZ
@given(st.sampled_from(GG_KEYS), GG_VALUES)
@example("general.alignment", (4, 0))  # ZeroDivisionError
@example("general.alignment", (4, 48))
@example("llama.attention.head_count", (4, 0))  # ZeroDivisionError
@example("tokenizer.ggml.tokens", (9, _nested(5000)))  # RecursionError
@example("llama.context_length", (8, "32"))  # a string where the spec says uint64
def test_crafted_gguf_metadata(orig: Originals, key: str, typed: tuple[int, Any]) -> None:
    vtype, value = typed
    path = _gg_case(orig, lambda doc: _set_kv(doc, key, vtype, value))
    wrong_type = ((key in GG_INT_KEYS and vtype not in (0, 1, 2, 3, 4, 5, 10, 11))
                  or (key in GG_FLOAT_KEYS and vtype not in (6, 12)))
    # a key set to a valid value of its type is another model: its weights must still match
    _check(path, orig.models["gguf"], config="any", name=key if wrong_type else None)


GG_TENSOR_VALUES = {
    "name": st.text(max_size=8) | st.sampled_from(["output.weight", "blk.0.attn_q.weight",
                                                   "blk.00.attn_k.weight", "blk.9.ffn_up.weight",
                                                   "blk.0", "x.rotary_emb.inv_freq"]),
    "dims": st.lists(st.integers(0, 64) | st.integers(0, 2**64 - 1), max_size=6),
    "type": st.integers(0, 41) | st.integers(0, 2**32 - 1),
    "offset": st.integers(0, 20_000) | st.integers(0, 2**64 - 1),
}
GG_STRUCTURE = st.one_of(
    st.tuples(st.just("tensor"), _INDEX, st.sampled_from(sorted(GG_TENSOR_VALUES))).flatmap(
        lambda t: st.tuples(*map(st.just, t), GG_TENSOR_VALUES[t[2]])),
    st.tuples(st.just("drop_tensor"), _INDEX),
    st.tuples(st.just("del_kv"), st.sampled_from(GG_KEYS)),
    st.tuples(st.just("dup_kv"), st.sampled_from(GG_KEYS)),
    st.tuples(st.just("counts"), st.integers(0, 2**64 - 1) | st.integers(0, 60),
              st.integers(0, 2**64 - 1) | st.integers(0, 60)),
    st.tuples(st.just("version"), st.integers(0, 2**32 - 1) | st.integers(0, 4)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def _gg_structure(doc: _GGDoc, m: tuple) -> tuple[int, int] | None:
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


@FUZZ
@given(GG_STRUCTURE)
@example(("tensor", 0, "offset", 7))  # misaligned
@example(("tensor", 3, "dims", [16, 2**62]))  # far past the end
@example(("tensor", 3, "type", 26))  # I32: same size as F32, integers
@example(("tensor", 0, "name", "x.rotary_emb.inv_freq"))  # a name the converter ignores
@example(("del_kv", "llama.attention.layer_norm_rms_epsilon"))  # required by the spec
def test_crafted_gguf_structure(orig: Originals, mutation: tuple) -> None:
    path = _gg_case(orig, lambda doc: _gg_structure(doc, mutation))
    # without an optional key its default applies: another valid file, with the same weights
    _check(path, orig.models["gguf"], config="any" if mutation[0] == "del_kv" else "same")


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 7))
def test_gguf_structure_bit_flips(orig: Originals, pick: int, bit: int) -> None:
    raw = orig.files["gguf"].read_bytes()
    positions = sorted({p for a, b in _GGDoc(raw).structure for p in range(a, b)})
    _check(_new_file(orig, "gguf", _flip(raw, positions[pick % len(positions)], bit)),
           orig.models["gguf"])


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_gguf(orig: Originals, frac: float) -> None:
    raw = orig.files["gguf"].read_bytes()
    _check(_new_file(orig, "gguf", raw[:int(len(raw) * frac)]), orig.models["gguf"],
           may_load=False)


def test_gguf_writer_round_trip(orig: Originals) -> None:
    """The test's GGUF writer reproduces the GGUFWriter file byte for byte (so its cases are
    that file with one thing changed)."""
    raw = orig.files["gguf"].read_bytes()
    assert _GGDoc(raw).write() == raw


# ---------------------------------------------------------------------------------------------
# interp .pt checkpoints
# ---------------------------------------------------------------------------------------------
def _pt_payload(orig: Originals) -> dict[str, Any]:
    return torch.load(orig.files["pt"], weights_only=True)


def _pt_case(orig: Originals, payload: Any, **save: Any) -> Path:
    path = orig.tmp / f"case{next(_ids)}.pt"
    torch.save(payload, path, **save)
    return path


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 40) | st.floats()
    | st.text(max_size=4) | st.builds(torch.zeros, st.integers(0, 3)),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=5)
_CONFIG_FIELDS = sorted(interp.ModelConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=4,
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
    st.tuples(st.just("cfg"), st.sampled_from(_CONFIG_FIELDS), PLAIN),
    st.tuples(st.just("sd"), _INDEX, PLAIN | st.builds(torch.ones, st.integers(0, 17),
                                                        dtype=st.just(torch.int32))),
    st.tuples(st.just("sd_key"), _INDEX, st.integers() | st.text(max_size=8)),
    st.tuples(st.just("sd_del"), _INDEX),
)


def _pt_mutate(payload: dict[str, Any], m: tuple) -> Any:
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


@FUZZ
@given(PT_MUTATIONS)
@example(("config", [1, 2]))  # TypeError
@example(("state_dict", [1, 2]))  # TypeError
@example(("tokenizer", {"kind": "hf_json"}))  # KeyError
@example(("tokenizer", {"kind": "words", "tokens": "abcdef"}))  # six one-letter "words"
@example(("cfg", "n_layers", 2**31))  # building 2**31 blocks, even on meta, never ends
@example(("cfg", "norm_eps", "abc"))
def test_crafted_checkpoint(orig: Originals, mutation: tuple) -> None:
    path = _pt_case(orig, _pt_mutate(_pt_payload(orig), mutation))
    field = mutation[1] if mutation[0] == "cfg" else "same"
    _check(path, orig.models["pt"], config=field)


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 7))
def test_checkpoint_bit_flips(orig: Originals, pick: int, bit: int) -> None:
    """Anywhere in the file, tensor bytes and pickled numbers included: torch writes a CRC-32
    per record and interp checks it (torch itself does not), so no flip goes unnoticed."""
    raw = orig.files["pt"].read_bytes()
    _check(_new_file(orig, "pt", _flip(raw, pick % len(raw), bit)), orig.models["pt"])


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_checkpoint(orig: Originals, frac: float) -> None:
    raw = orig.files["pt"].read_bytes()
    _check(_new_file(orig, "pt", raw[:int(len(raw) * frac)]), orig.models["pt"], may_load=False)


def test_legacy_checkpoint_loads_and_pickles_are_refused(orig: Originals) -> None:
    """A legacy (non-zip) .pt cannot be memory-mapped: it is read instead, to the same model.
    A pickle with an object in it is refused without advice to turn the safety off."""
    legacy = _pt_case(orig, _pt_payload(orig), _use_new_zipfile_serialization=False)
    assert _check(legacy, orig.models["pt"]) is not None
    evil = _pt_case(orig, {**_pt_payload(orig), "metadata": {"x": _Evil()}})
    with pytest.raises(InterpError, match=r"cannot be read safely: it holds a pickled Python "
                                          r"object \(print\)") as e:
        load_pretrained(evil)
    assert "weights_only" not in str(e.value) and str(evil) in str(e.value)


def test_checkpoint_record_shifted_by_its_local_header(orig: Originals) -> None:
    """torch finds a record's bytes through its local header; one bit of the extra-field length
    moves a tensor's start by a byte (found by the bit-flip fuzz: values read shifted)."""
    import io
    import zipfile

    raw = orig.files["pt"].read_bytes()
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        record = next(i for i in z.infolist() if i.filename.endswith("data/3"))
    path = _new_file(orig, "pt", _flip(raw, record.header_offset + 28, 0))
    with pytest.raises(InterpError, match=r"corrupt \(record '.*data/3' fails its CRC-32"):
        load_pretrained(path)


class _Evil:
    def __reduce__(self) -> tuple:  # pragma: no cover - never called: weights_only refuses it
        return (print, ("code ran",))


# ---------------------------------------------------------------------------------------------
# config.json (Hugging Face folders) and ModelConfig .json files
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


def _json_text(raw: str, m: tuple) -> bytes:
    kind, *args = m
    if kind == "cut":
        return raw.encode()[:int(len(raw) * args[0])]
    if kind == "flip":
        return _flip(raw.encode(), args[0] % len(raw), args[1])
    d = json.loads(raw)
    if kind == "set":
        d[args[0]] = args[1]
    elif kind == "del":
        d.pop(args[0], None)
    else:
        d = args[0]
    return json.dumps(d).encode()


@FUZZ
@given(st.sampled_from(["llama", "gpt2"]), HF_MUTATIONS)
@example("llama", ("set", "sliding_window", "abc"))  # a bare int() error, no field, no file
@example("llama", ("set", "num_attention_heads", 0))  # ZeroDivisionError
@example("llama", ("set", "num_hidden_layers", 2.5))  # int(2.5) == 2: silently truncated
@example("gpt2", ("set", "n_embd", "16"))
def test_crafted_config_json(orig: Originals, family: str, mutation: tuple) -> None:
    folder = _copy_folder(orig, family)
    cfg_path = folder / "config.json"
    cfg_path.write_bytes(_json_text(cfg_path.read_text(), mutation))
    # a changed value may be a valid other config: the weights must match all the same
    _check(folder, orig.models[family], config="any")


@pytest.mark.parametrize(("field", "value"), [
    ("sliding_window", "abc"), ("num_hidden_layers", 2.5), ("hidden_size", "16"),
    ("rms_norm_eps", "x"), ("tie_word_embeddings", "false"), ("num_attention_heads", 0),
    ("max_position_embeddings", -1), ("num_key_value_heads", True), ("vocab_size", 2**40),
    ("architectures", "LlamaForCausalLM"), ("rope_parameters", [10000.0]),
])
def test_config_json_wrong_type_names_field_and_file(orig: Originals, field: str,
                                                     value: Any) -> None:
    folder = _copy_folder(orig, "llama")
    cfg_path = folder / "config.json"
    cfg_path.write_bytes(_json_text(cfg_path.read_text(), ("set", field, value)))
    with pytest.raises(InterpError) as e:
        load_pretrained(folder)
    assert str(cfg_path) in str(e.value) and repr(field) in str(e.value)


MC_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_CONFIG_FIELDS),
              JSON.filter(lambda v: not isinstance(v, int) or -3 <= v <= 64)),
    st.tuples(st.just("del"), st.sampled_from(_CONFIG_FIELDS)),
    st.tuples(st.just("whole"), JSON),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
)


@FUZZ
@given(MC_MUTATIONS)
@example(("set", "n_layers", "abc"))
@example(("set", "mask", 3))
@example(("whole", [1, 2]))
def test_crafted_model_config_json(orig: Originals, mutation: tuple) -> None:
    """Random weights: only the config is compared (sizes stay small here; the config's own
    property test covers the sizes that cannot be allocated)."""
    path = _new_file(orig, "json", _json_text(orig.files["json"].read_text(), mutation))
    model = _check(path, orig.models["json"], config="random",
                   name=mutation[1] if mutation[:2] == ("set", "n_layers") else None)
    if model is not None and mutation[0] in ("set", "del"):
        assert _plain_cfg(model, mutation[1]) == _plain_cfg(orig.models["json"], mutation[1])


def test_cli_info_prints_one_error_line(orig: Originals) -> None:
    """The command line turns a crafted file into one ``error:`` line and exit code 2."""
    import subprocess
    import sys

    folder = _st_write(orig, ("set", "model.norm.weight", "data_offsets", [-64, 0]))
    run = subprocess.run([sys.executable, "-m", "analyses.app.cli", "info", str(folder)],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "model.norm.weight" in lines[0] and "data_offsets" in lines[0]
