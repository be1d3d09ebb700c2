"""``interp activations``: stream chosen hook activations of a corpus to sharded files on disk.

Thin: read the corpus lazily (one document per line, or a ``.jsonl`` file's ``"text"``
fields), hand it to :func:`interp.activation_store.write_activations`, print where the shards
went. The format and the resume rule are documented there; read the folder back with
``interp.ActivationStore(DIR)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import click

from analyses.app import common
from analyses.app.errors import CliError

__all__ = ["activations_cmd", "read_corpus"]


def read_corpus(path: Path) -> Iterator[str]:
    """Documents of a corpus file, one at a time (never the whole file in memory): each line
    of a text file, or the ``"text"`` field of each line of a ``.jsonl`` file."""
    jsonl = path.suffix.lower() == ".jsonl"
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not jsonl:
                yield line.rstrip("\n")
                continue
            if not line.strip():
                yield ""
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise CliError(f"{path}:{n} is not a JSON object with a \"text\" field "
                               f"({e.__class__.__name__}); fix that line.") from e
            yield str(text)


def _fingerprint(path: Path) -> dict[str, object]:
    """Size and SHA-256 of the corpus, so a resumed run can tell it is the same corpus."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"corpus_bytes": path.stat().st_size, "corpus_sha256": digest.hexdigest()}


@click.command("activations")
@common.model_argument()
@click.option("--hooks", "hooks", required=True,
              help="Comma-separated hook names, e.g. blocks.0.hook_resid_post,blocks.1.hook_z.")
@click.option("--corpus", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file (one document per line) or .jsonl with a \"text\" field.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the shards and index.json (resumed if a run was interrupted).")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per sequence (longer documents are cut into pieces).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Padded tokens per forward pass (the memory budget of one batch).")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Token rows per shard file.")
@click.option("--store-dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              default="float32", show_default=True, help="dtype of the stored activations.")
@click.option("--max-shards", type=click.IntRange(min=1), default=None,
              help="Stop after writing this many new shards (run again to resume).")
@click.option("--device", default="auto", show_default=True, help="Torch device.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random models.")
def activations_cmd(model: str, hooks: str, corpus: Path, out: Path, seq_len: int,
                    batch_tokens: int, shard_tokens: int, store_dtype: str,
                    max_shards: int | None, device: str, seed: int) -> None:
    """Stream MODEL's HOOKS activations on CORPUS to safetensors shards in OUT.

    Only real tokens are stored, each with its document index, position and token id;
    memory stays one batch plus one shard whatever the corpus size.

    \b
    Example:
      interp activations minilm --hooks blocks.0.hook_resid_post,blocks.5.hook_resid_post \\
        --corpus analyses/data/sample_text.txt --out acts --shard-tokens 256
    """
    from interp.activation_store import write_activations

    names = [h.strip() for h in hooks.split(",") if h.strip()]
    m = common.load_model(model, device, "float32", seed=seed)
    source = {"model": model, **_fingerprint(corpus)}
    meta = write_activations(m, read_corpus(corpus), names, out, seq_len=seq_len,
                             batch_tokens=batch_tokens, shard_tokens=shard_tokens,
                             dtype=store_dtype, source=source, max_shards=max_shards)
    state = "complete" if meta["complete"] else "incomplete (run again to resume)"
    click.echo(f"{meta['n_tokens']:,} tokens in {len(meta['shards'])} shards, {state}: {out}")
