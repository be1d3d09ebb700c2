"""Steering generation by adding a vector to one hook: activation addition and CAA.

Two ways to get the vector from prompts, one way to apply it:

- **Activation addition** (ActAdd; Turner et al. 2023, "Steering language models with
  activation engineering"): one prompt pair (``"Love"`` / ``"Hate"``); the vector is the
  difference of their activations *per position* [pos, d_model] (the shorter prompt padded
  with a space token, as the paper does), added to the first positions of the user's prompt.
- **Contrastive activation addition** (CAA; Rimsky et al. 2024, "Steering Llama 2 via
  contrastive activation addition"): many pairs that differ only in the behaviour; the vector
  is the mean over pairs of the difference at the last token [d_model], added at every
  position of the prompt and of every generated token.

:func:`steer` adds ``coeff * vector`` at the hook for a ``with`` block (a forward hook on the
hook point, so the model's other hooks and the KV cache work as usual: every cached key and
value was computed with the steering applied). :func:`steering_curve` generates with a range of
coefficients and scores each continuation with :func:`lexicon_score`, so the report shows how a
measurable property moves with the coefficient.

An SAE feature is a steering vector too: ``steer(model, sae.cfg.hook_name, sae.W_dec[i], c)``
adds feature ``i``'s decoder direction; to clamp or ablate a feature's *activation* instead,
splice the SAE (:func:`analyses.dictionary.splice.splice`) and hook ``<hook>.hook_sae_acts``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch

from interp.errors import InterpError

__all__ = ["NEGATIVE_WORDS", "POSITIVE_WORDS", "SENTIMENT_PAIRS", "actadd_vector", "caa_vector",
           "lexicon_score", "steer", "steering_curve"]

# Contrastive pairs for sentiment, written for this project: each pair differs only in the
# sentiment of its last words, so the difference isolates sentiment (Rimsky et al.'s design).
SENTIMENT_PAIRS: tuple[tuple[str, str], ...] = (
    ("I watched the film yesterday and it was wonderful",
     "I watched the film yesterday and it was awful"),
    ("The food at this place is delicious", "The food at this place is disgusting"),
    ("My day at work was great and happy", "My day at work was terrible and sad"),
    ("I love my new phone, it is excellent", "I hate my new phone, it is horrible"),
    ("The weather today is lovely and bright", "The weather today is miserable and gloomy"),
    ("Our holiday was a fantastic joy", "Our holiday was a dreadful disaster"),
    ("The concert made everyone feel happy", "The concert made everyone feel angry"),
    ("She said the book was beautiful and inspiring", "She said the book was boring and ugly"),
)
# A small sentiment lexicon (common English words) for scoring generations.
POSITIVE_WORDS = frozenset(
    "good great wonderful excellent love loved lovely happy joy delicious beautiful amazing "
    "fantastic best nice glad enjoy enjoyed perfect fun brilliant awesome pleasant delightful "
    "kind warm friendly exciting inspiring favorite favourite like liked smile".split())
NEGATIVE_WORDS = frozenset(
    "bad terrible awful horrible hate hated sad angry disgusting ugly boring worst poor "
    "dreadful disaster miserable gloomy annoying pain painful cry fear afraid upset nasty "
    "broken wrong failed fail sick dull hurt".split())
_WORD = re.compile(r"[a-z']+")


@torch.no_grad()
def _acts(model: Any, hook_name: str, text: str) -> torch.Tensor:
    """[pos, d] activations at ``hook_name`` for one text (tokenized by the model's BOS rule)."""
    _, cache = model.run_with_cache(text, names_filter=[hook_name])
    return cache[hook_name][0].float()


def caa_vector(model: Any, hook_name: str,
               pairs: Sequence[tuple[str, str]] = SENTIMENT_PAIRS) -> torch.Tensor:
    """CAA: mean over ``(positive, negative)`` pairs of the last-token activation difference,
    [d_model]."""
    if not pairs:
        raise InterpError("CAA needs at least one (positive, negative) prompt pair.")
    model.check_hook_names([hook_name])
    diffs = [_acts(model, hook_name, p)[-1] - _acts(model, hook_name, n)[-1] for p, n in pairs]
    return torch.stack(diffs).mean(0)


def actadd_vector(model: Any, hook_name: str, positive: str, negative: str) -> torch.Tensor:
    """ActAdd: per-position difference of two prompts' activations, [pos, d_model]."""
    model.check_hook_names([hook_name])
    tok = model.tokenizer
    pad = tok.encode(" ", add_special_tokens=False)[:1] if tok is not None else [0]
    a, b = model.to_tokens(positive)[0], model.to_tokens(negative)[0]
    n = max(len(a), len(b))
    fill = torch.tensor(pad or [0], device=a.device)

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, fill.repeat(n - len(t))])

    with torch.no_grad():
        _, ca = model.run_with_cache(padded(a)[None], names_filter=[hook_name])
        _, cb = model.run_with_cache(padded(b)[None], names_filter=[hook_name])
    return (ca[hook_name][0] - cb[hook_name][0]).float()


@contextmanager
def steer(model: Any, hook_name: str, vector: torch.Tensor, coeff: float) -> Iterator[Any]:
    """Add ``coeff * vector`` at ``hook_name`` inside the block.

    A [d_model] vector is added at every position of every forward (prompt and generated
    tokens). A [pos, d_model] vector (ActAdd) is added to the first ``pos`` positions of a
    forward that starts at position 0 (the prompt), and to nothing in the cached one-token
    steps after it, as Turner et al. inject at the front of the prompt only.
    """
    model.check_hook_names([hook_name])
    point = model.hook_dict[hook_name]
    vec = vector.detach()

    def add(module: Any, args: Any, x: torch.Tensor) -> torch.Tensor:
        v = vec.to(device=x.device, dtype=x.dtype)
        if v.shape[-1] != x.shape[-1]:
            raise InterpError(f"The steering vector has width {v.shape[-1]} but {hook_name} "
                              f"has width {x.shape[-1]}; build the vector at the same hook.")
        if v.ndim == 1:
            return x + coeff * v
        n = min(v.shape[0], x.shape[1])
        if x.shape[1] < v.shape[0]:  # a cached one-token step: the prompt was steered already
            return x
        out = x.clone()
        out[:, :n] += coeff * v[:n]
        return out

    handle = point.register_forward_hook(add)
    try:
        yield model
    finally:
        handle.remove()


def lexicon_score(text: str, positive: Iterable[str] = POSITIVE_WORDS,
                  negative: Iterable[str] = NEGATIVE_WORDS) -> float:
    """(positive words - negative words) / words in ``text``: a crude but transparent
    sentiment measure (0 for no words)."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    pos, neg = set(positive), set(negative)
    return (sum(w in pos for w in words) - sum(w in neg for w in words)) / len(words)


def steering_curve(
    model: Any, hook_name: str, vector: torch.Tensor, prompts: Sequence[str],
    coeffs: Sequence[float], *, max_new_tokens: int = 24, samples: int = 1, seed: int = 0,
    score: Callable[[str], float] = lexicon_score,
    progress: Callable[..., Iterable] | None = None,
) -> pd.DataFrame:
    """Generate from every prompt at every coefficient (coefficient 0 is the unsteered model).

    Returns one row per generation: ``coeff``, ``prompt``, ``sample``, ``continuation`` (the
    generated text only) and ``score``. ``samples=1`` decodes greedily; more samples draw
    with temperature 1 from seed ``seed``, the same at every coefficient. A [d_model] (CAA)
    vector generates all prompts of a coefficient as one left-padded batch (steering every
    position, padding included, changes nothing the mask hides); an ActAdd vector, which is
    aligned to the prompt's first positions, generates prompt by prompt.
    """
    if not prompts:
        raise InterpError("The steering curve needs at least one prompt.")
    rows = []
    todo = [p for p in prompts for _ in range(samples)]
    groups = [todo] if vector.ndim == 1 else [[p] for p in todo]
    grid = [(c, g) for c in coeffs for g in groups]
    it: Iterable[tuple[float, list[str]]] = grid
    if progress is not None:
        it = progress(grid, desc="steered generation", total=len(grid))
    for coeff, group in it:
        n_prompt = model.text_batch(group, None, "left").tokens.shape[1]
        with steer(model, hook_name, vector, coeff), torch.no_grad():
            out = model.generate(group, max_new_tokens=max_new_tokens, do_sample=samples > 1,
                                 seed=seed, return_type="tokens", padding_side="left")
        for i, prompt in enumerate(group):
            text = _continuation(model, out[i, n_prompt:])
            rows.append({"coeff": float(coeff), "prompt": prompt, "sample": i % samples,
                         "continuation": text, "score": score(text)})
    return pd.DataFrame(rows)


def _continuation(model: Any, ids: torch.Tensor) -> str:
    """Generated ids as text, stopping at the first end-of-sequence token."""
    eos = getattr(model.tokenizer, "eos_token_id", None)
    ids_l = ids.tolist()
    if eos is not None and eos in ids_l:
        ids_l = ids_l[:ids_l.index(eos)]
    return str(model.to_string(ids_l)) if ids_l else ""
