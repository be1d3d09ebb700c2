"""The attention explorer on texts: run a model on each text, keep its patterns, label heads.

:func:`explore` is what ``interp explore`` and the reports' explorer call: one forward pass
per text with only the pattern hooks cached (each text alone, so there is no padding to
hide), checked against the model's context first, and the head taxonomy's frame
(:func:`analyses.heads.analyze`) attached so the page can colour its grid and list each
head's label, confidence and top scores. The page itself is :mod:`interp.viz` (core), so the
same view is ``interp.show_attention`` in a notebook. Nothing here writes a file.

Method: attention patterns as in Clark et al. (2019), *What Does BERT Look At?*; the
interactive head and token views follow Vig (2019), *A Multiscale Visualization of Attention
in the Transformer Model* (bertviz), written anew for interp's caches and with no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from interp.errors import InterpError
from interp.viz.attention import AttentionView, Doc, head_infos

if TYPE_CHECKING:
    from interp import HookedTransformer

__all__ = ["MAX_TEXTS", "explore", "explore_random", "text_docs"]

#: texts in one page by default: enough to compare, small enough to stay a few MB
MAX_TEXTS = 10


def _check_model(model: HookedTransformer) -> None:
    """Decoder and encoder models with a text tokenizer (the page labels tokens)."""
    if getattr(model.cfg, "architecture", "decoder") == "encoder_decoder":
        raise InterpError("the explorer covers decoder and encoder models, not encoder-decoder "
                          "ones; from Python, pass a cache of encoder.{l}.attn.hook_pattern to "
                          "interp.show_attention.")
    if getattr(model, "tokenizer", None) is None:
        raise InterpError("this model has no tokenizer, so texts cannot be shown as tokens; "
                          "from Python, run token ids with run_with_cache and pass the cache "
                          "and your own labels to interp.show_attention.")


def text_docs(model: HookedTransformer, texts: Sequence[str], *,
              max_tokens: int | None = None) -> tuple[list[Doc], list[str]]:
    """(one :class:`~interp.viz.attention.Doc` per text, notes on what was cut).

    A text longer than the model's context fails with one line naming the fix; with
    ``max_tokens`` each text is cut to its first ``max_tokens`` tokens (said in the notes).
    """
    import torch

    _check_model(model)
    n_ctx = int(model.cfg.n_ctx)
    if max_tokens is not None and max_tokens < 2:
        raise InterpError(f"max_tokens must be at least 2, got {max_tokens}.")
    if max_tokens is not None and max_tokens > n_ctx:
        raise InterpError(f"max_tokens {max_tokens} is longer than the model's context of "
                          f"{n_ctx} tokens; pass --max-tokens {n_ctx} or less.")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InterpError("no text to explore; pass --text with a non-empty sentence.")
    docs, notes = [], []
    layers = list(range(int(model.cfg.n_layers)))
    for i, text in enumerate(texts):
        ids = model.to_tokens(text, truncate=False, move_to_device=False)
        n = int(ids.shape[-1])
        if max_tokens is None and n > n_ctx:
            raise InterpError(f"text {i + 1} is {n} tokens, longer than the model's context of "
                              f"{n_ctx}; shorten it or pass --max-tokens {n_ctx} to cut it.")
        if max_tokens is not None and n > max_tokens:
            ids = ids[:, :max_tokens]
            notes.append(f"Text {i + 1} was cut to its first {max_tokens} of {n} tokens.")
        with torch.no_grad():
            _, cache = model.run_with_cache(ids.to(model.W_E.device),
                                            names_filter=lambda h: h.endswith("hook_pattern"))
        pats = torch.stack([cache["pattern", li][0] for li in layers])  # [layer, head, q, k]
        labels = [str(t) for t in model.to_str_tokens(ids[0])]
        title = text if len(text) <= 70 else text[:67] + "..."
        docs.append(Doc(title, labels, pats.float().cpu().numpy(), layers, text=text))
    return docs, notes


def explore(model: HookedTransformer, texts: Sequence[str], *, heads: Any = None,
            layer: int | None = None, head: int | None = None, max_tokens: int | None = None,
            model_name: str = "model", notes: Sequence[str] = ()) -> AttentionView:
    """The explorer over ``texts``: every layer and head, labelled by ``heads`` (the taxonomy
    frame, e.g. ``analyses.heads.analyze(model, texts=texts).heads``, or None for grey).

    A layer or head outside the model fails before any forward pass.
    """
    n_l, n_h = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if layer is not None and not 0 <= layer < n_l:
        raise InterpError(f"layer {layer} is out of range: the model has {n_l} layers "
                          f"(0-{n_l - 1}).")
    if head is not None and not 0 <= head < n_h:
        raise InterpError(f"head {head} is out of range: the model has {n_h} heads per layer "
                          f"(0-{n_h - 1}).")
    if head is not None and layer is None:
        raise InterpError("--head needs --layer.")
    docs, cut = text_docs(model, texts, max_tokens=max_tokens)
    return AttentionView(docs, model=model_name, labels=head_infos(heads), layer=layer,
                         head=head, notes=[*notes, *cut])


def explore_random(model: HookedTransformer, *, heads: Any = None, half_len: int = 12,
                   seed: int = 0, model_name: str = "model",
                   note: str | None = None) -> AttentionView:
    """The explorer on one repeated random-token sequence (``x1..xn x1..xn``, as the
    taxonomy's induction scores use), for a model that cannot read text: token ids label the
    positions, and induction and previous-token stripes show as they are scored. ``note``
    replaces the page's "no tokenizer" note (a tokenizer that cannot read the texts)."""
    import torch

    from analyses.heads import random_batches

    if getattr(model.cfg, "architecture", "decoder") == "encoder_decoder":
        _check_model(model)
    batch = next(random_batches(model, n_seqs=1, half_len=half_len, batch_size=1, seed=seed))
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens.to(model.W_E.device),
                                        names_filter=lambda h: h.endswith("hook_pattern"))
    layers = list(range(int(model.cfg.n_layers)))
    pats = torch.stack([cache["pattern", li][0] for li in layers]).float().cpu().numpy()
    ids = [str(int(i)) for i in batch.tokens[0]]
    title = f"repeated random tokens, 2 x {half_len} (seed {seed})"
    doc = Doc(title, ids, pats, layers, text=" ".join(ids))
    return AttentionView([doc], model=model_name, labels=head_infos(heads),
                         notes=[note or "The model has no tokenizer: the text is a repeated "
                                "random token sequence, each token shown by its id."])
