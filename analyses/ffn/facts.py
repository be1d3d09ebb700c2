"""The facts and texts the FFN knowledge methods run on, as text: files, defaults, the corpus.

Facts are JSONL files (``prompt``, ``subject``, ``answer``, optional ``paraphrases`` and
``relation``; :func:`load_facts`); ``analyses/data/facts.jsonl`` ships 114 written for this
project. Models trained on ``knowledge`` (:mod:`interp.train`) bring their own facts
(:func:`facts_for_model`) and their own training sequences as the corpus
(:func:`default_corpus`). Tokenising facts for a model is :mod:`analyses.ffn.prepare`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from interp import HookedTransformer
from interp.errors import InterpError

if TYPE_CHECKING:
    from interp.train import Fact as TaskFact

#: ``analyses/data``: the packaged facts and sample text.
DATA = Path(__file__).resolve().parent.parent / "data"


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


def default_facts_path() -> Path:
    """``analyses/data/facts.jsonl``: 114 facts written for this project (capitals, official
    languages, currencies, landmarks, makers, athletes' sports, continents, authors), each
    with two paraphrases."""
    return DATA / "facts.jsonl"


def load_facts(path: str | Path) -> list[Fact]:
    """Read a JSONL facts file: one object per line with string ``prompt``, ``subject``,
    ``answer``; optional ``paraphrases`` (list of strings) and ``relation``. Blank lines and
    lines starting with ``#`` are skipped. Any problem raises :class:`InterpError` naming
    the line."""
    path = Path(path)
    if not path.is_file():
        raise InterpError(f"Facts file {str(path)!r} does not exist; pass a JSONL file with "
                          "prompt, subject, answer per line.")
    facts: list[Fact] = []
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            facts.append(_parse_fact(line, f"{path.name} line {n}", n))
    if not facts:
        raise InterpError(f"Facts file {str(path)!r} holds no facts; add lines like "
                          "{\"prompt\": ..., \"subject\": ..., \"answer\": ...}.")
    return facts


def _parse_fact(line: str, where: str, n: int) -> Fact:
    """One non-blank line of a facts file (``where`` names it in errors)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InterpError(f"{where}: not valid JSON ({e.msg}); each line must be one object "
                          "with prompt, subject, answer.") from None
    if not isinstance(obj, dict):
        raise InterpError(f"{where}: expected a JSON object with prompt, subject, answer, got "
                          f"{type(obj).__name__}.")
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
        raise InterpError(f"{where}: subject {obj['subject']!r} does not occur in prompt "
                          f"{prompt!r}; write it exactly as in the prompt.")
    return Fact(prompt=prompt, subject=obj["subject"], answer=obj["answer"].strip(),
                paraphrases=tuple(p.rstrip() for p in paras), relation=relation, line=n)


def _task_name(model: HookedTransformer) -> str | None:
    """The :mod:`interp.train` task a checkpoint was trained on (``cfg.extra["task"]``)."""
    task = getattr(model.cfg, "extra", {}).get("task")
    return task.get("name") if isinstance(task, dict) else None


def facts_for_model(model: HookedTransformer) -> list[Fact] | list[TaskFact]:
    """The facts to use by default: a ``knowledge`` model's own knowledge base
    (``interp.train.knowledge_facts``), otherwise the shipped text facts."""
    if _task_name(model) == "knowledge":
        from interp.train import knowledge_facts

        return list(knowledge_facts(model))
    return load_facts(default_facts_path())


def default_corpus(model: HookedTransformer, facts: Sequence[Any]) -> list[str]:
    """Texts for key-value memories when none is given: a ``knowledge`` model's own training
    sequences (prompt + answer); otherwise ``analyses/data/sample_text.txt`` (40 sentences
    written for this project) followed by every fact's prompt and answer."""
    if _task_name(model) == "knowledge":
        return [f"{f.prompt} {f.object}" for f in facts if hasattr(f, "object")]
    path = DATA / "sample_text.txt"
    lines = ([ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
             if path.is_file() else [])
    for f in facts:
        if isinstance(f, Fact):
            lines.append(f"{f.prompt} {f.answer}.")
    return lines
