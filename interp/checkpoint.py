"""interp's own checkpoints: one ``torch.save`` of plain types, read with ``weights_only=True``.

The one place that writes and reads ``.pt`` checkpoints: :mod:`interp.loading` loads them as
models (``interp.load_pretrained(path)``), :mod:`interp.train` writes them while training and
reads them back to resume. Layout (a dict)::

    format      "interp-checkpoint"
    version     1
    config      ModelConfig.to_dict()  (a trained model's cfg.extra["task"] names its task)
    state_dict  the model's weights (tied weights stored once)
    tokenizer   a plain dict (see :func:`tokenizer_to_dict`) or None
    metadata    free-form plain types given to save_checkpoint (task, step, seed, ...)

Training checkpoints carry, instead of ``metadata``::

    task        {"name", "params", ...}: regenerates the data (facts, domain labels)
    train       {"step", "steps", "seed", "train_config", "history", "metrics",
                 "wall_time_s", "versions", "command"}
    optimizer   AdamW state_dict (None in shipped checkpoints: they need not resume)
    rng         {"data": data generator state, "torch": torch's global RNG state}

Plain types only, so loading never unpickles arbitrary objects: a checkpoint from a stranger
cannot run code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from interp import tokenizers as interp_tokenizers
from interp.config import ModelConfig
from interp.errors import InterpError

FORMAT = "interp-checkpoint"
VERSION = 1

__all__ = [
    "FORMAT",
    "VERSION",
    "load_checkpoint",
    "model_from_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "tokenizer_from_dict",
    "tokenizer_to_dict",
    "write_checkpoint",
]

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                   "mask_token")


# ---------------------------------------------------------------------------------------------
# tokenizers as plain dicts
# ---------------------------------------------------------------------------------------------
def tokenizer_to_dict(tok: Any) -> dict[str, Any] | None:
    """A tokenizer as plain types: interp's training tokenizers by their own ``to_dict``, a Hugging
    Face fast tokenizer as its ``tokenizer.json`` text plus special tokens, a BERT WordPiece
    tokenizer as its vocabulary."""
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok
    try:  # the training tokenizers (word, byte, gpt2) know their own plain form
        return interp_tokenizers.tokenizer_to_dict(tok)
    except InterpError:
        pass
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        special = {name: getattr(tok, name, None) for name in _SPECIAL_TOKENS}
        return {"kind": "hf_json", "json": backend.to_str(), "class": type(tok).__name__,
                "special": {k: str(v) for k, v in special.items() if v is not None},
                "padding_side": getattr(tok, "padding_side", "right"),
                "add_bos_token": bool(getattr(tok, "add_bos_token", False))}
    vocab = getattr(tok, "vocab", None)
    if isinstance(vocab, dict):
        return {"kind": "wordpiece",
                "vocab": [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])],
                "do_lower_case": bool(getattr(tok, "do_lower_case", True))}
    raise InterpError(f"Cannot store a {type(tok).__name__} tokenizer in an interp checkpoint; "
                      "use a Hugging Face fast tokenizer or one from interp.train.tokenizers.")


def _tokenizer_fields(d: dict[str, Any]) -> str:
    """Check a stored tokenizer's fields have the types its kind needs; returns the kind.

    A checkpoint is data from anywhere: a field of the wrong type must be a clear error, never
    a ``KeyError`` or a silently different vocabulary (``list("abc")`` is three tokens)."""
    kind = d.get("kind")

    def need(ok: bool, field: str, want: str) -> None:
        if not ok:
            raise InterpError(f"field tokenizer.{field} (kind {kind!r}) is "
                              f"{_short(d.get(field))}; it must be {want}")

    def strs(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, str) for t in v)

    if kind == "hf_json":
        need(isinstance(d.get("json"), str), "json", "the tokenizer.json text")
        special = d.get("special", {})
        need(isinstance(special, dict) and set(special) <= set(_SPECIAL_TOKENS)
             and all(isinstance(v, str) for v in special.values()), "special",
             "a map of special-token names to strings")
        need(d.get("padding_side", "right") in ("left", "right"), "padding_side",
             "'left' or 'right'")
    elif kind == "wordpiece":
        need(strs(d.get("vocab")), "vocab", "a list of strings")
        need(isinstance(d.get("do_lower_case", True), bool), "do_lower_case", "true or false")
    elif kind == "words":
        tokens = d.get("tokens")
        need(strs(tokens), "tokens", "a list of strings")
        for field in ("bos_token", "pad_token"):
            v = d.get(field)
            need(v is None or (isinstance(v, str) and v in tokens), field,
                 "None or one of the tokens")
    elif not isinstance(kind, str):
        raise InterpError(f"field tokenizer.kind is {_short(kind)}; it must be a string")
    return kind


def _one_line(e: BaseException) -> str:
    from interp.loading._common import one_line

    return one_line(str(e))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tokenizer_from_dict(d: dict[str, Any] | None) -> Any:
    """Rebuild a tokenizer stored by :func:`tokenizer_to_dict`; None stays None. A malformed
    entry is an InterpError naming the field."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise InterpError(f"field tokenizer is a {type(d).__name__}; it must be a dict or None")
    kind = _tokenizer_fields(d)
    if kind == "hf_json":
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        try:
            backend = Tokenizer.from_str(d["json"])
        except Exception as e:  # the tokenizers library raises a bare Exception
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InterpError(f"field tokenizer.json is not a valid tokenizer.json ({first})"
                              ) from None
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, **d.get("special", {}))
        tok.padding_side = d.get("padding_side", "right")
        return tok
    if kind == "wordpiece":
        from interp.loading.hf import wordpiece_tokenizer

        return wordpiece_tokenizer(d["vocab"], do_lower_case=d.get("do_lower_case", True))
    return interp_tokenizers.tokenizer_from_dict(d)


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------
def _pt_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".pt":
        raise InterpError(f"Checkpoint path {str(path)!r} must end in .pt.")
    return path


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plain types and tensors) under ``format``/``version`` to ``path``.

    Written atomically (a temporary file renamed into place): a crash never leaves half a file.
    """
    path = _pt_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(x: Any, where: str) -> Any:
    """Check metadata is plain (what weights_only=True can read back)."""
    if x is None or isinstance(x, bool | int | float | str | torch.Tensor):
        return x
    if isinstance(x, list | tuple):
        return [_plain(v, where) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in x.items()}
    raise InterpError(f"Checkpoint metadata {where} is a {type(x).__name__}; use plain types "
                      "(str, int, float, bool, None, lists, dicts, tensors).")


def save_checkpoint(model: Any, path: str | Path, **metadata: Any) -> Path:
    """Write ``model`` (config, weights, tokenizer) and ``metadata`` to ``path`` (a ``.pt`` file).

    Written atomically (a temporary file renamed into place): a crash never leaves half a file.
    ``interp.load_pretrained(path)`` reads it back.

    >>> # save_checkpoint(model, "runs/induction.pt", task="induction", step=2000)
    """
    path = _pt_path(path)
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise InterpError("save_checkpoint needs an interp model (with a ModelConfig .cfg), "
                          f"got {type(model).__name__}.")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return write_checkpoint(path, {
        "config": cfg.to_dict(),
        "state_dict": state,
        "tokenizer": tokenizer_to_dict(getattr(model, "tokenizer", None)),
        "metadata": _plain(metadata, "metadata"),
    })


# ---------------------------------------------------------------------------------------------
# read
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, *, mmap: bool = True) -> dict[str, Any]:
    """The checkpoint dict, read safely (``weights_only=True``) and checked for the layout in
    the module docstring.

    ``mmap=True`` memory-maps the tensors (loading a model copies what it needs); the trainer
    resumes with ``mmap=False`` so the optimizer state it keeps is ordinary memory. Legacy
    (non-zip) files cannot be mapped and are read. Before torch sees a zip file, its records
    are checked against their CRC-32 (:func:`interp.loading.torch_file.check_zip`): one read
    of the file, so that a damaged byte is an error rather than a different model."""
    from interp.loading.torch_file import load_torch_file

    path = Path(path)
    if not path.is_file():
        raise InterpError(f"Checkpoint {str(path)!r} does not exist.")
    ckpt = load_torch_file(path, what="Checkpoint", mmap=mmap)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise InterpError(f"{str(path)!r} is not an interp checkpoint (no config/state_dict); "
                          "write one with interp.loading.save_checkpoint or `interp train`.")
    problem = _layout_problem(ckpt)
    if problem:
        raise InterpError(f"Checkpoint {str(path)!r}: {problem}; the file is corrupt or not "
                          "written by interp: re-save it with interp.save_checkpoint.")
    return ckpt


def _layout_problem(ckpt: dict[str, Any]) -> str | None:
    """What in ``ckpt`` breaks the layout of the module docstring, or None."""
    if ckpt.get("format", FORMAT) != FORMAT:
        return f"field format is {_short(ckpt['format'])}, not {FORMAT!r}"
    version = ckpt.get("version", VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        return (f"field version is {_short(version)}; this interp reads versions 1 to "
                f"{VERSION} (a newer file needs a newer interp)")
    if not isinstance(ckpt["config"], dict):
        return f"field config is a {type(ckpt['config']).__name__}, not a dict of config fields"
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict):
        return f"field state_dict is a {type(sd).__name__}, not a dict of named tensors"
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            return f"field state_dict[{_short(k)}] is a {type(v).__name__}, not a named tensor"
    tok = ckpt.get("tokenizer")
    if tok is not None and not isinstance(tok, dict):
        return f"field tokenizer is a {type(tok).__name__}; it must be a dict or None"
    if not isinstance(ckpt.get("metadata", {}), dict):
        return f"field metadata is a {type(ckpt['metadata']).__name__}, not a dict"
    return None


def _tokenizer_of(ckpt: dict[str, Any], where: str) -> Any:
    """The checkpoint's tokenizer, a malformed entry named as ``where``'s field."""
    try:
        return tokenizer_from_dict(ckpt.get("tokenizer"))
    except InterpError as e:
        raise InterpError(f"{where}: {_one_line(e).rstrip('.')}; re-save it with a tokenizer "
                          "interp can store.") from None


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> Any:
    """Build the model of a checkpoint dict with its weights and tokenizer, as trainable
    parameters (the trainer resumes from it; :func:`load_checkpoint` is the loading path)."""
    from interp.model import build_model

    try:
        cfg = ModelConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise InterpError(f"Checkpoint config is invalid: {_one_line(e)}") from None
    model = build_model(cfg, tokenizer=_tokenizer_of(ckpt, "Checkpoint"))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise InterpError(f"Checkpoint weights do not match its config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}.")
    return model.to(device)


def load_checkpoint(path: str | Path, *, device: Any = None, dtype: torch.dtype | None = None,
                    **config_overrides: Any) -> Any:
    """Rebuild the model of an interp checkpoint with its tokenizer; metadata lands in
    ``model.checkpoint_metadata``. Config overrides (e.g. ``attn_kernel="eager"``) replace
    fields."""
    from interp.loading._common import assemble, naming

    ckpt = read_checkpoint(path)
    where = f"Checkpoint {str(path)!r}"
    cfg_dict = dict(ckpt["config"])
    cfg_dict.update(config_overrides)
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise InterpError(f"{where} has an invalid config: {_one_line(e)}") from None
    tokenizer = _tokenizer_of(ckpt, where)
    with naming(Path(path), "Checkpoint"):
        stored = cfg_dict.get("default_prepend_bos")  # the checkpoint's own BOS record
        model = assemble(cfg, dict(ckpt["state_dict"]), tokenizer=tokenizer, device=device,
                         dtype=dtype, source=f"checkpoint {Path(path).name}'s weights",
                         adds_bos=stored if isinstance(stored, bool) else None)
    model.checkpoint_metadata = ckpt.get(
        "metadata", {k: v for k, v in ckpt.items() if k not in ("state_dict", "config")})
    return model
