"""Crafted containers (issue 24): every load gives the original model or one clear line.

Each case starts from a small valid file the fixture writes (builders and mutations are in
tests/fuzz_formats.py): a tiny Llama (and GPT-2) Hugging Face folder (``save_pretrained``:
config.json + model.safetensors), the same Llama as a GGUF file (``gguf.GGUFWriter``, with the
keys and tensor names interp reads), an interp ``.pt`` checkpoint
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

import json
import re
import shutil
import struct
import sys
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

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_formats import (  # noqa: E402  (the originals and the mutations)
    GG_FLOAT_KEYS,
    GG_INT_KEYS,
    GG_KEYS,
    GG_STRUCTURE,
    GG_VALUES,
    HF_MUTATIONS,
    MC_MUTATIONS,
    PT_MUTATIONS,
    ST_MUTATIONS,
    GGDoc,
    Originals,
    copy_folder,
    flip,
    gg_case,
    gg_structure,
    json_text,
    llama_hf,
    nested,
    new_file,
    pt_case,
    pt_mutate,
    pt_payload,
    set_kv,
    st_write,
    write_gguf,
)

torch.set_num_threads(1)

FUZZ = settings(max_examples=250, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def orig(tmp_path_factory: pytest.TempPathFactory) -> Originals:
    import transformers

    from interp.tokenizers import WordTokenizer

    transformers.logging.set_verbosity_error()
    tmp = tmp_path_factory.mktemp("fuzz")
    hf = llama_hf()
    hf.save_pretrained(tmp / "llama")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=32)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp / "gpt2")
    write_gguf(hf, tmp / "llama.gguf")
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
        assert len(msg.splitlines()) == 1 and "weights_only=False" not in msg, msg
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


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(ST_MUTATIONS)
@example(("set", "model.norm.weight", "data_offsets", [-64, 0]))  # read the header as weights
@example(("header", [1, 2]))  # a JSON array: TypeError
@example(("set", "model.norm.weight", "shape", [-4, -4]))  # a negative shape: RuntimeError
@example(("set", "model.norm.weight", "dtype", "I32"))  # integers into a float weight
@example(("set", "model.layers.0.mlp.up_proj.weight", "dtype", "I32"))  # ... fused with floats
@example(("pad", 7))
def test_crafted_safetensors_header(orig: Originals, mutation: tuple) -> None:
    folder = st_write(orig, mutation)
    _check(folder, orig.models["llama"])


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 7))
def test_safetensors_header_bit_flips(orig: Originals, pos: int, bit: int) -> None:
    raw = (orig.files["llama"] / "model.safetensors").read_bytes()
    folder = copy_folder(orig, "llama")
    (n,) = struct.unpack("<Q", raw[:8])
    (folder / "model.safetensors").write_bytes(flip(raw, pos % (8 + n), bit))
    _check(folder, orig.models["llama"])


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_safetensors(orig: Originals, frac: float) -> None:
    raw = (orig.files["llama"] / "model.safetensors").read_bytes()
    folder = copy_folder(orig, "llama")
    (folder / "model.safetensors").write_bytes(raw[:int(len(raw) * frac)])
    _check(folder, orig.models["llama"], may_load=False)


# ---------------------------------------------------------------------------------------------
# GGUF: the test's own reader and writer of the files it makes (ggml's docs/gguf.md)
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(st.sampled_from(GG_KEYS), GG_VALUES)
@example("general.alignment", (4, 0))  # ZeroDivisionError
@example("general.alignment", (4, 48))
@example("llama.attention.head_count", (4, 0))  # ZeroDivisionError
@example("tokenizer.ggml.tokens", (9, nested(5000)))  # RecursionError
@example("llama.context_length", (8, "32"))  # a string where the spec says uint64
def test_crafted_gguf_metadata(orig: Originals, key: str, typed: tuple[int, Any]) -> None:
    vtype, value = typed
    path = gg_case(orig, lambda doc: set_kv(doc, key, vtype, value))
    wrong_type = ((key in GG_INT_KEYS and vtype not in (0, 1, 2, 3, 4, 5, 10, 11))
                  or (key in GG_FLOAT_KEYS and vtype not in (6, 12)))
    # a key set to a valid value of its type is another model: its weights must still match
    _check(path, orig.models["gguf"], config="any", name=key if wrong_type else None)


@FUZZ
@given(GG_STRUCTURE)
@example(("tensor", 0, "offset", 7))  # misaligned
@example(("tensor", 3, "dims", [16, 2**62]))  # far past the end
@example(("tensor", 3, "type", 26))  # I32: same size as F32, integers
@example(("tensor", 0, "name", "x.rotary_emb.inv_freq"))  # a name the converter ignores
@example(("tensor", 0, "name", "blk.².attn_q.weight"))  # "²".isdigit(), int("²") fails
@example(("del_kv", "llama.attention.layer_norm_rms_epsilon"))  # required by the spec
def test_crafted_gguf_structure(orig: Originals, mutation: tuple) -> None:
    path = gg_case(orig, lambda doc: gg_structure(doc, mutation))
    # without an optional key its default applies: another valid file, with the same weights
    _check(path, orig.models["gguf"], config="any" if mutation[0] == "del_kv" else "same")


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 7))
def test_gguf_structure_bit_flips(orig: Originals, pick: int, bit: int) -> None:
    raw = orig.files["gguf"].read_bytes()
    positions = sorted({p for a, b in GGDoc(raw).structure for p in range(a, b)})
    _check(new_file(orig, "gguf", flip(raw, positions[pick % len(positions)], bit)),
           orig.models["gguf"])


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_gguf(orig: Originals, frac: float) -> None:
    raw = orig.files["gguf"].read_bytes()
    _check(new_file(orig, "gguf", raw[:int(len(raw) * frac)]), orig.models["gguf"],
           may_load=False)


def test_gguf_writer_round_trip(orig: Originals) -> None:
    """The test's GGUF writer reproduces the GGUFWriter file byte for byte (so its cases are
    that file with one thing changed)."""
    raw = orig.files["gguf"].read_bytes()
    assert GGDoc(raw).write() == raw


# ---------------------------------------------------------------------------------------------
# interp .pt checkpoints
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(PT_MUTATIONS)
@example(("config", [1, 2]))  # TypeError
@example(("state_dict", [1, 2]))  # TypeError
@example(("tokenizer", {"kind": "hf_json"}))  # KeyError
@example(("tokenizer", {"kind": "words", "tokens": "abcdef"}))  # six one-letter "words"
@example(("cfg", "n_layers", 2**31))  # building 2**31 blocks, even on meta, never ends
@example(("cfg", "norm_eps", "abc"))
def test_crafted_checkpoint(orig: Originals, mutation: tuple) -> None:
    path = pt_case(orig, pt_mutate(pt_payload(orig), mutation))
    field = mutation[1] if mutation[0] == "cfg" else "same"
    _check(path, orig.models["pt"], config=field)


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 7))
def test_checkpoint_bit_flips(orig: Originals, pick: int, bit: int) -> None:
    """Anywhere in the file, tensor bytes and pickled numbers included: torch writes a CRC-32
    per record and interp checks it (torch itself does not), so no flip goes unnoticed."""
    raw = orig.files["pt"].read_bytes()
    _check(new_file(orig, "pt", flip(raw, pick % len(raw), bit)), orig.models["pt"])


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_checkpoint(orig: Originals, frac: float) -> None:
    raw = orig.files["pt"].read_bytes()
    _check(new_file(orig, "pt", raw[:int(len(raw) * frac)]), orig.models["pt"], may_load=False)


def test_legacy_checkpoint_loads_and_pickles_are_refused(orig: Originals) -> None:
    """A legacy (non-zip) .pt cannot be memory-mapped: it is read instead, to the same model.
    A pickle with an object in it is refused without advice to turn the safety off."""
    legacy = pt_case(orig, pt_payload(orig), _use_new_zipfile_serialization=False)
    assert _check(legacy, orig.models["pt"]) is not None
    evil = pt_case(orig, {**pt_payload(orig), "metadata": {"x": _Evil()}})
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
    path = new_file(orig, "pt", flip(raw, record.header_offset + 28, 0))
    with pytest.raises(InterpError, match=r"corrupt \(record '.*data/3' fails its CRC-32"):
        load_pretrained(path)


class _Evil:
    def __reduce__(self) -> tuple:  # pragma: no cover - never called: weights_only refuses it
        return (print, ("code ran",))


# ---------------------------------------------------------------------------------------------
# config.json (Hugging Face folders) and ModelConfig .json files
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(st.sampled_from(["llama", "gpt2"]), HF_MUTATIONS)
@example("llama", ("set", "sliding_window", "abc"))  # a bare int() error, no field, no file
@example("llama", ("set", "num_attention_heads", 0))  # ZeroDivisionError
@example("llama", ("set", "num_hidden_layers", 2.5))  # int(2.5) == 2: silently truncated
@example("gpt2", ("set", "n_embd", "16"))
def test_crafted_config_json(orig: Originals, family: str, mutation: tuple) -> None:
    folder = copy_folder(orig, family)
    cfg_path = folder / "config.json"
    cfg_path.write_bytes(json_text(cfg_path.read_text(), mutation))
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
    folder = copy_folder(orig, "llama")
    cfg_path = folder / "config.json"
    cfg_path.write_bytes(json_text(cfg_path.read_text(), ("set", field, value)))
    with pytest.raises(InterpError) as e:
        load_pretrained(folder)
    assert str(cfg_path) in str(e.value) and repr(field) in str(e.value)


@FUZZ
@given(MC_MUTATIONS)
@example(("set", "n_layers", "abc"))
@example(("set", "mask", 3))
@example(("whole", [1, 2]))
@example(("whole", {"\n": None}))  # a hostile field name must not break the line
def test_crafted_model_config_json(orig: Originals, mutation: tuple) -> None:
    """Random weights: only the config is compared (sizes stay small here; the config's own
    property test covers the sizes that cannot be allocated)."""
    path = new_file(orig, "json", json_text(orig.files["json"].read_text(), mutation))
    bad_layers = mutation[:2] == ("set", "n_layers") and not (
        type(mutation[2]) is int and mutation[2] >= 1)  # must fail, naming the field
    model = _check(path, orig.models["json"], config="random",
                   name="n_layers" if bad_layers else None)
    if model is not None and mutation[0] in ("set", "del"):
        assert _plain_cfg(model, mutation[1]) == _plain_cfg(orig.models["json"], mutation[1])


def test_cli_info_prints_one_error_line(orig: Originals) -> None:
    """The command line turns a crafted file into one ``error:`` line and exit code 2."""
    import subprocess
    import sys

    folder = st_write(orig, ("set", "model.norm.weight", "data_offsets", [-64, 0]))
    run = subprocess.run([sys.executable, "-m", "analyses.app.cli", "info", str(folder)],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "model.norm.weight" in lines[0] and "data_offsets" in lines[0]
