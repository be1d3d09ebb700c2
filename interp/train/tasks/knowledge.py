"""The ``knowledge`` task: a synthetic knowledge base of facts a model must memorise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from interp.errors import InterpError
from interp.tokenizers import WordTokenizer
from interp.train.tasks.base import Batch, Task, int_param

__all__ = ["Fact", "Knowledge"]

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
                "september", "october", "november", "december", "spring", "summer", "autumn",
                "winter"],
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
    layers 0-1; one layer at a time it is MLP 0), against <0.1 at the last token, and
    suppressing Dai et al.'s knowledge neurons drops answer probability by ~65% while
    unrelated facts move <5%. With ``bio_fraction=0`` and full
    causal attention the same model looks facts up at the relation token instead.
    """

    name = "knowledge"
    mechanism = ("facts memorised in the weights, recalled at the subject's last token "
                 "(Geva et al. 2021; Meng et al. 2022)")
    defaults = {"n_subjects": 200, "n_relations": 4, "n_objects": 16, "n_name_parts": 40,
                "min_name_len": 3, "max_name_len": 3, "bio_fraction": 0.5, "data_seed": 0}
    model_defaults = {"n_layers": 3, "d_model": 128, "n_heads": 4, "d_mlp": 512,
                      "positional": "learned", "mask": "causal&sliding_window:2"}
    train_defaults = {"steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100,
                      "weight_decay": 0.0, "label_smoothing": 0.1}

    def _validate(self) -> None:
        p = self.params
        int_param("n_relations", p["n_relations"], 1, len(_RELATIONS))
        int_param("n_objects", p["n_objects"], 2, 256)
        int_param("n_name_parts", p["n_name_parts"], 2, len(_SYLLABLES))
        int_param("min_name_len", p["min_name_len"], 1, 16)
        int_param("max_name_len", p["max_name_len"], p["min_name_len"], 16)
        int_param("data_seed", p["data_seed"], 0)
        bio = p["bio_fraction"]
        if (isinstance(bio, bool) or not isinstance(bio, (int, float))
                or not 0.0 <= float(bio) < 1.0):
            raise InterpError("task parameter bio_fraction must be a number in [0, 1), "
                              f"got {bio!r}")
        lengths = range(p["min_name_len"], p["max_name_len"] + 1)
        capacity = sum(p["n_name_parts"] ** k for k in lengths)
        int_param("n_subjects", p["n_subjects"], 1, capacity)

    def _objects(self, relation: str) -> list[str]:
        base = _RELATIONS[relation]
        n = self.params["n_objects"]
        if n <= len(base):
            return base[:n]
        return base + [f"{relation}_{i}" for i in range(len(base), n)]

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
                    index=len(facts), subject="-".join(name), relation=r, object=obj,
                    prompt=" ".join(prompt), prompt_tokens=tuple(tok.index[w] for w in prompt),
                    subject_span=(1, 1 + len(name)),
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
        self._bio_objects = torch.tensor(
            [[f.answer for f in facts[s * R:(s + 1) * R]] for s in range(len(names))],
            dtype=torch.long).reshape(len(names), R)
        self._bio_start = torch.tensor([1 + len(n) for n in names], dtype=torch.long)
        for s, name in enumerate(names):
            prefix = [tok.index[w] for w in ("<bos>", *name)]
            self._bio_prefix[s, :1 + len(name)] = torch.tensor(prefix)

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
                # each object is predicted from the position before it
                lab.scatter_(1, cols - 1, objs)
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
