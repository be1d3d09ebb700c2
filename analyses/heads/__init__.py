"""Head taxonomy: what does each attention head do?

Every score is streamed over batches with running sums (memory does not grow with the corpus)
from ``blocks.{l}.attn.hook_pattern`` alone: forward hooks reduce each layer's pattern
[batch, head, q, k] to per-head sums on the fly and keep nothing, so only the hooked layers
run the eager kernel. Any model with our hook names works (decoder or encoder).

Scores (columns of :func:`analyze`'s ``heads`` frame), with the work they come from:

- **Positional** (Voita et al. 2019, *Analyzing Multi-Head Self-Attention: Specialized Heads Do
  the Heavy Lifting, the Rest Can Be Pruned*, ACL, sec. 4.1: positional when "at least 90% of
  the time its maximum attention weight is assigned to a specific relative position"). The
  quantity is an argmax share, as in the paper, not a mean attention mass: ``top_offset_{o}``
  is the share of queries whose most-attended key sits at relative offset o in -3..+3, taken
  over the queries *where offset o is possible* (a real query, not padding and not a special
  token's row such as [CLS], [SEP] or BOS, whose key q + o exists, is visible and is not a sink),
  so a head that attends to the next token wherever there is one scores 1, not less for the last
  token of every sequence. The argmax runs over non-sink keys (attention parked on the first or
  a special token is a no-op, not a position; our departure from the paper, whose models had no
  such tokens). A head is positional when one offset takes at least 90%
  (``positional_share`` at ``positional_offset``, over ``positional_n`` queries).
  ``attn_offset_{o}`` is the mean attention weight at offset o over the real queries whose key
  q + o exists; ``prev_token`` = ``attn_offset_-1``. ``mode_offset`` / ``mode_share``: the most
  frequent argmax offset at any distance up to 32 and its share of all queries (a fixed long
  offset is reported, not labelled).
- **Induction, duplicate-token** (Olsson et al. 2022, *In-context Learning and Induction
  Heads*, Transformer Circuits Thread): on sequences ``x1..xn x1..xn`` of distinct random tokens,
  ``induction`` (prefix matching) is the mean attention from a second-copy token to the token
  after its first occurrence, ``duplicate`` the mean attention to the first occurrence itself;
  ``rand_prev_token`` and ``rand_first`` are the previous-token and first-token attention on
  the same sequences. ``copying`` is the OV circuit's eigenvalue score sum(l)/sum(|l|) of
  W_E W_V W_O W_U (Elhage et al. 2021, *A Mathematical Framework for Transformer Circuits*;
  computed as the equal non-zero spectrum of the d_head x d_head cyclic product, norm gains
  folded in), where the model has an unembedding.
- **Sinks and delimiters** (Clark et al. 2019, *What Does BERT Look At?*, BlackboxNLP; Xiao et
  al. 2024, *Efficient Streaming Language Models with Attention Sinks*, ICLR): mean attention
  share to the first token (``sink_first``), to BOS, [CLS], [SEP] tokens anywhere, to any
  special token, and to punctuation (``punct``). ``sink`` is the largest of first/BOS/[CLS]/[SEP].
- **Range**: with the sink mass (first and special tokens) removed and the rest renormalised,
  the mean attention distance |q - k| (``mean_distance``; ``distance_ratio`` divides it by what
  a uniform head over the same keys would give), the entropy (nats) and ``entropy_norm`` (the
  entropy over log of the number of visible keys: 1 = uniform). Clark et al. 2019 sec. 3.
- **Syntactic** (Clark et al. 2019, sec. 4.2): word-level attention (rows averaged over the
  query word's pieces, columns summed over the key word's pieces, special tokens and the word
  itself ignored); for each relation and direction, accuracy = share of pairs whose
  most-attended word is the gold partner, against the best fixed offset in -3..+3. A head is
  syntactic for a relation when it beats that baseline by >= 10 points on >= ``syntax_min_n``
  pairs, the margin being >= 3 standard errors (a guard against the many relation x head
  comparisons on small corpora); punctuation, root and dep never make a label. See
  :func:`syntax_table`.
- **Semantic** (our operationalisation, stated so it can be checked): ``semantic`` is the
  partial correlation between the attention weight a(q, k) and the cosine similarity of the
  two tokens' static input embeddings W_E, controlling for relative position (relative offset
  as a fixed effect: the pooled within-offset correlation, Frisch-Waugh-Lovell), over pairs of
  distinct token ids, excluding self, sink, special and punctuation keys. It asks whether a
  head attends to *similar content* more than its positional habit explains, the property
  Clark et al. 2019 (sec. 5, coreference) and Vig and Belinkov 2019 (*Analyzing the Structure
  of Attention in a Transformer Language Model*, BlackboxNLP) probe with labelled properties;
  identical tokens are left to the duplicate-token score.

Labels (:func:`classify`), first rule that holds, by specificity: induction, duplicate-token,
previous-token, next-token / positional, syntactic:<relation>, semantic, sink, local,
long-range, uniform, else unclassified. A positional head is named by its offset: -1
``previous-token`` (which also fires on a mean attention to i-1 >= 0.4), +1 ``next-token``,
any other ``positional`` (:func:`positional_label`). ``confidence`` is the score that fired the
rule (a share or accuracy in 0..1); for ``unclassified`` it is 1 minus the strongest score
relative to its threshold. Every rule that holds is listed in ``criteria``.

The package, in reading order: ``batches`` (vocabulary facts and the three kinds of batch),
``scan`` (the streaming driver and accumulator interface), ``token_stats`` (positional, sink,
range, semantic), ``induction`` (repeated random tokens, OV copying), ``syntactic`` (Clark et
al.'s word-level accuracy), ``classify`` (labels and summary tables), ``analyze`` (the one
call).
"""

from __future__ import annotations

from analyses.heads.analyze import HeadAnalysis, analyze, compare
from analyses.heads.batches import (
    RelationIndex,
    TokenBatch,
    VocabInfo,
    random_batches,
    sentence_batches,
    token_batches,
)
from analyses.heads.classify import (
    NOT_SYNTACTIC,
    POSITIONAL_NAMES,
    THRESHOLDS,
    Thresholds,
    classify,
    layer_table,
    positional_label,
    syntax_table,
)
from analyses.heads.induction import RepeatStats, copying_scores, induction_scores
from analyses.heads.scan import (
    DIRECTIONS,
    MODE_MAX_OFFSET,
    OFFSETS,
    SEMANTIC_MAX_OFFSET,
    Accumulator,
    scan,
)
from analyses.heads.syntactic import SyntaxStats
from analyses.heads.token_stats import TokenStats
from interp.progress import Progress

__all__ = [
    "DIRECTIONS",
    "MODE_MAX_OFFSET",
    "NOT_SYNTACTIC",
    "OFFSETS",
    "POSITIONAL_NAMES",
    "SEMANTIC_MAX_OFFSET",
    "THRESHOLDS",
    "Accumulator",
    "HeadAnalysis",
    "Progress",
    "RelationIndex",
    "RepeatStats",
    "SyntaxStats",
    "Thresholds",
    "TokenBatch",
    "TokenStats",
    "VocabInfo",
    "analyze",
    "classify",
    "compare",
    "copying_scores",
    "induction_scores",
    "layer_table",
    "positional_label",
    "random_batches",
    "scan",
    "sentence_batches",
    "syntax_table",
    "token_batches",
]
