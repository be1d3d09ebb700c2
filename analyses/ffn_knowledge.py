"""FFN knowledge storage: where does a decoder keep what it knows?

Four methods, each a pure function of a model and data that returns tidy DataFrames (no files,
no plots; :mod:`analyses.app.sections.ffn` draws and writes):

- **Key-value memories** (Geva, Schuster, Berant and Levy 2021, "Transformer Feed-Forward
  Layers Are Key-Value Memories", EMNLP): every FFN neuron is a key (its input weights) that
  fires on textual patterns and a value (its row of ``W_out``) that promotes tokens.
  :func:`kv_memories` streams a corpus and keeps, per neuron, its top-k activating contexts in
  bounded running top-k tensors (:class:`TopKContexts`); projects every value vector through
  the unembedding to the tokens it promotes and suppresses; and measures, per layer, how
  often a value's top token is the next token of its key's top trigger context, against a
  neuron-shuffled baseline (Geva et al. Sec. 4).
- **Knowledge neurons** (Dai, Dong, Hao, Sui, Chang and Wei 2022, "Knowledge Neurons in
  Pretrained Transformers", ACL): :func:`integrated_gradients` attributes the answer
  probability to FFN intermediate activations (``mlp.hook_post``) at the prediction position,
  one layer at a time (zero baseline, Riemann sum batched over steps);
  :func:`knowledge_neurons` keeps neurons above 0.2 x the prompt's maximum attribution,
  refines them across paraphrases (kept by >= 70% of a fact's prompts), and drops neurons that
  other facts (with other answers) also select; :func:`edit_knowledge_neurons` suppresses
  (x0) or amplifies (x2) them and reports the relative change of the answer probability for
  the fact and for unrelated facts (specificity).
- **Causal tracing** (Meng, Bau, Andonian and Belinkov 2022, "Locating and Editing Factual
  Associations in GPT", NeurIPS): :func:`causal_trace` corrupts the subject's token
  embeddings with Gaussian noise (3 x the embeddings' standard deviation, several samples) or
  by replacing the subject with another one of the same token length (symmetric token
  replacement, Zhang and Nanda 2024, "Towards Best Practices of Activation Patching in
  Language Models: Metrics and Methods", ICLR), then restores the clean state at each
  (layer, position) for the residual stream, the MLP output and the attention output (MLP and
  attention over a window of layers around the centre, and MLP one layer alone beside it);
  the indirect effect is P(answer | restored) - P(answer | corrupted).
- **Logit lens** (nostalgebraist 2020, "interpreting GPT: the logit lens", LessWrong):
  :func:`logit_lens` reads every layer's residual stream through the final norm and the
  unembedding: rank and probability of the answer, and KL(final || layer).

Facts are JSONL files (``prompt``, ``subject``, ``answer``, optional ``paraphrases`` and
``relation``; :func:`load_facts`); ``analyses/data/facts.jsonl`` ships 114 written for this
project. Models trained on ``knowledge`` (:mod:`interp.train`) bring their own facts
(:func:`facts_for_model`). Only facts the model gets right are analysed (:func:`known_facts`).

Speed: restorations are batched (every (kind, layer) patch of a position in one forward),
start at the first restored layer from the cached corrupted stream (``start_at_layer``), and
compute only positions at or after the restored one, reading earlier positions' keys and
values from the corrupted run's KV cache (a causal model's earlier positions cannot change).
Integrated gradients likewise run only the prediction position from the attributed layer on.

>>> import analyses.ffn_knowledge as fk
>>> len(fk.load_facts(fk.default_facts_path())) >= 60
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from interp.errors import InterpError

__all__ = [
    "DAI_AMPLIFY",
    "DAI_SUPPRESS",
    "Fact",
    "IGResult",
    "KVMemories",
    "PreparedFact",
    "TopKContexts",
    "average_trace",
    "causal_trace",
    "check_model",
    "corpus_batches",
    "default_facts_path",
    "default_window",
    "edit_knowledge_neurons",
    "facts_for_model",
    "fact_predictions",
    "integrated_gradients",
    "kv_memories",
    "known_facts",
    "knowledge_neurons",
    "load_facts",
    "refined_neurons",
    "logit_lens",
    "prepare_facts",
    "summarize_edits",
    "trigger_table",
]

# Dai et al. 2022, Fig. 3/4: mean relative change of the correct answer's probability when
# their knowledge neurons are suppressed (-29.03%) or amplified (+31.17%), BERT-base.
DAI_SUPPRESS = -0.2903
DAI_AMPLIFY = 0.3117

POSITION_ROLES = ("subject_first", "subject_middle", "subject_last", "subsequent_first",
                  "subsequent_further", "last")
TRACE_KINDS = ("resid", "mlp", "attn")
_HOOK_OF_KIND = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}

Progress = Callable[..., Iterable]


def _no_progress(iterable: Iterable, desc: str = "", total: int | None = None) -> Iterable:
    return iterable


# =============================================================================================
# facts
# =============================================================================================
@dataclass(frozen=True)
class Fact:
    """One fact as text: the model should continue ``prompt`` with ``answer``.

    ``subject`` must occur in ``prompt`` (causal tracing corrupts it). ``paraphrases`` are
    other prompts asking for the same answer (knowledge-neuron refinement, Dai et al. 2022).
    ``line`` is the 1-based line of the facts file it came from (for error messages).
    """

    prompt: str
    subject: str
    answer: str
    paraphrases: tuple[str, ...] = ()
    relation: str | None = None
    line: int | None = None


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


def default_facts_path() -> Path:
    """``analyses/data/facts.jsonl``: 114 facts written for this project (capitals, official
    languages, currencies, landmarks, makers, athletes' sports, continents, authors), each
    with two paraphrases."""
    return Path(__file__).resolve().parent / "data" / "facts.jsonl"


def load_facts(path: str | Path) -> list[Fact]:
    """Read a JSONL facts file: one object per line with string ``prompt``, ``subject``,
    ``answer``; optional ``paraphrases`` (list of strings) and ``relation``. Blank lines and
    lines starting with ``#`` are skipped. Any problem raises :class:`InterpError` naming
    the line."""
    path = Path(path)
    if not path.is_file():
        raise InterpError(f"Facts file {str(path)!r} does not exist; pass a JSONL file with prompt, subject, answer per line.")
    facts: list[Fact] = []
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path.name} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InterpError(f"{where}: not valid JSON ({e.msg}); each line must be one object with prompt, subject, answer.") from None
            if not isinstance(obj, dict):
                raise InterpError(f"{where}: expected a JSON object with prompt, subject, answer, got {type(obj).__name__}.")
            for key in ("prompt", "subject", "answer"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise InterpError(f"{where}: {key!r} must be a non-empty string.")
            paras = obj.get("paraphrases", [])
            if not isinstance(paras, list) or any(not isinstance(p, str) or not p.strip() for p in paras):
                raise InterpError(f"{where}: 'paraphrases' must be a list of non-empty strings.")
            relation = obj.get("relation")
            if relation is not None and not isinstance(relation, str):
                raise InterpError(f"{where}: 'relation' must be a string.")
            prompt = obj["prompt"].rstrip()
            if obj["subject"] not in prompt:
                raise InterpError(f"{where}: subject {obj['subject']!r} does not occur in prompt {prompt!r}; write it exactly as in the prompt.")
            facts.append(Fact(prompt=prompt, subject=obj["subject"], answer=obj["answer"].strip(),
                              paraphrases=tuple(p.rstrip() for p in paras), relation=relation, line=n))
    if not facts:
        raise InterpError(f"Facts file {str(path)!r} holds no facts; add lines like {{\"prompt\": ..., \"subject\": ..., \"answer\": ...}}.")
    return facts


def _task_name(model: Any) -> str | None:
    task = getattr(model.cfg, "extra", {}).get("task")
    return task.get("name") if isinstance(task, dict) else None


def facts_for_model(model: Any) -> list[Any]:
    """The facts to use by default: a ``knowledge`` model's own knowledge base
    (``interp.train.knowledge_facts``), otherwise the shipped text facts."""
    if _task_name(model) == "knowledge":
        from interp.train import knowledge_facts

        return list(knowledge_facts(model))
    return load_facts(default_facts_path())


def check_model(model: Any, *, need_tokenizer: bool = False) -> None:
    """Raise :class:`InterpError` unless ``model`` is a decoder with an unembedding and at
    least one dense FFN layer (every method here reads next-token probabilities)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise InterpError("FFN knowledge analyses need an interp.HookedTransformer.")
    if not cfg.has_unembed or not hasattr(model, "unembed"):
        raise InterpError("This model has no unembedding (a bare encoder such as minilm); FFN knowledge analyses need a language model with a vocabulary head, e.g. smollm2-135m.")
    if cfg.architecture != "decoder":
        raise InterpError(f"FFN knowledge analyses need a decoder (causal language model), not a {cfg.architecture} model.")
    if not dense_layers(model):
        raise InterpError("This model has no dense FFN layer (attention-only or all mixture-of-experts); nothing to analyse.")
    if need_tokenizer and getattr(model, "tokenizer", None) is None:
        raise InterpError("Text facts need the model's tokenizer; load the model with interp.load_pretrained.")


def dense_layers(model: Any) -> list[int]:
    """Layers whose FFN is dense (has ``mlp.hook_post``)."""
    return [i for i, b in enumerate(model.blocks) if hasattr(getattr(b, "mlp", None), "hook_post")]


def _encode(model: Any, text: str) -> list[int]:
    return [int(i) for i in model.to_tokens(text)[0].tolist()]


def _char_span_to_tokens(model: Any, ids: list[int], start: int, end: int, text: str) -> tuple[int, int] | None:
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


def _subject_span(model: Any, ids: list[int], prompt: str, subject: str, where: str) -> tuple[int, int]:
    start = prompt.find(subject)
    if start < 0:
        raise InterpError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; write it exactly as in the prompt.")
    span = _char_span_to_tokens(model, ids, start, start + len(subject), prompt)
    if span is None:  # fall back: the subject's own tokens as a sub-sequence of the prompt's
        for variant in (" " + subject, subject):
            sub = model.tokenizer.encode(variant, add_special_tokens=False)
            for i in range(len(ids) - len(sub) + 1):
                if sub and ids[i:i + len(sub)] == sub:
                    return i, i + len(sub)
        raise InterpError(f"{where}: cannot find the tokens of subject {subject!r} in prompt {prompt!r}.")
    return span


def _answer_id(model: Any, prompt_ids: list[int], prompt: str, answer: str) -> int:
    """First token of the answer as the model would write it after the prompt."""
    full = _encode(model, prompt + " " + answer)
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids)]
    ids = model.tokenizer.encode(" " + answer, add_special_tokens=False) or model.tokenizer.encode(answer, add_special_tokens=False)
    return int(ids[0])


def prepare_facts(model: Any, facts: Sequence[Any]) -> list[PreparedFact]:
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
            out.append(PreparedFact(name=f"{f.subject} {f.relation}", prompt=f.prompt, subject=f.subject, answer=f.object,
                                    answer_id=int(f.answer), tokens=tokens, subject_span=tuple(f.subject_span),
                                    relation=f.relation))
            continue
        if not isinstance(f, Fact):
            raise InterpError(f"Fact {i} is a {type(f).__name__}; pass analyses.ffn_knowledge.Fact objects or load_facts(path).")
        check_model(model, need_tokenizer=True)
        where = f"fact {i}" + (f" (line {f.line})" if f.line else "")
        ids = _encode(model, f.prompt)
        span = _subject_span(model, ids, f.prompt, f.subject, where)
        if span[0] >= span[1]:
            raise InterpError(f"{where}: subject {f.subject!r} covers no token of prompt {f.prompt!r}.")
        answer_id = _answer_id(model, ids, f.prompt, f.answer)
        paras = tuple(tuple(_encode(model, p)) for p in f.paraphrases)
        out.append(PreparedFact(name=f"{f.subject} -> {f.answer}", prompt=f.prompt, subject=f.subject, answer=f.answer,
                                answer_id=answer_id, tokens=tuple(ids), subject_span=span, paraphrase_tokens=paras,
                                relation=f.relation))
    return out


# =============================================================================================
# shared machinery
# =============================================================================================
def _unembed(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Final (already normed) residual -> logits, as the model's own forward does it."""
    if model.cfg.logit_scale != 1.0:
        x = x * model.cfg.logit_scale
    if hasattr(model, "mlm_head"):
        x = model.mlm_head(x)
    return model.unembed(x).float()


def _final_norm(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model.ln_final(x) if hasattr(model, "ln_final") else x


def _pad(seqs: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [batch, pos], attention mask and the last real position per row."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return tokens.to(device), mask.to(device), last.to(device)


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return 0 if pad is None else int(pad)


def _token_str(model: Any, token_id: int) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return str(int(token_id))
    return tok.decode([int(token_id)])


@torch.no_grad()
def _last_probs(model: Any, seqs: Sequence[Sequence[int]], fwd_hooks: list | None = None,
                batch_size: int = 32) -> torch.Tensor:
    """Next-token distributions at each sequence's last position [n, d_vocab] (float)."""
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        tokens, mask, last = _pad(chunk, _pad_id(model), model.device)
        with model.hooks(fwd_hooks=fwd_hooks or []):
            hidden = model(tokens, attention_mask=mask, return_type="hidden")
        out.append(torch.softmax(_unembed(model, hidden[torch.arange(len(chunk)), last]), -1))
    return torch.cat(out)


def fact_predictions(model: Any, facts: Sequence[PreparedFact], batch_size: int = 32) -> pd.DataFrame:
    """One row per fact: its answer's probability and rank, the model's top token, and
    ``known`` (the answer's first token is the top prediction)."""
    probs = _last_probs(model, [f.tokens for f in facts], batch_size=batch_size)
    rows = []
    for f, p in zip(facts, probs, strict=True):
        pa = float(p[f.answer_id])
        top = int(p.argmax())
        rows.append({"fact": f.name, "relation": f.relation, "prompt": f.prompt, "subject": f.subject,
                     "answer": f.answer, "answer_prob": pa, "answer_rank": int((p > p[f.answer_id]).sum()) + 1,
                     "top_token": _token_str(model, top), "top_prob": float(p[top]), "known": top == f.answer_id})
    return pd.DataFrame(rows)


def known_facts(model: Any, facts: Sequence[PreparedFact], batch_size: int = 32) -> tuple[list[PreparedFact], pd.DataFrame]:
    """The facts the model gets right (greedy next token = the answer's first token, as Meng
    et al.'s "known" set), and the full prediction table."""
    table = fact_predictions(model, facts, batch_size)
    return [f for f, k in zip(facts, table["known"], strict=True) if k], table


# =============================================================================================
# logit lens
# =============================================================================================
@torch.no_grad()
def logit_lens(model: Any, facts: Sequence[PreparedFact], batch_size: int = 16) -> pd.DataFrame:
    """Logit lens (nostalgebraist 2020): each layer's residual stream at the prediction
    position, read through the final norm and the unembedding.

    Columns: ``fact, layer`` (-1 = the embeddings, l = after block l), ``answer_prob``,
    ``answer_rank`` (1 = top), ``kl_to_final`` (KL(final || layer) in nats), ``top_token``.
    """
    check_model(model)
    L = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
    rows = []
    for s in range(0, len(facts), batch_size):
        chunk = facts[s:s + batch_size]
        tokens, mask, last = _pad([f.tokens for f in chunk], _pad_id(model), model.device)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type=None, names_filter=lambda n: n in names)
        idx = torch.arange(len(chunk))
        stack = torch.stack([cache[n][idx, last] for n in names])  # [L+1, batch, d_model]
        logp = torch.log_softmax(_unembed(model, _final_norm(model, stack)), -1)  # [L+1, batch, vocab]
        final = logp[-1]
        kl = (final.exp() * (final - logp)).sum(-1)  # [L+1, batch]
        for b, f in enumerate(chunk):
            lp = logp[:, b]
            ans = lp[:, f.answer_id]
            ranks = (lp > ans[:, None]).sum(-1) + 1
            tops = lp.argmax(-1)
            for layer in range(L + 1):
                rows.append({"fact": f.name, "layer": layer - 1, "answer_prob": float(ans[layer].exp()),
                             "answer_rank": int(ranks[layer]), "kl_to_final": max(float(kl[layer, b]), 0.0),
                             "top_token": _token_str(model, int(tops[layer]))})
    return pd.DataFrame(rows)


# =============================================================================================
# causal tracing
# =============================================================================================
def default_window(n_layers: int) -> int:
    """Layers restored together for MLP/attention: Meng et al. used 10 of GPT-2 XL's 48;
    smaller models get min(10, n_layers // 3 + 1) so a window never spans most of the model."""
    return max(1, min(10, n_layers // 3 + 1))


def _window_layers(centre: int, window: int, n_layers: int) -> range:
    """Meng et al.'s window: ``window`` layers centred on ``centre``, clipped to the model."""
    return range(max(0, centre - window // 2), min(n_layers, centre - (-window // 2)))


def _position_role(p: int, span: tuple[int, int], n: int) -> str:
    s0, s1 = span
    if s0 <= p < s1:
        if p == s1 - 1:
            return "subject_last"
        return "subject_first" if p == s0 else "subject_middle"
    if p == n - 1:
        return "last"
    return "subsequent_first" if p == s1 else "subsequent_further"


def _kv_rows(cache: Any, rows: torch.Tensor, upto: int) -> Any:
    """A fresh KV cache holding rows ``rows`` of ``cache``'s first ``upto`` positions."""
    if upto == 0:
        return None
    from interp import KVCache

    new = KVCache(len(cache.layers))
    for src, dst in zip(cache.layers, new.layers, strict=True):
        dst.k, dst.v = src.k[rows, :upto], src.v[rows, :upto]
    return new


def _subject_embed_std(model: Any, facts: Sequence[PreparedFact]) -> float:
    """Std of the subjects' token embeddings (Meng et al.'s ``collect_embedding_std``)."""
    ids = torch.tensor(sorted({t for f in facts for t in f.tokens[f.subject_span[0]:f.subject_span[1]]}),
                       device=model.device)
    return float(model.W_E.detach()[ids].float().std())


def _replacements(f: PreparedFact, facts: Sequence[PreparedFact], n: int, gen: torch.Generator) -> list[tuple[int, ...]]:
    """Up to ``n`` other subjects with the same token length, for symmetric token replacement
    (Zhang and Nanda 2024): subjects of ``facts`` other than ``f``'s, from facts with other answers."""
    length = f.subject_span[1] - f.subject_span[0]
    mine = f.tokens[f.subject_span[0]:f.subject_span[1]]
    pool, seen = [], set()
    for g in facts:
        sub = g.tokens[g.subject_span[0]:g.subject_span[1]]
        if len(sub) == length and sub != mine and g.answer_id != f.answer_id and sub not in seen:
            seen.add(sub)
            pool.append(sub)
    if not pool:
        return []
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [pool[j] for j in order[:n]]


@dataclass
class _Patch:
    kind: str  # resid / mlp / attn / mlp_single / attn_single
    layer: int  # centre layer (resid: the restored hook_resid_post)
    pos: int
    start: int  # first block that must run
    restore: tuple[int, ...]  # layers whose mlp/attn output is restored (empty for resid)
    hook: str | None  # hook_mlp_out / hook_attn_out


@torch.no_grad()
def _trace_one(model: Any, fact: PreparedFact, corrupted: torch.Tensor, noise: torch.Tensor | None,
               patches: list[_Patch], max_rows: int, merge_positions: bool) -> tuple[float, float, dict[int, float]]:
    """Clean prob, corrupted prob, and restored prob per patch (averaged over samples)."""
    L = model.cfg.n_layers
    S, T = corrupted.shape
    s0, s1 = fact.subject_span
    dev = model.device
    clean = torch.tensor([fact.tokens], device=dev)
    a = fact.answer_id

    need = {f"blocks.{i}.hook_resid_post" for i in range(L)}
    need |= {f"blocks.{i}.{h}" for p in patches if p.hook for i in p.restore for h in [p.hook]}
    hidden, cache = model.run_with_cache(clean, return_type="hidden", names_filter=lambda n: n in need)
    p_clean = float(torch.softmax(_unembed(model, hidden[0, -1]), -1)[a])

    from interp import KVCache

    kv = KVCache(L)
    pre_names = [f"blocks.{i}.hook_resid_pre" for i in range(L)]
    hooks = []
    if noise is not None:
        def add_noise(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()
            act[:, s0:s1] = act[:, s0:s1] + noise.to(act.dtype)
            return act
        hooks.append(("hook_embed", add_noise))
    corr_cache: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        corr_cache[hook.name] = act

    last_post = f"blocks.{L - 1}.hook_resid_post"
    hooks += [(n, keep) for n in [*pre_names, last_post]]
    with model.hooks(fwd_hooks=hooks):
        c_hidden = model(corrupted, past_kv=kv, return_type="hidden")
    # resid_in[l]: the corrupted stream entering block l; resid_in[L]: after the last block
    resid_in = [corr_cache[n] for n in [*pre_names, last_post]]
    p_corr = float(torch.softmax(_unembed(model, c_hidden[:, -1]), -1)[:, a].mean())

    # Rows sharing a start layer run together. With merge_positions, every position of the
    # fact is recomputed from the first restored one (bigger, more efficient batches);
    # otherwise each (start, position) group runs only positions >= its own.
    first_pos = min(p.pos for p in patches) if patches else 0
    groups: dict[tuple[int, int], list[int]] = {}
    for j, p in enumerate(patches):
        groups.setdefault((p.start, first_pos if merge_positions else p.pos), []).append(j)
    finals: list[torch.Tensor] = []
    order: list[int] = []
    samples = torch.arange(S, device=dev)
    for (start, pos), members in groups.items():
        width = max(1, max_rows // (S * (T - pos)))
        for c in range(0, len(members), width):
            chunk = members[c:c + width]
            n_rows = len(chunk) * S
            rows_sample = samples.repeat(len(chunk))  # row r uses sample r % S
            residual = resid_in[start][rows_sample, pos:].clone()  # [rows, T - pos, d_model]
            fwd: dict[str, list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
            for k, j in enumerate(chunk):
                p = patches[j]
                rows = torch.arange(k * S, (k + 1) * S, device=dev)
                if p.kind == "resid":
                    residual[rows, p.pos - pos] = cache[f"blocks.{p.layer}.hook_resid_post"][0, p.pos]
                else:
                    for layer in p.restore:
                        name = f"blocks.{layer}.{p.hook}"
                        fwd.setdefault(name, []).append((rows, p.pos - pos, cache[name][0, p.pos]))

            def make_hook(items: list[tuple[torch.Tensor, int, torch.Tensor]]) -> Callable:
                def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
                    act = act.clone()
                    for rows, at, value in items:
                        act[rows, at] = value
                    return act
                return hook

            past = _kv_rows(kv, rows_sample, pos)
            dummy = clean[:, pos:].expand(n_rows, -1)
            with model.hooks(fwd_hooks=[(n, make_hook(items)) for n, items in fwd.items()]):
                out = model(dummy, past_kv=past, start_at_layer=start, residual=residual, return_type="hidden")
            finals.append(out[:, -1])
            order += chunk
    # one large unembedding for every restored run (more efficient than many small ones)
    final = torch.cat(finals)
    probs = torch.cat([torch.softmax(_unembed(model, final[c:c + 1024]), -1)[:, a] for c in range(0, len(final), 1024)])
    probs = probs.view(len(order), S).mean(1)
    restored = {j: float(probs[k]) for k, j in enumerate(order)}
    return p_clean, p_corr, restored


def _traced_positions(fact: PreparedFact, positions: str) -> list[int]:
    """Every position from the subject on, or (``roles``) one per Meng et al. role: the first,
    middle-most and last subject token, the first and middle-most further token, the last."""
    s0, T = fact.subject_span[0], len(fact.tokens)
    every = list(range(s0, T))
    if positions == "all":
        return every
    by_role: dict[str, list[int]] = {}
    for p in every:
        by_role.setdefault(_position_role(p, fact.subject_span, T), []).append(p)
    return sorted(ps[(len(ps) - 1) // 2] for ps in by_role.values())


def _build_patches(model: Any, fact: PreparedFact, kinds: Sequence[str], window: int,
                   single_kinds: Sequence[str], positions: str = "all") -> list[_Patch]:
    L = model.cfg.n_layers
    traced = _traced_positions(fact, positions)
    has_mlp = set(dense_layers(model)) | {i for i, b in enumerate(model.blocks) if hasattr(b, "mlp")}
    patches: list[_Patch] = []
    specs = [(k, window) for k in kinds]
    if window > 1:
        specs += [(f"{k}_single", 1) for k in single_kinds]
    for kind, w in specs:
        base = kind.split("_")[0]
        for layer in range(L):
            for pos in traced:
                if base == "resid":
                    patches.append(_Patch(kind, layer, pos, layer + 1, (), None))
                    continue
                layers = tuple(i for i in _window_layers(layer, w, L) if base != "mlp" or i in has_mlp)
                if not layers:
                    continue
                patches.append(_Patch(kind, layer, pos, layers[0], layers, _HOOK_OF_KIND[base]))
    return patches


def causal_trace(model: Any, facts: Sequence[PreparedFact], *, kinds: Sequence[str] = TRACE_KINDS,
                 single_kinds: Sequence[str] = ("mlp",), corruptions: Sequence[str] = ("noise", "replace"),
                 n_samples: int = 5, n_replacements: int | None = None, noise_scale: float = 3.0,
                 window: int | None = None, positions: str = "all", seed: int = 0, max_rows: int = 256,
                 merge_positions: bool = False, subject_pool: Sequence[PreparedFact] | None = None,
                 progress: Progress = _no_progress) -> pd.DataFrame:
    """Causal tracing (Meng et al. 2022, Sec. 2.1) with noise and token-replacement corruption.

    For each fact: a clean run; a corrupted run (``noise``: Gaussian noise of std
    ``noise_scale`` x the subject embeddings' std added to the subject's token embeddings at
    ``hook_embed``, ``n_samples`` draws; ``replace``: the subject swapped for up to
    ``n_replacements`` (default ``n_samples``) other subjects of the same token length with
    other answers, drawn from ``subject_pool`` (default ``facts``), Zhang and Nanda 2024); then, for
    every layer and every position from the subject on, a run that restores the clean state:
    ``resid`` (``hook_resid_post`` of that layer), ``mlp`` / ``attn`` (``hook_mlp_out`` /
    ``hook_attn_out`` over ``window`` layers centred there, Meng et al.'s window, default
    :func:`default_window`), and ``<kind>_single`` (one layer, for ``single_kinds``; shown
    beside the window because a window can be dominated by one layer). Positions before the
    subject are not traced: a causal model's state there is the same in both runs.
    ``positions="roles"`` traces one position per role (the middle-most of several middle
    subject or further tokens), which is what the averaged heatmaps need, at a fraction of
    the cost for long prompts.

    Batching: restorations sharing a start layer run in one forward of at most ``max_rows``
    token positions (rows x positions); ``merge_positions`` recomputes every traced position
    for all of them (larger, faster matrix products) instead of only positions >= the
    restored one (fewer operations, smaller products; faster on SmolLM2 on a CPU, the default).
    Both give the same numbers.

    Columns: ``fact, corruption, kind, window, layer, position, token, role`` (Meng et al.'s
    position groups: subject_first/middle/last, subsequent_first/further, last),
    ``clean_prob, corrupt_prob, restored_prob, indirect_effect`` (restored - corrupted, the
    probability of the answer's first token, averaged over samples) and ``n_samples``.
    """
    check_model(model)
    bad = [k for k in kinds if k not in TRACE_KINDS] + [k for k in single_kinds if k not in ("mlp", "attn")]
    if bad:
        raise InterpError(f"Unknown trace kind(s) {bad}; valid: {', '.join(TRACE_KINDS)} (single: mlp, attn).")
    bad = [c for c in corruptions if c not in ("noise", "replace")]
    if bad:
        raise InterpError(f"Unknown corruption(s) {bad}; valid: noise, replace.")
    for name, v in (("n_samples", n_samples), ("n_replacements", n_replacements)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise InterpError(f"{name} must be a positive integer, got {v!r}.")
    L = model.cfg.n_layers
    window = default_window(L) if window is None else int(window)
    if window < 1:
        raise InterpError(f"window must be >= 1 layer, got {window}.")
    if positions not in ("all", "roles"):
        raise InterpError(f"positions must be 'all' or 'roles', got {positions!r}.")
    dev = model.device
    std = _subject_embed_std(model, facts) if facts else 0.0
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in progress(range(len(facts)), desc="causal tracing", total=len(facts)):
        f = facts[i]
        s0, s1 = f.subject_span
        T = len(f.tokens)
        patches = _build_patches(model, f, kinds, window, single_kinds, positions)
        str_tokens = [_token_str(model, t) for t in f.tokens]
        for corruption in corruptions:
            noise = None
            if corruption == "noise":
                noise = (torch.randn((n_samples, s1 - s0, model.cfg.d_model), generator=gen) * noise_scale * std).to(dev)
                corrupted = torch.tensor([f.tokens] * n_samples, device=dev)
            else:
                subs = _replacements(f, facts if subject_pool is None else subject_pool,
                                     n_samples if n_replacements is None else n_replacements, gen)
                if not subs:
                    continue
                corrupted = torch.tensor([list(f.tokens[:s0]) + list(s) + list(f.tokens[s1:]) for s in subs], device=dev)
            p_clean, p_corr, restored = _trace_one(model, f, corrupted, noise, patches, max_rows, merge_positions)
            for j, p in enumerate(patches):
                rows.append({"fact": f.name, "corruption": corruption, "kind": p.kind,
                             "window": 1 if p.kind == "resid" or p.kind.endswith("_single") else window,
                             "layer": p.layer, "position": p.pos, "token": str_tokens[p.pos],
                             "role": _position_role(p.pos, f.subject_span, T), "clean_prob": p_clean,
                             "corrupt_prob": p_corr, "restored_prob": restored[j],
                             "indirect_effect": restored[j] - p_corr, "n_samples": int(corrupted.shape[0])})
    return pd.DataFrame(rows)


def average_trace(trace: pd.DataFrame) -> pd.DataFrame:
    """Average indirect effect per (corruption, kind, role, layer): positions of one role are
    averaged within a fact first, then over facts (Meng et al. Fig. 2 style). Column ``aie``;
    ``n_facts`` facts had a position of that role."""
    if trace.empty:
        return pd.DataFrame(columns=["corruption", "kind", "role", "layer", "aie", "n_facts"])
    per_fact = trace.groupby(["corruption", "kind", "role", "layer", "fact"], sort=False)["indirect_effect"].mean()
    out = per_fact.groupby(["corruption", "kind", "role", "layer"]).agg(aie="mean", n_facts="count").reset_index()
    out["role"] = pd.Categorical(out["role"], categories=list(POSITION_ROLES), ordered=True)
    return out.sort_values(["corruption", "kind", "role", "layer"]).reset_index(drop=True)


# =============================================================================================
# knowledge neurons
# =============================================================================================
@dataclass
class IGResult:
    """Integrated-gradients attributions of one prompt.

    ``attributions`` [n_layers, d_mlp] (rows of non-dense layers are zero); ``prob`` the
    answer's probability; ``baseline_probs`` [n_layers]: the probability with that layer's
    activations at the prediction position set to the baseline (zero). Completeness: row l
    sums to ``prob - baseline_probs[l]`` up to the Riemann error.
    """

    attributions: torch.Tensor
    prob: float
    baseline_probs: torch.Tensor
    layers: list[int] = field(default_factory=list)
    steps: torch.Tensor | None = None  # Riemann steps used per layer (doubled until complete)


def integrated_gradients(model: Any, tokens: Sequence[int], answer_id: int, *, layers: Sequence[int] | None = None,
                         steps: int = 20, rule: str = "midpoint", tolerance: float | None = 0.05,
                         max_steps: int = 160, batch_size: int = 64) -> IGResult:
    """Integrated gradients (Sundararajan et al. 2017) of P(answer) w.r.t. the FFN
    intermediate activations ``mlp.hook_post`` at the last position, as Dai et al. 2022
    (Sec. 3.1) do for knowledge attribution: layer by layer, the whole layer's activation
    vector is scaled from the zero baseline to its value, ``attr_i = a_i * mean_k
    dP(alpha_k a)/da_i``; the ``steps`` scalings run as one batch.

    ``rule``: ``midpoint`` (alpha_k = (k + 0.5)/m, error O(1/m^2)) or ``right`` (k/m, Dai et
    al.'s). Completeness is checked per layer: when the attributions miss ``P - P(baseline)``
    by more than ``tolerance`` (relative; differences below 1e-3 are not checked) the layer is
    recomputed with twice the steps, up to ``max_steps`` (``tolerance=None``: never). On
    SmolLM2, 20 steps leave layer 0 (whose removal takes P(answer) to ~0) 10-15% off.
    Only the last position is recomputed, from the attributed layer on, with earlier positions'
    keys and values from a KV cache (a causal model's earlier positions do not depend on it).
    """
    check_model(model)
    if rule not in ("midpoint", "right"):
        raise InterpError(f"rule must be 'midpoint' or 'right', got {rule!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise InterpError(f"steps must be a positive integer, got {steps!r}.")
    from interp import KVCache

    L, dev = model.cfg.n_layers, model.device
    layers = dense_layers(model) if layers is None else list(layers)
    toks = torch.tensor([list(tokens)], device=dev)
    T = toks.shape[1]
    kv = KVCache(L)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{i}.mlp.hook_post" for i in layers]
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        store[hook.name] = act[:, -1:].detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
        hidden = model(toks, past_kv=kv, return_type="hidden")
        prob = float(torch.softmax(_unembed(model, hidden[0, -1]), -1)[answer_id])
    attributions = torch.zeros(L, model.cfg.d_mlp)
    baseline = torch.full((L,), prob)
    steps_used = torch.zeros(L, dtype=torch.long)
    last_tok = toks[:, -1:]

    def probs_and_grads(layer: int, alphas: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P(answer) [n] and dP/d(activations) [n, d_mlp] at activations alpha * post."""
        ps, gs = [], []
        resid = store[f"blocks.{layer}.hook_resid_pre"]  # [1, 1, d_model]
        for c in range(0, len(alphas), batch_size):
            a = alphas[c:c + batch_size]
            scaled = (a[:, None] * post[None]).detach().requires_grad_(True)  # [n, d_mlp]

            def replace(act: torch.Tensor, hook: Any, scaled: torch.Tensor = scaled) -> torch.Tensor:
                return scaled[:, None, :].to(act.dtype)

            past = _kv_rows(kv, torch.zeros(len(a), dtype=torch.long, device=dev), T - 1)
            with torch.enable_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", replace)]):
                out = model(last_tok.expand(len(a), 1), past_kv=past, start_at_layer=layer,
                            residual=resid.expand(len(a), 1, -1), return_type="hidden")
                p = torch.softmax(_unembed(model, out[:, -1]), -1)[:, answer_id]
                (g,) = torch.autograd.grad(p.sum(), scaled)
            ps.append(p.detach().float())
            gs.append(g.float())
        return torch.cat(ps), torch.cat(gs)

    for layer in layers:
        post = store[f"blocks.{layer}.mlp.hook_post"][0, 0].float()  # [d_mlp]
        m = steps
        while True:
            k = torch.arange(m, dtype=torch.float32, device=dev)
            alphas = (k + 0.5) / m if rule == "midpoint" else (k + 1) / m
            first = steps_used[layer] == 0
            if first:  # the alpha = 0 row gives the baseline's probability
                alphas = torch.cat([torch.zeros(1, device=dev), alphas])
            p, g = probs_and_grads(layer, alphas, post)
            if first:
                baseline[layer] = float(p[0])
                g = g[1:]
            attr = post * g.mean(0)
            steps_used[layer] = m
            delta = prob - float(baseline[layer])
            err = abs(float(attr.sum()) - delta)
            if tolerance is None or abs(delta) < 1e-3 or err <= tolerance * abs(delta) or 2 * m > max_steps:
                break
            m *= 2
        attributions[layer] = attr.cpu()
    return IGResult(attributions=attributions, prob=prob, baseline_probs=baseline, layers=layers, steps=steps_used)


def refined_neurons(model: Any, facts: Sequence[PreparedFact], *, steps: int = 20, threshold: float = 0.2,
                    share: float = 0.7, layers: Sequence[int] | None = None,
                    progress: Progress = _no_progress) -> list[dict[tuple[int, int], tuple[float, float]]]:
    """Steps 1-2 of :func:`knowledge_neurons` per fact: ``{(layer, neuron): (mean attribution,
    share of prompts)}`` for neurons above ``threshold`` x max in at least ``share`` of prompts."""
    check_model(model)
    if not 0 < threshold <= 1 or not 0 < share <= 1:
        raise InterpError(f"threshold and share must be in (0, 1], got {threshold} and {share}.")
    refined = []
    for f in progress(facts, desc="knowledge neurons", total=len(facts)):
        prompts = f.prompts
        counts: dict[tuple[int, int], int] = {}
        attr_sum = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp)
        for toks in prompts:
            a = integrated_gradients(model, toks, f.answer_id, layers=layers, steps=steps).attributions
            attr_sum += a
            top = float(a.max())
            if top <= 0:
                continue
            for layer, neuron in (a > threshold * top).nonzero().tolist():
                counts[(layer, neuron)] = counts.get((layer, neuron), 0) + 1
        need = share * len(prompts) - 1e-9
        mean = attr_sum / len(prompts)
        refined.append({k: (float(mean[k]), c / len(prompts)) for k, c in counts.items() if c >= need})
    return refined


def knowledge_neurons(model: Any, facts: Sequence[PreparedFact], *, steps: int = 20, threshold: float = 0.2,
                      share: float = 0.7, max_shared: int | None = 0, layers: Sequence[int] | None = None,
                      progress: Progress = _no_progress,
                      refined: list[dict[tuple[int, int], tuple[float, float]]] | None = None) -> pd.DataFrame:
    """Knowledge neurons (Dai et al. 2022, Sec. 3.2) per fact.

    1. For each prompt of the fact (the prompt and its paraphrases): integrated gradients
       (:func:`integrated_gradients`); keep neurons with attribution > ``threshold`` x that
       prompt's maximum.
    2. Refine: keep neurons selected by at least ``share`` of the fact's prompts.
    3. Drop neurons that more than ``max_shared`` facts with a different answer also keep
       (``None``: keep all). Measured on SmolLM2 by the lead: single-prompt IG also picks
       generic neurons (last layer, layer 0) that unrelated facts share, so suppressing them
       hurts every fact; the paraphrase refinement and this filter make the selection specific.

    ``refined`` (from :func:`refined_neurons`) skips steps 1-2, to try several filters.
    Columns: ``fact, layer, neuron, attribution`` (mean over prompts), ``share`` (fraction of
    prompts selecting it), ``n_prompts, shared_with`` (facts with other answers that keep it
    too) and ``kept`` (the final knowledge neurons; ``kept=False`` rows were dropped by step 3).
    """
    if refined is None:
        refined = refined_neurons(model, facts, steps=steps, threshold=threshold, share=share, layers=layers,
                                  progress=progress)
    owners: dict[tuple[int, int], list[int]] = {}
    for i, sel in enumerate(refined):
        for key in sel:
            owners.setdefault(key, []).append(i)
    rows = []
    for i, (f, sel) in enumerate(zip(facts, refined, strict=True)):
        for (layer, neuron), (attr, frac) in sorted(sel.items()):
            shared = sum(1 for j in owners[(layer, neuron)] if j != i and facts[j].answer_id != f.answer_id)
            rows.append({"fact": f.name, "layer": layer, "neuron": neuron, "attribution": attr, "share": frac,
                         "n_prompts": len(f.prompts), "shared_with": shared,
                         "kept": max_shared is None or shared <= max_shared})
    cols = ["fact", "layer", "neuron", "attribution", "share", "n_prompts", "shared_with", "kept"]
    return pd.DataFrame(rows, columns=cols)


def _unrelated(facts: Sequence[PreparedFact], i: int, n: int, gen: torch.Generator) -> list[int]:
    """Facts with another subject and another answer (Dai et al.'s specificity control)."""
    f = facts[i]
    pool = [j for j, g in enumerate(facts) if j != i and g.answer_id != f.answer_id and g.subject != f.subject]
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [pool[k] for k in order[:n]]


@torch.no_grad()
def edit_knowledge_neurons(model: Any, facts: Sequence[PreparedFact], neurons: pd.DataFrame, *,
                           modes: Sequence[str] = ("suppress", "amplify"), n_unrelated: int = 10,
                           seed: int = 0, batch_size: int = 32) -> pd.DataFrame:
    """Suppress (activation x0) or amplify (x2) each fact's kept knowledge neurons at the
    prediction position (Dai et al. 2022, Sec. 4.2) and measure the answer probability on the
    fact's own prompts (``target="self"``) and on ``n_unrelated`` facts with other subjects
    and answers (``target="unrelated"``).

    Columns: ``fact, mode, target, target_fact, prompt, p_before, p_after, rel_change``
    ((after - before) / before), ``n_neurons``. Facts without kept neurons get no rows.
    """
    factor = {"suppress": 0.0, "amplify": 2.0}
    bad = [m for m in modes if m not in factor]
    if bad:
        raise InterpError(f"Unknown edit mode(s) {bad}; valid: suppress, amplify.")
    kept = neurons[neurons["kept"]] if "kept" in neurons else neurons
    by_fact = {name: g for name, g in kept.groupby("fact")}
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, f in enumerate(facts):
        sel = by_fact.get(f.name)
        if sel is None or sel.empty:
            continue
        targets = [("self", f.name, k, toks, f.answer_id) for k, toks in enumerate(f.prompts)]
        for j in _unrelated(facts, i, n_unrelated, gen):
            g = facts[j]
            targets.append(("unrelated", g.name, 0, g.tokens, g.answer_id))
        seqs = [t[3] for t in targets]
        answers = torch.tensor([t[4] for t in targets])
        before = _last_probs(model, seqs, batch_size=batch_size)[torch.arange(len(seqs)), answers]
        per_layer = {int(layer): torch.tensor(g["neuron"].to_numpy(), dtype=torch.long)
                     for layer, g in sel.groupby("layer")}
        for mode in modes:
            after = []
            for s in range(0, len(seqs), batch_size):
                chunk = seqs[s:s + batch_size]
                last = torch.tensor([len(q) - 1 for q in chunk], device=model.device)

                hooks = [(f"blocks.{layer}.mlp.hook_post", _scale_hook(idx, last, factor[mode]))
                         for layer, idx in per_layer.items()]
                after.append(_last_probs(model, chunk, fwd_hooks=hooks, batch_size=len(chunk)))
            p_after = torch.cat(after)[torch.arange(len(seqs)), answers]
            for t, b, a in zip(targets, before.tolist(), p_after.tolist(), strict=True):
                rows.append({"fact": f.name, "mode": mode, "target": t[0], "target_fact": t[1], "prompt": t[2],
                             "p_before": b, "p_after": a, "rel_change": (a - b) / b if b > 0 else float("nan"),
                             "n_neurons": len(sel)})
    return pd.DataFrame(rows, columns=["fact", "mode", "target", "target_fact", "prompt", "p_before", "p_after",
                                       "rel_change", "n_neurons"])


def _scale_hook(neurons: torch.Tensor, last: torch.Tensor, factor: float) -> Callable:
    """A hook multiplying ``neurons`` of ``mlp.hook_post`` at each row's last position by ``factor``."""
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        rows = torch.arange(act.shape[0], device=act.device)[:, None]
        act[rows, last.to(act.device)[:, None], neurons.to(act.device)[None, :]] *= factor
        return act
    return hook


def summarize_edits(edits: pd.DataFrame) -> pd.DataFrame:
    """Mean relative change per (mode, target): each fact's prompts are averaged first, then
    facts (Dai et al. report the mean over facts). Also the mean absolute change and the
    number of facts."""
    if edits.empty:
        return pd.DataFrame(columns=["mode", "target", "mean_rel_change", "mean_abs_rel_change", "n_facts"])
    per_fact = edits.assign(abs_rel=edits["rel_change"].abs()).groupby(["mode", "target", "fact"])[["rel_change", "abs_rel"]].mean()
    out = per_fact.groupby(["mode", "target"]).agg(mean_rel_change=("rel_change", "mean"),
                                                   mean_abs_rel_change=("abs_rel", "mean"),
                                                   n_facts=("rel_change", "count")).reset_index()
    return out


# =============================================================================================
# key-value memories
# =============================================================================================
class TopKContexts:
    """Running top-k activating contexts per neuron, in bounded memory.

    Holds, for each layer, ``values`` [k, d_mlp] and ``contexts`` [k, d_mlp, context + 1]
    (the ``context`` tokens ending at the firing position, then the next token; -1 = none),
    so a 10x larger corpus costs 10x time and the same memory (Geva et al. 2021 keep the
    top-25 trigger examples per key).
    """

    def __init__(self, layers: Sequence[int], d_mlp: int, k: int = 25, context: int = 8):
        if k < 1 or context < 1:
            raise InterpError(f"top_k and context must be >= 1, got {k} and {context}.")
        self.layers, self.k, self.context, self.d_mlp = list(layers), k, context, d_mlp
        self.values = {layer: torch.full((k, d_mlp), -math.inf) for layer in self.layers}
        self.contexts = {layer: torch.full((k, d_mlp, context + 1), -1, dtype=torch.int32) for layer in self.layers}
        self.n_tokens = 0

    def windows(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[batch, pos] -> [n_valid, context + 1]: the context ending at each valid position and the next token."""
        B, T = tokens.shape
        t = torch.where(valid, tokens, torch.full_like(tokens, -1))
        nxt = torch.cat([t[:, 1:], torch.full((B, 1), -1, dtype=t.dtype)], 1)
        padded = torch.cat([torch.full((B, self.context - 1), -1, dtype=t.dtype), t], 1)
        win = padded.unfold(1, self.context, 1)  # [B, T, context]
        return torch.cat([win, nxt[..., None]], -1)[valid].to(torch.int32)

    def update(self, layer: int, acts: torch.Tensor, windows: torch.Tensor) -> None:
        """Merge one batch's activations [n_valid, d_mlp] (with their windows) into layer's top-k."""
        if acts.shape[0] == 0:
            return
        kk = min(self.k, acts.shape[0])
        vals, idx = acts.float().topk(kk, dim=0)  # [kk, d_mlp]
        ctx = windows[idx]  # [kk, d_mlp, context + 1]
        all_vals = torch.cat([self.values[layer], vals])
        all_ctx = torch.cat([self.contexts[layer], ctx])
        top, sel = all_vals.topk(self.k, dim=0)
        self.values[layer] = top
        self.contexts[layer] = all_ctx.gather(0, sel[..., None].expand(-1, -1, self.context + 1))


@dataclass
class KVMemories:
    """Result of :func:`kv_memories`.

    ``neurons``: one row per (layer, neuron): ``max_activation``, ``top_context`` and
    ``top_next`` (its strongest trigger and the token after it), ``value_top`` and
    ``value_bottom`` (tokens its value vector promotes / suppresses most),
    ``agree_top1`` (value's top token == next token of the top trigger) and ``agree_any``
    (== the next token of any of its top-k triggers).
    ``agreement``: per layer, the two agreement rates and their neuron-shuffled baselines.
    ``store``: the running top-k (for :func:`trigger_table`).
    """

    neurons: pd.DataFrame
    agreement: pd.DataFrame
    store: TopKContexts
    value_top_ids: dict[int, torch.Tensor]


def corpus_batches(model: Any, texts: Iterable[str], *, batch_size: int = 8, max_tokens: int | None = None,
                   max_len: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenise texts (one sequence each, cut to ``max_len`` tokens) into right-padded
    batches ``(tokens, attention_mask)``; stop after ``max_tokens`` tokens."""
    seen, buf = 0, []
    for text in texts:
        if not text.strip():
            continue
        ids = _encode(model, text)[:max_len]
        if max_tokens is not None and seen + len(ids) > max_tokens:
            ids = ids[:max(0, max_tokens - seen)]
        if len(ids) < 2:
            if max_tokens is not None and seen >= max_tokens:
                break
            continue
        buf.append(ids)
        seen += len(ids)
        if len(buf) == batch_size:
            tokens, mask, _ = _pad(buf, _pad_id(model), model.device)
            yield tokens, mask
            buf = []
        if max_tokens is not None and seen >= max_tokens:
            break
    if buf:
        tokens, mask, _ = _pad(buf, _pad_id(model), model.device)
        yield tokens, mask


def _value_projection(model: Any, layer: int, n: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n promoted and suppressed token ids [d_mlp, n] of each value vector (row of
    W_out) read through the final norm's gain and the unembedding (Geva et al. Sec. 4)."""
    W_out = model.blocks[layer].mlp.W_out.float()  # [d_mlp, d_model]
    ln = getattr(model, "ln_final", None)
    if ln is not None and hasattr(ln, "w"):
        if hasattr(ln, "b"):  # LayerNorm centres: a direction's mean component is removed
            W_out = W_out - W_out.mean(-1, keepdim=True)
        W_out = W_out * ln.w.float()
    W_U = model.W_U.float()
    tops, bottoms = [], []
    for s in range(0, W_out.shape[0], chunk):
        logits = W_out[s:s + chunk] @ W_U  # [chunk, d_vocab]
        tops.append(logits.topk(n, dim=-1).indices)
        bottoms.append((-logits).topk(n, dim=-1).indices)
    return torch.cat(tops).cpu(), torch.cat(bottoms).cpu()


@torch.no_grad()
def kv_memories(model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], *,
                layers: Sequence[int] | None = None, top_k: int = 25, context: int = 8, n_value_tokens: int = 5,
                n_shuffles: int = 20, seed: int = 0, progress: Progress = _no_progress) -> KVMemories:
    """FFN key-value memories (Geva et al. 2021): stream ``batches`` of ``(tokens,
    attention_mask)``; keep each neuron's top-``top_k`` activating contexts (``mlp.hook_post``;
    BOS positions skipped, they carry no pattern); project each value vector to the vocabulary;
    per layer, the agreement rate between a value's top token and the next token of its top
    trigger context(s), against a baseline that pairs values with other neurons' triggers
    (random permutations of neurons within the layer, ``n_shuffles`` of them).

    Gated FFNs (SwiGLU) can fire negatively; the top contexts are the most positive ones.
    """
    check_model(model)
    layers = dense_layers(model) if layers is None else list(layers)
    bad = [layer for layer in layers if layer not in dense_layers(model)]
    if bad:
        raise InterpError(f"Layers {bad} have no dense FFN; valid layers: {dense_layers(model)}.")
    store = TopKContexts(layers, model.cfg.d_mlp, top_k, context)
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    names = {f"blocks.{layer}.mlp.hook_post": layer for layer in layers}
    for tokens, mask in progress(batches, desc="key-value memories"):
        valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        if bos is not None:
            valid = valid & (tokens != bos)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type=None,
                                        names_filter=lambda n: n in names)
        windows = store.windows(tokens.cpu(), valid.cpu())
        for name, layer in names.items():
            store.update(layer, cache[name][valid].cpu(), windows)
        store.n_tokens += int(valid.sum())
    if store.n_tokens == 0:
        raise InterpError("The corpus produced no tokens; pass a non-empty text file.")
    gen = torch.Generator().manual_seed(seed)
    rows, agree_rows, value_top_ids = [], [], {}
    tok = getattr(model, "tokenizer", None)
    decode = (lambda ids: tok.decode([i for i in ids if i >= 0])) if tok is not None else (lambda ids: " ".join(str(i) for i in ids if i >= 0))
    vocab_cache: dict[int, str] = {}

    def tstr(i: int) -> str:
        if i not in vocab_cache:
            vocab_cache[i] = _token_str(model, i) if i >= 0 else ""
        return vocab_cache[i]

    for layer in layers:
        top_ids, bottom_ids = _value_projection(model, layer, n_value_tokens)
        value_top_ids[layer] = top_ids[:, 0]
        vals, ctx = store.values[layer], store.contexts[layer]  # [k, d], [k, d, C+1]
        nxt = ctx[..., -1].long()  # [k, d]
        has = torch.isfinite(vals) & (nxt >= 0)
        v1 = top_ids[:, 0]
        top1_ok = has[0]
        agree1 = (nxt[0] == v1) & top1_ok
        agree_any = ((nxt == v1[None]) & has).any(0)
        any_ok = has.any(0)
        base1, base_any = [], []
        for _ in range(n_shuffles):
            perm = torch.randperm(len(v1), generator=gen)
            pv = v1[perm]
            base1.append(float(((nxt[0] == pv) & top1_ok).sum()) / max(int(top1_ok.sum()), 1))
            base_any.append(float((((nxt == pv[None]) & has).any(0)).sum()) / max(int(any_ok.sum()), 1))
        agree_rows.append({"layer": layer, "agreement_top1": float(agree1.sum()) / max(int(top1_ok.sum()), 1),
                           "baseline_top1": float(np.mean(base1)),
                           "agreement_any": float(agree_any.sum()) / max(int(any_ok.sum()), 1),
                           "baseline_any": float(np.mean(base_any)), "n_neurons": int(top1_ok.sum())})
        for i in range(model.cfg.d_mlp):
            rows.append({"layer": layer, "neuron": i,
                         "max_activation": float(vals[0, i]) if torch.isfinite(vals[0, i]) else float("nan"),
                         "top_context": decode(ctx[0, i, :-1].tolist()), "top_next": tstr(int(nxt[0, i])),
                         "value_top": " | ".join(tstr(int(t)) for t in top_ids[i]),
                         "value_bottom": " | ".join(tstr(int(t)) for t in bottom_ids[i]),
                         "agree_top1": bool(agree1[i]), "agree_any": bool(agree_any[i])})
    return KVMemories(neurons=pd.DataFrame(rows), agreement=pd.DataFrame(agree_rows), store=store,
                      value_top_ids=value_top_ids)


def trigger_table(model: Any, kv: KVMemories, neurons: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """Every stored trigger context of the given (layer, neuron) pairs: ``layer, neuron,
    rank, activation, context, next_token`` plus the value's promoted tokens."""
    tok = getattr(model, "tokenizer", None)
    rows = []
    for layer, neuron in neurons:
        if layer not in kv.store.values:
            continue
        vals, ctx = kv.store.values[layer][:, neuron], kv.store.contexts[layer][:, neuron]
        promoted = kv.neurons.loc[(kv.neurons["layer"] == layer) & (kv.neurons["neuron"] == neuron), "value_top"]
        for r in range(len(vals)):
            if not torch.isfinite(vals[r]):
                continue
            ids = [i for i in ctx[r, :-1].tolist() if i >= 0]
            nxt = int(ctx[r, -1])
            rows.append({"layer": layer, "neuron": neuron, "rank": r + 1, "activation": float(vals[r]),
                         "context": tok.decode(ids) if tok is not None else " ".join(map(str, ids)),
                         "next_token": _token_str(model, nxt) if nxt >= 0 else "",
                         "value_top": promoted.iloc[0] if len(promoted) else ""})
    return pd.DataFrame(rows, columns=["layer", "neuron", "rank", "activation", "context", "next_token", "value_top"])


# =============================================================================================
# everything at once (what `interp ffn` runs)
# =============================================================================================
def select_facts(facts: Sequence[PreparedFact], n: int | None, seed: int = 0) -> list[PreparedFact]:
    """Up to ``n`` facts in a seeded random order (files are grouped by relation; a random
    subset mixes relations)."""
    if n is None or n >= len(facts):
        return list(facts)
    order = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [facts[i] for i in sorted(order[:n])]


def default_corpus(model: Any, facts: Sequence[Any]) -> list[str]:
    """Texts for key-value memories when none is given: a ``knowledge`` model's own training
    sequences (prompt + answer); otherwise ``analyses/data/sample_text.txt`` (40 sentences
    written for this project) followed by every fact's prompt and answer."""
    if _task_name(model) == "knowledge":
        return [f"{f.prompt} {f.object}" for f in facts if hasattr(f, "object")]
    path = Path(__file__).resolve().parent / "data" / "sample_text.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.is_file() else []
    for f in facts:
        if isinstance(f, Fact):
            lines.append(f"{f.prompt} {f.answer}.")
    return lines


def analyse(model: Any, facts: Sequence[Any] | None = None, texts: Sequence[str] | None = None, *,
            max_facts: int | None = 20, n_samples: int = 3, n_replacements: int | None = None,
            window: int | None = None, positions: str = "roles", ig_steps: int = 20,
            kv_layers: Sequence[int] | None = None, top_k: int = 25, batch_size: int = 8,
            max_tokens: int | None = None, n_unrelated: int = 10, n_detail_neurons: int = 6, seed: int = 0,
            progress: Progress = _no_progress) -> dict[str, Any]:
    """Run every method on up to ``max_facts`` known facts; return the frames and timings.

    Keys: ``predictions`` (every fact), ``facts`` (analysed), ``logit_lens``, ``causal_trace``,
    ``trace_average``, ``knowledge_neurons``, ``edits``, ``edit_summary``, ``kv_memories``,
    ``kv_agreement``, ``kv_triggers``, ``timings`` (seconds per method), ``n_facts``,
    ``n_known``, ``window``.
    """
    import time

    check_model(model)
    raw = list(facts) if facts is not None else facts_for_model(model)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    prepared = prepare_facts(model, raw)
    known, predictions = known_facts(model, prepared)
    chosen = select_facts(known, max_facts, seed)
    timings["known_facts"] = time.perf_counter() - t
    out: dict[str, Any] = {"predictions": predictions, "facts": chosen, "n_facts": len(prepared), "n_known": len(known),
                           "window": default_window(model.cfg.n_layers) if window is None else window}
    t = time.perf_counter()
    out["logit_lens"] = logit_lens(model, chosen) if chosen else pd.DataFrame()
    timings["logit_lens"] = time.perf_counter() - t
    t = time.perf_counter()
    trace = causal_trace(model, chosen, n_samples=n_samples, n_replacements=n_replacements, window=window,
                         positions=positions, seed=seed, subject_pool=prepared,
                         progress=progress) if chosen else pd.DataFrame()
    out["causal_trace"], out["trace_average"] = trace, average_trace(trace)
    timings["causal_tracing"] = time.perf_counter() - t
    t = time.perf_counter()
    kn = knowledge_neurons(model, chosen, steps=ig_steps, progress=progress) if chosen else pd.DataFrame(
        columns=["fact", "layer", "neuron", "attribution", "share", "n_prompts", "shared_with", "kept"])
    edits = edit_knowledge_neurons(model, known if len(known) > len(chosen) else chosen, kn, n_unrelated=n_unrelated,
                                   seed=seed) if chosen else pd.DataFrame()
    # unrelated facts are drawn from every known fact; only the analysed ones have neurons
    out["knowledge_neurons"], out["edits"], out["edit_summary"] = kn, edits, summarize_edits(edits)
    timings["knowledge_neurons"] = time.perf_counter() - t
    t = time.perf_counter()
    corpus = list(texts) if texts is not None else default_corpus(model, raw)
    kv = kv_memories(model, corpus_batches(model, corpus, batch_size=batch_size, max_tokens=max_tokens),
                     layers=kv_layers, top_k=top_k, seed=seed, progress=progress)
    detail = []
    if not kn.empty:
        best = kn[kn["kept"]].sort_values("attribution", ascending=False).drop_duplicates(["layer", "neuron"])
        detail = [(int(r.layer), int(r.neuron)) for r in best.head(n_detail_neurons).itertuples()]
    if len(detail) < n_detail_neurons:  # fill with the strongest-firing neurons of the last layer
        last = kv.neurons[kv.neurons["layer"] == kv.neurons["layer"].max()].sort_values("max_activation", ascending=False)
        detail += [(int(r.layer), int(r.neuron)) for r in last.head(n_detail_neurons - len(detail)).itertuples()]
    out["kv_memories"], out["kv_agreement"] = kv.neurons, kv.agreement
    out["kv_triggers"] = trigger_table(model, kv, detail)
    out["kv_tokens"] = kv.store.n_tokens
    timings["kv_memories"] = time.perf_counter() - t
    out["timings"] = timings
    return out
