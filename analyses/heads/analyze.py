"""The one call: score and label every head of a model, or of several side by side.

:func:`analyze` streams the chosen corpus (parsed sentences, plain text, or only repeated
random tokens) through :func:`analyses.heads.scan.scan` with the accumulators of each score
family, merges the per-head frames, adds the weight-based copying score and the labels
(:func:`analyses.heads.classify.classify`). Methods and papers: :mod:`analyses.heads`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analyses import distributed
from analyses.heads.batches import (
    RelationIndex,
    VocabInfo,
    random_batches,
    sentence_batches,
    token_batches,
)
from analyses.heads.classify import THRESHOLDS, Thresholds, classify, layer_table, syntax_table
from analyses.heads.induction import RepeatStats, copying_scores
from analyses.heads.scan import Accumulator, check_model, scan
from analyses.heads.syntactic import SYNTAX_COLUMNS, SyntaxStats
from analyses.heads.token_stats import TokenStats
from analyses.parses import Sentence
from interp import HookedTransformer
from interp.errors import InterpError
from interp.progress import Progress

__all__ = ["HeadAnalysis", "analyze", "compare"]


@dataclass
class HeadAnalysis:
    """What :func:`analyze` returns: tidy frames and what they were computed on."""

    heads: pd.DataFrame  # one row per (layer, head): label, confidence, criteria, every score
    syntax: pd.DataFrame  # SYNTAX_COLUMNS: relation, direction, layer, head, accuracy, ...
    best_syntax: pd.DataFrame  # syntax_table(syntax)
    layers: pd.DataFrame  # layer_table(heads)
    info: dict = field(default_factory=dict)


def _scan_corpus(model: HookedTransformer, tok_acc: TokenStats, rel: RelationIndex, *,
                 sentences: Iterable[Sentence] | None, texts: Iterable[str] | None,
                 batch_size: int, max_tokens: int | None, progress: Progress | None,
                 info: dict[str, Any]) -> SyntaxStats | None:
    """Feed the parsed sentences or the plain texts (if any) to the token and syntax sums."""
    if sentences is not None:
        syn_acc = SyntaxStats(model, rel)
        batches = sentence_batches(model, sentences, batch_size=batch_size,
                                   max_tokens=max_tokens, relations=rel)
        n = scan(model, distributed.shard(batches), [tok_acc, syn_acc], progress=progress,
                 desc="parsed sentences")
        if distributed.sum_values([n])[0] == 0:
            raise InterpError("The text holds no sentences to analyse; pass a non-empty --text "
                              "or --conllu file.")
        info.update(source="parsed sentences", n_pairs=syn_acc.n_pairs)
        return syn_acc
    if texts is not None:
        batches = token_batches(model, texts, batch_size=batch_size, max_tokens=max_tokens)
        n = scan(model, distributed.shard(batches), [tok_acc], progress=progress, desc="text")
        if distributed.sum_values([n])[0] == 0:
            raise InterpError("The text is empty; pass a file with some text in it.")
        info.update(source="text")
    return None


def analyze(model: HookedTransformer, *, sentences: Iterable[Sentence] | None = None,
            texts: Iterable[str] | None = None, n_random: int = 64, half_len: int | None = None,
            batch_size: int = 16, max_tokens: int | None = None, seed: int = 0,
            semantic: bool = True, thresholds: Thresholds = THRESHOLDS,
            progress: Progress | None = None) -> HeadAnalysis:
    """Score and label every head of ``model``.

    ``sentences`` (parsed, e.g. :func:`analyses.parses.read_conllu`) give the token-level and
    the syntactic scores; ``texts`` (plain) give only the token-level ones; with neither, the
    token-level scores come from the repeated random tokens (all a model without a text
    tokenizer can read). Repeated random tokens always give the induction scores. Everything
    streams: memory is independent of the corpus size. Under a process group (torchrun,
    ``interp --nproc``) each rank scans every ``size``-th batch and the sums are added over
    the ranks before any ratio is taken (:mod:`analyses.distributed`): the same numbers.
    """
    check_model(model)
    if model.cfg.architecture == "encoder_decoder":
        raise InterpError("The head taxonomy covers decoder and encoder models, not "
                          "encoder-decoder ones.")
    if n_random < 1:
        raise InterpError(f"n_random must be >= 1, got {n_random}.")
    vocab = VocabInfo.from_model(model)
    info: dict[str, Any] = {}
    tok_acc = TokenStats(model, vocab, semantic=semantic)
    syn_acc = _scan_corpus(model, tok_acc, RelationIndex(), sentences=sentences, texts=texts,
                           batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                           info=info)
    rep_acc = RepeatStats(model)
    corpus = sentences is not None or texts is not None
    accs: list[Accumulator] = [rep_acc] if corpus else [rep_acc, tok_acc]
    randoms = random_batches(model, n_seqs=n_random, half_len=half_len, batch_size=batch_size,
                             seed=seed, vocab=vocab)
    world = distributed.world()
    n_batches = math.ceil(n_random / batch_size)
    scan(model, distributed.shard(randoms), accs, progress=progress,
         desc="repeated random tokens", total=len(range(world.rank, n_batches, world.size)))
    for acc in (tok_acc, rep_acc, *([syn_acc] if syn_acc is not None else [])):
        acc.reduce()  # sums over the ranks of a distributed run (analyses.distributed)
    if syn_acc is not None:
        info["n_pairs"] = syn_acc.n_pairs  # the total over the ranks
    if not corpus:
        info.update(source="repeated random tokens")
    info.update(n_tokens=tok_acc.n_tokens, n_sequences=tok_acc.n_seqs, n_random=rep_acc.n_seqs,
                random_half_len=rep_acc.n)
    keys = ["layer", "head"]
    heads = tok_acc.frame().merge(rep_acc.frame(), on=keys).merge(copying_scores(model), on=keys)
    syntax = syn_acc.frame() if syn_acc is not None else pd.DataFrame(columns=SYNTAX_COLUMNS)
    heads = classify(heads, syntax, thresholds)
    info["thresholds"] = dataclasses.asdict(thresholds)
    best = syntax_table(syntax) if len(syntax) else syntax_table(syntax.iloc[0:0])
    return HeadAnalysis(heads=heads, syntax=syntax, best_syntax=best, layers=layer_table(heads),
                        info=info)


def compare(models: Mapping[str, HookedTransformer], **kwargs: Any) -> pd.DataFrame:
    """:func:`analyze` each model (same inputs, same seed) and stack the heads frames with a
    ``model`` column: the side-by-side taxonomy of, e.g., one task trained under sinusoidal,
    learned, RoPE and ALiBi positions."""
    if not models:
        raise InterpError("compare needs at least one model.")
    frames = []
    for name, model in models.items():
        h = analyze(model, **kwargs).heads
        h.insert(0, "model", name)
        h.insert(1, "positional_encoding", model.cfg.positional)
        frames.append(h)
    return pd.concat(frames, ignore_index=True)
