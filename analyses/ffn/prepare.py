"""Facts tokenised for one model, and which of them the model knows.

Every method needs, per fact, the prompt's token ids, the subject's token range (causal tracing
corrupts it) and the answer's first token (whose probability is measured). Text facts are
tokenised with :func:`interp.tokenize.encode`, the subject found by its characters; facts of an
:mod:`interp.train` knowledge base come with their tokens. Only facts the model gets right are
analysed (:func:`known_facts`, Meng et al.'s "known" set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from analyses.ffn.facts import Fact
from analyses.ffn.readout import _last_probs, _token_str, check_model
from interp import HookedTransformer, tokenize
from interp.errors import InterpError

if TYPE_CHECKING:
    from interp.train import Fact as TaskFact


@dataclass(frozen=True)
class PreparedFact:
    """A fact tokenised for one model.

    ``tokens``: the prompt's ids (BOS included when the model prepends one); ``subject_span``:
    half-open token range of the subject; ``answer_id``: the answer's first token;
    ``paraphrase_tokens``: the paraphrases' ids.
    """

    name: str
    prompt: str
    subject: str
    answer: str
    answer_id: int
    tokens: tuple[int, ...]
    subject_span: tuple[int, int]
    paraphrase_tokens: tuple[tuple[int, ...], ...] = ()
    relation: str | None = None

    @property
    def prompts(self) -> list[tuple[int, ...]]:
        """The prompt and its paraphrases, as token ids."""
        return [self.tokens, *self.paraphrase_tokens]


def _char_span_to_tokens(model: HookedTransformer, ids: list[int], start: int, end: int,
                         text: str) -> tuple[int, int] | None:
    """Token range covering characters [start, end) of ``text`` (Meng et al.'s
    ``find_token_range``: decode growing prefixes and find where the subject's characters fall)."""
    tok = model.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    first = 1 if ids and bos is not None and ids[0] == bos else 0
    ends = []
    for k in range(first, len(ids)):
        ends.append(len(tok.decode(ids[first:k + 1])))
    if not ends or ends[-1] < len(text) - 1:
        # decode does not reproduce the text (e.g. normalising tokenizers): search tokens instead
        return None
    lo = next((i for i, e in enumerate(ends) if e > start), None)
    hi = next((i for i, e in enumerate(ends) if e >= end), None)
    if lo is None or hi is None:
        return None
    return first + lo, first + hi + 1


def _subject_span(model: HookedTransformer, ids: list[int], prompt: str, subject: str,
                  where: str) -> tuple[int, int]:
    """The subject's token range in ``ids``: by characters, else as a token sub-sequence."""
    start = prompt.find(subject)
    if start < 0:
        raise InterpError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; "
                          "write it exactly as in the prompt.")
    span = _char_span_to_tokens(model, ids, start, start + len(subject), prompt)
    if span is None:  # fall back: the subject's own tokens as a sub-sequence of the prompt's
        for variant in (" " + subject, subject):
            sub = tokenize.encode(model, variant, specials=False)
            for i in range(len(ids) - len(sub) + 1):
                if sub and ids[i:i + len(sub)] == sub:
                    return i, i + len(sub)
        raise InterpError(f"{where}: cannot find the tokens of subject {subject!r} in prompt "
                          f"{prompt!r}.")
    return span


def _answer_id(model: HookedTransformer, prompt_ids: list[int], prompt: str, answer: str) -> int:
    """First token of the answer as the model would write it after the prompt."""
    full = tokenize.encode(model, prompt + " " + answer)
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids)]
    ids = (tokenize.encode(model, " " + answer, specials=False)
           or tokenize.encode(model, answer, specials=False))
    return int(ids[0])


def _prepare_text_fact(model: HookedTransformer, f: Fact, where: str) -> PreparedFact:
    """A text :class:`Fact` tokenised: prompt, subject range, answer token, paraphrases."""
    ids = tokenize.encode(model, f.prompt)
    span = _subject_span(model, ids, f.prompt, f.subject, where)
    if span[0] >= span[1]:
        raise InterpError(f"{where}: subject {f.subject!r} covers no token of prompt "
                          f"{f.prompt!r}.")
    answer_id = _answer_id(model, ids, f.prompt, f.answer)
    paras = tuple(tuple(tokenize.encode(model, p)) for p in f.paraphrases)
    return PreparedFact(name=f"{f.subject} -> {f.answer}", prompt=f.prompt, subject=f.subject,
                        answer=f.answer, answer_id=answer_id, tokens=tuple(ids), subject_span=span,
                        paraphrase_tokens=paras, relation=f.relation)


def prepare_facts(model: HookedTransformer,
                  facts: Sequence[Fact | TaskFact | PreparedFact]) -> list[PreparedFact]:
    """Tokenise facts for ``model``: text :class:`Fact` s (needs the tokenizer), facts of an
    ``interp.train`` knowledge base (tokens given), or :class:`PreparedFact` s (kept)."""
    check_model(model)
    out: list[PreparedFact] = []
    for i, f in enumerate(facts):
        if isinstance(f, PreparedFact):
            out.append(f)
            continue
        if hasattr(f, "prompt_tokens"):  # interp.train.tasks.Fact
            tokens = tuple(int(t) for t in f.prompt_tokens)
            out.append(PreparedFact(name=f"{f.subject} {f.relation}", prompt=f.prompt,
                                    subject=f.subject, answer=f.object, answer_id=int(f.answer),
                                    tokens=tokens, subject_span=tuple(f.subject_span),
                                    relation=f.relation))
            continue
        if not isinstance(f, Fact):
            raise InterpError(f"Fact {i} is a {type(f).__name__}; pass analyses.ffn.Fact objects "
                              "or load_facts(path).")
        check_model(model, need_tokenizer=True)
        where = f"fact {i}" + (f" (line {f.line})" if f.line else "")
        out.append(_prepare_text_fact(model, f, where))
    return out


def fact_predictions(model: HookedTransformer, facts: Sequence[PreparedFact],
                     batch_size: int = 32) -> pd.DataFrame:
    """One row per fact: its answer's probability and rank, the model's top token, and
    ``known`` (the answer's first token is the top prediction)."""
    probs = _last_probs(model, [f.tokens for f in facts], batch_size=batch_size)
    rows = []
    for f, p in zip(facts, probs, strict=True):
        pa = float(p[f.answer_id])
        top = int(p.argmax())
        rows.append({"fact": f.name, "relation": f.relation, "prompt": f.prompt,
                     "subject": f.subject, "answer": f.answer, "answer_prob": pa,
                     "answer_rank": int((p > p[f.answer_id]).sum()) + 1,
                     "top_token": _token_str(model, top), "top_prob": float(p[top]),
                     "known": top == f.answer_id})
    return pd.DataFrame(rows)


def known_facts(model: HookedTransformer, facts: Sequence[PreparedFact],
                batch_size: int = 32) -> tuple[list[PreparedFact], pd.DataFrame]:
    """The facts the model gets right (greedy next token = the answer's first token, as Meng
    et al.'s "known" set), and the full prediction table."""
    table = fact_predictions(model, facts, batch_size)
    return [f for f, k in zip(facts, table["known"], strict=True) if k], table


def select_facts(facts: Sequence[PreparedFact], n: int | None,
                 seed: int = 0) -> list[PreparedFact]:
    """Up to ``n`` facts in a seeded random order (files are grouped by relation; a random
    subset mixes relations)."""
    if n is None or n >= len(facts):
        return list(facts)
    order = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [facts[i] for i in sorted(order[:n])]
