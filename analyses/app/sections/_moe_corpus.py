"""Which corpus the MoE section routes: text files, a ``domains`` task stream, samples of the
model's own training task, or the packaged English sample, in that order of preference.

:func:`_corpus` returns the routing batches, a separate draw for ablation, the domain names (None
when there are no domains) and a sentence for the report's data paragraph.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from analyses import moe
from analyses.app.cli import CliError

DEFAULT_MAX_TOKENS = 32768  # routing corpus; a 10x larger one costs 10x time, same memory
DEFAULT_ABLATION_TOKENS = 4096  # re-run once per expert
DEFAULT_SEQ_LEN = 128


def _domains_task(model: Any, spec: str | None) -> Any | None:
    """The ``domains`` task to stream: named, a checkpoint path, or the model's own record."""
    try:
        from interp import train as itrain
    except ImportError as e:  # pragma: no cover - training package missing
        if spec:
            raise CliError(f"--domains needs interp.train, which is unavailable ({e})") from None
        return None
    if spec is None:
        try:
            task = itrain.task_from(model)
        except Exception:
            return None
        return task if isinstance(task, itrain.Domains) else None
    if spec == "domains":
        try:
            task = itrain.task_from(model)
            if isinstance(task, itrain.Domains):
                return task
        except Exception:
            pass
        return itrain.make_task("domains")
    if Path(spec).suffix == ".pt" or Path(spec).exists():
        if not Path(spec).exists():
            raise CliError(f"--domains checkpoint not found: {spec}")
        task = itrain.task_from(spec)
    else:
        if spec not in itrain.TASKS:
            raise CliError(f"--domains must be 'domains' or a checkpoint trained on it, "
                           f"got {spec!r}")
        task = itrain.make_task(spec)
    if not isinstance(task, itrain.Domains):
        raise CliError(f"--domains {spec!r} is the {task.name!r} task, not a domain stream; "
                       "use 'domains'")
    return task


def _corpus(model: Any, opts: dict) -> tuple[Any, Any, list[str] | None, str]:
    """(routing batches, ablation batches, domain names, description of the data)."""
    cfg = model.cfg
    bs = int(opts.get("batch_size") or 8)
    max_tokens = int(opts.get("max_tokens") or DEFAULT_MAX_TOKENS)
    abl_tokens = int(opts.get("ablation_tokens") or DEFAULT_ABLATION_TOKENS)
    seed = int(opts.get("seed") or 0)
    texts = [Path(p) for p in (opts.get("texts") or [])]
    if texts and opts.get("domains"):
        raise CliError("give either --text files or --domains, not both")
    if texts:
        seq = int(opts.get("seq_len") or DEFAULT_SEQ_LEN)
        names = _unique([p.stem for p in texts])
        def make(limit: int) -> Any:
            return moe.text_batches(model, texts, seq_len=seq, batch_size=bs, max_tokens=limit)
        desc = (f"{len(texts)} text file(s), one domain each "
                f"({', '.join(f'`{p.name}`' for p in texts)}), cut into "
                f"sequences of {min(seq, cfg.n_ctx)} tokens taken round-robin; "
                f"at most {max_tokens} tokens.")
        make(0)  # missing/empty files fail now, before any slow work
        if len(texts) == 1:  # one domain: no domain statistics
            return _unlabelled(make(max_tokens)), _unlabelled(make(abl_tokens)), None, desc
        return make(max_tokens), make(abl_tokens), names, desc
    task = _domains_task(model, opts.get("domains"))
    if task is not None:
        from interp.train import domain_batches

        if task.d_vocab > cfg.d_vocab:
            raise CliError(f"the domains task has {task.d_vocab} tokens but the model's "
                           f"d_vocab is {cfg.d_vocab}; use the model trained on it")
        if task.seq_len > cfg.n_ctx:
            raise CliError(f"the domains task has sequences of {task.seq_len} tokens but "
                           f"n_ctx={cfg.n_ctx}")
        per = bs * task.seq_len
        letters = "abcdefghijklmnopqrstuvwxyz"
        names = [letters[d] for d in range(task.params["n_domains"])]
        desc = (f"`domains` task stream ({task!r}): {task.params['n_domains']} token domains "
                f"with their own sub-vocabularies and Markov grammars plus shared tokens, "
                f"segments of mixed domains in each sequence; every token carries its domain "
                f"label (BOS unlabelled). {math.ceil(max_tokens / per)} batches of {bs} x "
                f"{task.seq_len} tokens, seed {seed}; ablation on a separate draw "
                f"(seed {seed + 1}).")
        return (domain_batches(task, bs, math.ceil(max_tokens / per), seed=seed),
                domain_batches(task, bs, math.ceil(abl_tokens / per), seed=seed + 1), names, desc)
    other = _other_task(model)
    # a model from `interp train` on another task: its word vocabulary cannot read English
    if other is not None:
        import torch

        def sample(n_tokens: int, s: int) -> Any:
            gen = torch.Generator().manual_seed(s)
            for _ in range(max(1, math.ceil(n_tokens / (bs * other.seq_len)))):
                yield other.sample(bs, gen).tokens
        desc = (f"fresh samples of the model's own training task `{other.name}` ({other!r}), "
                f"seed {seed}; it has no domains, so no domain statistics.")
        return sample(max_tokens, seed), sample(abl_tokens, seed + 1), None, desc
    if getattr(model, "tokenizer", None) is not None or cfg.d_vocab >= 256:
        from importlib.resources import files

        sample = files("analyses").joinpath("data/sample_text.txt")
        seq = int(opts.get("seq_len") or 32)
        desc = ("The packaged English sample (analyses/data/sample_text.txt, 40 sentences "
                "written for this project): one domain, so no domain statistics; pass --text "
                "FILE (repeatable, one domain per file) or --domains for those.")
        return (_unlabelled(moe.text_batches(model, [sample], seq_len=seq, batch_size=bs,
                                             max_tokens=max_tokens)),
                _unlabelled(moe.text_batches(model, [sample], seq_len=seq, batch_size=bs,
                                             max_tokens=abl_tokens)), None, desc)
    raise CliError("this model has no tokenizer and a vocabulary under 256 ids; give --domains "
                   "domains (a model trained on that task) so there are tokens to route")


def _other_task(model: Any) -> Any | None:
    """The non-domains training task recorded in a model from ``interp train``, if any."""
    if not isinstance((getattr(model.cfg, "extra", None) or {}).get("task"), dict):
        return None
    try:
        from interp.train import task_from

        return task_from(model)
    except Exception:
        return None


def _unlabelled(batches: Any) -> Any:
    """The same batches without domain labels (a single-domain corpus has no domain statistics)."""
    for b in batches:
        yield {"tokens": b[0], "attention_mask": b[2] if len(b) > 2 else None}


def _unique(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
