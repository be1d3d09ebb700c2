"""What the head-taxonomy section reads: a CoNLL-U file, a text file, the packaged sample.

The ``interp heads`` options ``--conllu`` and ``--text`` are checked here before any slow
work (:func:`check_text_file`, :func:`check_conllu_file`), and :func:`inputs` turns the
choice into the keyword arguments of :func:`analyses.heads.analyze` plus the sentence the
report's Data paragraph starts with. Only a file's base name reaches the report.

(A private module: topic discovery skips names starting with ``_``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from analyses import parses
from interp.errors import InterpError

if TYPE_CHECKING:
    from interp import HookedTransformer

__all__ = ["SAMPLE_TEXT", "check_conllu_file", "check_text_file", "inputs", "resolve_source"]

SAMPLE_TEXT = Path(__file__).resolve().parent.parent.parent / "data" / "sample_text.txt"
SAMPLE_WHAT = ("the packaged sample (analyses/data/sample_text.txt, 40 English sentences "
               "written for this project)")


def _lines(path: Path) -> Iterator[str]:
    """A text file's non-empty lines, streamed (UTF-8 errors as one line)."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
    except UnicodeDecodeError:
        raise InterpError(f"text file {path} is not UTF-8 text; convert it to UTF-8.") from None


def check_text_file(path: Path) -> None:
    """Fail before any slow work when the text file is missing or holds no text."""
    if not path.is_file():
        raise InterpError(f"text file not found: {path}")
    for _ in _lines(path):
        return
    raise InterpError(f"text file {path} is empty; pass a file with at least one sentence.")


def check_conllu_file(path: Path) -> int:
    """Read a CoNLL-U file once (streamed) so a malformed line fails before the model loads;
    returns the number of sentences."""
    return sum(1 for _ in parses.read_conllu(path))


def _fast_tokenizer(model: HookedTransformer) -> bool:
    """Whether the model has a fast Hugging Face tokenizer (character offsets for words)."""
    tok = getattr(model, "tokenizer", None)
    return tok is not None and callable(tok) and bool(getattr(tok, "is_fast", False))


def inputs(model: HookedTransformer, opts: dict) -> tuple[dict, str]:
    """The analyze() keyword arguments for the chosen input, and a sentence for the report."""
    conllu, text = opts.get("conllu"), opts.get("text_file")
    if conllu is not None:
        if not _fast_tokenizer(model):
            raise InterpError("--conllu needs a model with a fast Hugging Face tokenizer "
                              "(character offsets); this model has none. Run without --conllu "
                              "for the random-token scores.")
        name = Path(conllu).name
        lic = (" (Universal Dependencies English EWT, CC BY-SA 4.0)"
               if "ewt" in name.lower() else "")
        return {"sentences": parses.read_conllu(conllu)}, f"Gold parses from `{name}`{lic}."
    path = Path(text) if text is not None else (SAMPLE_TEXT if _fast_tokenizer(model) else None)
    what = f"`{path.name}`" if text is not None else SAMPLE_WHAT
    if path is None:
        return {}, ("This model has no text tokenizer with character offsets, so token-level "
                    "scores come from the repeated random tokens too.")
    if _fast_tokenizer(model):
        try:
            nlp = parses.load_spacy()
        except InterpError as e:
            return {"texts": _lines(path)}, f"Text: {what}, unparsed ({e}); no syntactic scores."
        return ({"sentences": parses.spacy_sentences(_lines(path), nlp)},
                f"Text: {what}, parsed by spaCy `{parses.SPACY_MODEL}` (ClearNLP labels mapped "
                "to UD where the arc is the same: dobj->obj, poss->nmod:poss, neg->advmod, ...; "
                "prep/pobj kept).")
    return ({"texts": _lines(path)},
            f"Text: {what} (no parse: this tokenizer gives no character offsets).")


def resolve_source(source: str) -> str:
    """A packaged training checkpoint by name (``induction_rope``) -> its path; else unchanged."""
    try:
        from interp.train import SHIPPED, shipped
    except ImportError:
        return source
    stem = source[:-3] if source.endswith(".pt") else source
    if stem in SHIPPED and not Path(source).exists():
        return str(shipped(stem))
    return source
