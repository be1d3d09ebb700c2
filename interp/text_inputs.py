"""Text in, tokens out: the tokenizer helpers every model shares, with TransformerLens' names.

:class:`TextInputs` is a mixin of :class:`interp.base.HookedBase`. Every method that reads text
goes through :mod:`interp.tokenize`, so ``to_tokens``, ``forward(str)``, ``run_with_cache(str)``,
``generate(str)``, ``to_str_tokens`` and every analysis apply one BOS rule:

- ``model.prepend_bos`` is ``model.cfg.default_prepend_bos`` (TransformerLens' name; one value,
  two names): the checkpoint's own rule, set by the loader from the tokenizer (Hugging Face
  ``add_bos_token`` / tokenizer.json, GGUF ``tokenizer.ggml.add_bos_token``, an interp
  checkpoint's stored config), True for a decoder built from a config, False for encoders.
- Every text-reading method takes ``prepend_bos=`` (None = the model's rule) and
  ``padding_side=`` (None = the tokenizer's, right without one) for that call only.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int

from interp import tokenize
from interp.errors import InterpError


def _is_text(x: Any) -> bool:
    """A string or a non-empty list of strings."""
    return isinstance(x, str) or (
        isinstance(x, list | tuple) and bool(x) and all(isinstance(t, str) for t in x)
    )


class TextInputs:
    """Mixin: the BOS rule and the tokenizer helpers (``to_tokens`` and friends)."""

    cfg: Any
    tokenizer: Any
    device: torch.device

    # ---------------- the BOS rule ----------------
    @property
    def prepend_bos(self) -> bool:
        """Whether text gets BOS first (decoders): ``cfg.default_prepend_bos``, one value with
        two names so that TransformerLens code reading the config and interp code reading the
        model agree. Setting it replaces the (frozen) config with one that says so."""
        return bool(self.cfg.default_prepend_bos)

    @prepend_bos.setter
    def prepend_bos(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise InterpError(f"prepend_bos must be True or False, got {value!r}.")
        if value != self.cfg.default_prepend_bos:
            self.cfg = self.cfg.replace(default_prepend_bos=value)

    # ---------------- tokenizer helpers ----------------
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InterpError(
                "This model has no tokenizer attached; pass token ids, or load it with "
                "interp.load_pretrained."
            )
        return self.tokenizer

    def text_batch(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        truncate: bool = True,
    ) -> tokenize.TokenBatch:
        """Text -> tokens with the exact mask of real tokens (see
        :func:`interp.tokenize.text_batch`); what a forward on text runs on."""
        self._need_tokenizer()
        return tokenize.text_batch(
            self, text, prepend_bos=prepend_bos, padding_side=padding_side, truncate=truncate
        )

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Text -> token ids [batch, pos], padded with the tokenizer's pad id.

        Decoders get BOS first iff ``prepend_bos`` (None: ``model.prepend_bos``, the
        checkpoint's rule, so by default this equals what the checkpoint's own tokenizer gives
        with ``add_special_tokens=True``); encoders get their tokenizer's specials ([CLS] ...
        [SEP]). ``padding_side`` "left" or "right" (None: the tokenizer's); ``truncate`` keeps
        the first ``cfg.n_ctx`` tokens of each text, for every position scheme;
        ``move_to_device=False`` leaves the ids on the CPU. A padded batch's mask is
        ``model.text_batch(...)``'s; ``forward`` on the text itself builds it for you."""
        batch = self.text_batch(input, prepend_bos, padding_side, truncate)
        return batch.tokens.to(self.device) if move_to_device else batch.tokens

    def _tokens_and_mask(
        self,
        input: Any,
        attention_mask: Any,
        prepend_bos: bool | None,
        padding_side: str | None,
        infer_mask: bool = True,
    ) -> tuple[Any, Any]:
        """A forward's input as (tokens, attention mask): text is tokenized with the mask of
        its real tokens (unless a mask was given); tokens pass through unchanged (and text
        without a tokenizer too, for the input check to name), with TransformerLens' mask for
        left-padded ids (:meth:`_left_padding_mask`) when ``infer_mask`` (not for the new
        tokens of a cached step)."""
        if not _is_text(input) or self.tokenizer is None:
            if prepend_bos is not None or padding_side is not None:
                self._check_text_options(prepend_bos, padding_side)
            if attention_mask is None and infer_mask:
                attention_mask = self._left_padding_mask(input, prepend_bos)
            return input, attention_mask
        batch = self.text_batch(list(input) if not isinstance(input, str) else input,
                                prepend_bos, padding_side)
        tokens = batch.tokens.to(self.device)
        if attention_mask is None and not bool(batch.attention_mask.all()):
            attention_mask = batch.attention_mask.to(self.device)
        return tokens, attention_mask

    def _left_padding_mask(self, tokens: Any, prepend_bos: bool | None) -> torch.Tensor | None:
        """TransformerLens' rule for ids given without a mask: when the tokenizer pads on the
        left (``model.tokenizer.padding_side = "left"``), the leading pad ids of each row are
        padding. Where BOS and pad share an id, the BOS the model's rule put before the first
        other token is kept. None when nothing is padded or the tokenizer pads on the right."""
        tok = self.tokenizer
        if (tok is None or getattr(tok, "padding_side", "right") != "left"
                or not isinstance(tokens, torch.Tensor) or tokens.ndim != 2
                or tokens.is_floating_point() or tokens.numel() == 0):
            return None
        pad = tokenize.pad_id(self)
        not_pad = tokens != pad
        mask = not_pad.long().cumsum(-1) > 0
        if tokenize.bos_to_prepend(self, prepend_bos) == pad:  # that BOS reads as padding
            first = not_pad.long().argmax(-1)
            rows = torch.nonzero(first > 0).flatten()
            mask[rows, first[rows] - 1] = True
        return None if bool(mask.all()) else mask

    @staticmethod
    def _check_text_options(prepend_bos: Any, padding_side: Any) -> None:
        """``prepend_bos`` / ``padding_side`` shape text only; with token ids they are checked
        (a typo is an error) and otherwise change nothing, as in TransformerLens."""
        if prepend_bos is not None and not isinstance(prepend_bos, bool):
            raise InterpError(f"prepend_bos must be True, False or None, got {prepend_bos!r}.")
        if padding_side not in (None, "left", "right"):
            raise InterpError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")

    def to_str_tokens(
        self,
        input: Any,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> list[str] | list[list[str]]:
        """One string per token, as the model sees them (TransformerLens' semantics).

        A string or 1-D ids give a list of strings; a list of strings gives one list per string
        (each tokenized alone, no padding); 2-D ids give a flat list for one row (as
        TransformerLens) and one list per row for several."""
        tok = self._need_tokenizer()
        if isinstance(input, list | tuple) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
        else:
            ids = torch.as_tensor(input)
            if ids.ndim == 2 and ids.shape[0] > 1:
                return [[tok.decode([int(i)]) for i in row] for row in ids]
            ids = ids.reshape(-1)
        return [tok.decode([int(i)]) for i in ids]

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        """Token ids -> text; 2-D ids give one string per row."""
        tok = self._need_tokenizer()
        t = torch.as_tensor(tokens)
        if t.ndim == 2:
            return [tok.decode(r.tolist()) for r in t]
        return tok.decode(t.tolist())

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no specials)."""
        tok = self._need_tokenizer()
        ids = tok.encode(string, add_special_tokens=False)
        if len(ids) != 1:
            raise InterpError(f"{string!r} is {len(ids)} tokens, not one.")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id (TransformerLens' ``to_single_str_token``)."""
        if isinstance(int_token, torch.Tensor) and int_token.numel() == 1:
            int_token = int(int_token.item())
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise InterpError(f"to_single_str_token needs one integer id, got {int_token!r}.")
        if not 0 <= int_token < self.cfg.d_vocab:
            raise InterpError(f"Token id {int_token} is outside the vocabulary "
                              f"0..{self.cfg.d_vocab - 1}.")
        return self._need_tokenizer().decode([int_token])

    def get_token_position(
        self,
        single_token: str | int,
        input: str | torch.Tensor,
        mode: str = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """Index of the first (``mode="first"``) or last (``"last"``) occurrence of one token in
        ``input`` (text, tokenized with ``prepend_bos`` / ``padding_side``, or ids of one
        sequence), as TransformerLens. A token that does not occur is an error."""
        if mode not in ("first", "last"):
            raise InterpError(f"mode must be 'first' or 'last', got {mode!r}.")
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)
        else:
            ids = torch.as_tensor(input)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise InterpError(f"get_token_position needs one sequence, got a batch of "
                                  f"{ids.shape[0]}; pass one row.")
            ids = ids[0]
        target = self.to_single_token(single_token) if isinstance(single_token, str) \
            else int(single_token)
        where = (ids == target).nonzero().flatten()
        if len(where) == 0:
            raise InterpError(f"Token {single_token!r} (id {target}) does not occur in the input.")
        return int(where[0] if mode == "first" else where[-1])
