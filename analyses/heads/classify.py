"""Head labels from scores, and the summary tables.

:func:`classify` tries the rules in order of specificity and gives a head the first that
holds: induction, duplicate-token, previous-token, next-token / positional,
syntactic:<relation>, semantic, sink, local, long-range, uniform, else unclassified.
``confidence`` is the score that fired the rule (a share or accuracy in 0..1); for
``unclassified`` it is 1 minus the strongest score relative to its threshold. Every rule that
holds is listed in ``criteria``. Thresholds follow the cited papers where they give one: Voita
et al. 2019 (positional: the maximum attention at one relative position for at least 90% of the
queries, the argmax share ``positional_share`` taken over the queries where that offset is
possible, see :mod:`analyses.heads.token_stats`), Olsson et al. 2022 (induction needs prefix
matching and copying), Clark et al. 2019 (syntactic: beat the best fixed offset).

A positional head is named by its offset (:func:`positional_label`): ``previous-token`` at -1,
``next-token`` at +1, ``positional`` at any other offset (which one: ``positional_offset``).
The previous-token rule also fires on the mean attention to i-1 (``prev_token`` or
``rand_prev_token`` >= 0.4, a softer rule, as ARENA's); next-token and the other offsets fire
only on Voita's argmax share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analyses.parses import RELATIONS

__all__ = ["NOT_SYNTACTIC", "POSITIONAL_NAMES", "THRESHOLDS", "Thresholds", "classify",
           "layer_table", "positional_label", "syntax_table"]

# Relations never used for a syntactic label (still in the syntax table): attention to
# punctuation is the delimiter behaviour measured by the ``punct`` share (Clark et al. sec. 3),
# and root/dep are not relations between two words.
NOT_SYNTACTIC = ("punct", "root", "dep")

# The label of a positional head by its offset; any other offset is "positional".
POSITIONAL_NAMES = {-1: "previous-token", 1: "next-token"}


def positional_label(offset: float) -> str:
    """``previous-token`` (-1), ``next-token`` (+1), else ``positional``."""
    if not np.isfinite(offset):
        return "positional"
    return POSITIONAL_NAMES.get(int(offset), "positional")


@dataclass(frozen=True)
class Thresholds:
    """Where a score becomes a label. Defaults follow the cited papers where they give one."""

    # Voita et al. 2019: the maximum attention at one relative position for >= 90% of the
    # queries (argmax share over the queries where that offset is possible)
    positional: float = 0.9
    prev_token: float = 0.4  # mean attention to i-1 (softer previous-token rule, as ARENA's)
    induction: float = 0.3  # prefix-matching attention on repeated random tokens
    duplicate: float = 0.3
    sink: float = 0.5  # half of all attention on the first / special tokens
    syntax_margin: float = 0.10  # accuracy minus best fixed-offset baseline (Clark et al.)
    syntax_min_n: int = 50  # pairs a relation needs before a head is called syntactic for it
    syntax_z: float = 3.0  # and the margin must be this many standard errors (two-proportion z)
    semantic: float = 0.3  # within-offset correlation of attention with embedding similarity
    local: float = 0.5  # distance_ratio at or below: local
    long_range: float = 1.5  # distance_ratio at or above: long-range
    uniform: float = 0.9  # entropy_norm at or above: uniform (broad) attention


THRESHOLDS = Thresholds()


def _best_syntax(syntax: pd.DataFrame | None, th: Thresholds) -> pd.DataFrame | None:
    """Per head, the (relation, direction) with the largest margin among well-sampled ones."""
    if syntax is None or not len(syntax):
        return None
    s = syntax[(syntax["n"] >= th.syntax_min_n) & ~syntax["relation"].isin(NOT_SYNTACTIC)]
    if not len(s):
        return None
    return s.loc[s.groupby(["layer", "head"])["margin"].idxmax()].set_index(["layer", "head"])


def _rules(r: Any, sx: Any, th: Thresholds) -> list[tuple[str, float, float]]:
    """Every rule's (label, confidence, strength); strength >= 1 means the rule holds.

    Strength is the score over its threshold (or threshold over score for "at most" rules),
    so rules of different units compare on one scale for the unclassified confidence."""
    out: list[tuple[str, float, float]] = []

    def add(label: str, value: float, threshold: float, conf: float | None = None,
            above: bool = True) -> None:
        if value is None or not np.isfinite(value):
            return
        strength = value / threshold if above else (threshold / value if value > 0 else np.inf)
        out.append((label, float(value if conf is None else conf), float(strength)))

    def g(name: str) -> float:
        return float(getattr(r, name, np.nan))

    ind, copying = g("induction"), g("copying")
    # Olsson et al. define induction heads by prefix matching *and* copying: without copying
    # (copying score <= 0 where it can be measured) the label stays, at half the confidence
    add("induction", ind, th.induction, ind * 0.5 if np.isfinite(copying) and copying <= 0 else ind)
    add("duplicate-token", g("duplicate"), th.duplicate)
    prev = np.nanmax([g("prev_token"), g("rand_prev_token"), -np.inf])
    pos_off, pos_share = g("positional_offset"), g("positional_share")
    pos_name = positional_label(pos_off)
    prev_share = pos_share if pos_name == "previous-token" else 0.0
    strength = max(prev_share / th.positional, prev / th.prev_token)
    if np.isfinite(strength):
        out.append(("previous-token", float(max(prev_share, prev)), float(strength)))
    if pos_name != "previous-token":  # next-token (+1) or positional (another offset)
        add(pos_name, pos_share, th.positional)
    if sx is not None:
        acc, base, n = float(sx["accuracy"]), float(sx["baseline_accuracy"]), float(sx["n"])
        se = math.sqrt(max(acc * (1 - acc) + base * (1 - base), 1.0 / n) / n)
        margin = float(sx["margin"])
        strength = min(margin / th.syntax_margin, margin / se / th.syntax_z)
        out.append((f"syntactic:{sx['relation']}", acc, strength))
    add("semantic", g("semantic"), th.semantic)
    add("sink", g("sink"), th.sink)
    ratio, entn = g("distance_ratio"), g("entropy_norm")
    if np.isfinite(entn) and entn < th.uniform:
        add("local", ratio, th.local, 1.0 - ratio, above=False)
        add("long-range", ratio, th.long_range, min(1.0, ratio / (2 * th.long_range)))
    add("uniform", entn, th.uniform)
    return out


_SX = {"syntax_relation": "relation", "syntax_direction": "direction",
       "syntax_accuracy": "accuracy", "syntax_baseline": "baseline_accuracy",
       "syntax_margin": "margin"}


def _label_rows(df: pd.DataFrame, syntax: pd.DataFrame | None, th: Thresholds) -> pd.DataFrame:
    best = _best_syntax(syntax, th)
    labels, confs, crits = [], [], []
    sx_cols: dict[str, list] = {k: [] for k in _SX}
    for r in df.itertuples(index=False):
        has = best is not None and (r.layer, r.head) in best.index
        sx = best.loc[(r.layer, r.head)] if has else None
        rules = _rules(r, sx, th)
        fired = [x for x in rules if x[2] >= 1.0]
        if fired:
            labels.append(fired[0][0])
            confs.append(round(float(np.clip(fired[0][1], 0, 1)), 6))
        else:
            labels.append("unclassified")
            strongest = max((x[2] for x in rules), default=0.0)
            confs.append(round(float(np.clip(1.0 - strongest, 0, 1)), 6))
        crits.append(";".join(x[0] for x in fired))
        for col, key in _SX.items():
            text = key in ("relation", "direction")
            if sx is None:
                sx_cols[col].append("" if text else np.nan)
            else:
                sx_cols[col].append(sx[key] if text else float(sx[key]))
    out = df.copy()
    out.insert(2, "label", labels)
    out.insert(3, "confidence", confs)
    out.insert(4, "criteria", crits)
    for k, v in sx_cols.items():
        out[k] = v
    return out


def classify(heads: pd.DataFrame, syntax: pd.DataFrame | None = None,
             thresholds: Thresholds = THRESHOLDS) -> pd.DataFrame:
    """Add ``label``, ``confidence``, ``criteria`` and the best syntactic relation to a heads
    frame.

    Rules are tried in order of specificity (module docstring); a head gets the first that
    holds, never a forced label: ``unclassified`` when none does.
    """
    for col in ("label", "confidence", "criteria"):
        if col in heads.columns:
            heads = heads.drop(columns=col)
    return _label_rows(heads.reset_index(drop=True), syntax, thresholds)


_BEST_COLUMNS = ("relation", "direction", "layer", "head", "accuracy", "baseline_accuracy",
                 "baseline_offset", "n", "margin")


def syntax_table(syntax: pd.DataFrame, relations: Iterable[str] = RELATIONS) -> pd.DataFrame:
    """Best head per relation (over both directions) against its fixed-offset baseline.

    Columns: relation, direction, layer, head, accuracy, baseline_accuracy, baseline_offset, n,
    margin; relations absent from the parse get a row of NaN with n = 0.
    """
    rows = []
    for rel in relations:
        s = syntax[syntax["relation"] == rel] if len(syntax) else syntax
        if not len(s):
            rows.append({"relation": rel, "direction": "", "layer": np.nan, "head": np.nan,
                         "accuracy": np.nan, "baseline_accuracy": np.nan,
                         "baseline_offset": np.nan, "n": 0, "margin": np.nan})
            continue
        r = s.loc[s["accuracy"].idxmax()]
        rows.append({k: r[k] for k in _BEST_COLUMNS})
    return pd.DataFrame(rows)


def layer_table(heads: pd.DataFrame) -> pd.DataFrame:
    """Mean over heads, per layer, of the attention shares to sinks and delimiters."""
    cols = [c for c in ("sink_first", "bos", "cls", "sep", "special", "punct", "rand_first",
                        "entropy_norm", "mean_distance") if c in heads.columns]
    return heads.groupby("layer", as_index=False)[cols].mean()
