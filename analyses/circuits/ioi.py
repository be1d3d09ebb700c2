"""Indirect-object identification (IOI) prompt pairs (Wang et al. (2022), *Interpretability in
the Wild: a Circuit for Indirect Object Identification in GPT-2 small*, arXiv:2211.00593).

Clean: "When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect
object, IO) against " John" (the subject, S). Corrupted ("ABC", Wang et al. sec. 3): the second
mention of the subject becomes a third name, "... Paul gave a drink to", so the sentence no
longer says who is the indirect object. Only names, places and objects that the model's
tokenizer reads as one token (with their leading space) are used, so each pair has two prompts
of equal length.
"""

from __future__ import annotations

import random

from analyses.circuits.pairs import PromptPairs
from interp.errors import InterpError

__all__ = ["NAMES", "OBJECTS", "PLACES", "TEMPLATES", "ioi_pairs", "single_tokens"]

TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "When {A} and {B} went to the {place}, {S} handed a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
    "After {A} and {B} arrived at the {place}, {S} passed the {obj} to",
    "While {A} and {B} were working at the {place}, {S} gave a {obj} to",
    "Afterwards, {A} and {B} went to the {place}. {S} brought a {obj} to",
)
NAMES = ("Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Emma", "Mark",
         "Lisa", "Peter", "Kate", "Michael", "Laura", "Daniel", "Alice", "Robert", "Jane", "Kevin")
PLACES = ("store", "park", "school", "office", "garden", "station", "hospital", "restaurant",
          "library", "beach")
OBJECTS = ("drink", "book", "ring", "ball", "letter", "bottle", "gift", "key", "bag", "phone")


def single_tokens(model, words: tuple[str, ...]) -> list[str]:
    """The words that are one token after a space (none, for a tokenizer that cannot read
    English words at all)."""
    out = []
    for w in words:
        try:
            if len(model.to_tokens(" " + w, prepend_bos=False)[0]) == 1:
                out.append(w)
        except InterpError:  # a word vocabulary without it
            continue
    return out


def ioi_pairs(model, n_pairs: int = 128, *, seed: int = 0,
              template: int | None = None) -> PromptPairs:
    """``n_pairs`` IOI pairs from :data:`TEMPLATES` with random single-token names (A, B and
    the corrupting C distinct; the IO is first or second at random), places and objects.
    ``template`` uses that one template only, so every pair has the same token positions (for
    patching by position)."""
    if template is not None and not 0 <= template < len(TEMPLATES):
        raise InterpError(f"template must be in 0..{len(TEMPLATES) - 1}, got {template}.")
    names = single_tokens(model, NAMES)
    places, objects = single_tokens(model, PLACES), single_tokens(model, OBJECTS)
    if len(names) < 3 or not places or not objects:
        raise InterpError("This tokenizer splits too many of the IOI names, places or objects "
                          "into several tokens; use a model with an English BPE vocabulary.")
    rng = random.Random(seed)
    clean, corrupted, answer, wrong = [], [], [], []
    for i in range(n_pairs):
        io, s, c = rng.sample(names, 3)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        fill = {"A": first, "B": second, "place": rng.choice(places), "obj": rng.choice(objects)}
        text = TEMPLATES[i % len(TEMPLATES) if template is None else template]
        clean.append(model.to_tokens(text.format(S=s, **fill))[0].tolist())
        corrupted.append(model.to_tokens(text.format(S=c, **fill))[0].tolist())
        answer.append(model.to_single_token(" " + io))
        wrong.append(model.to_single_token(" " + s))
    return PromptPairs.from_lists(clean, corrupted, answer, wrong)
