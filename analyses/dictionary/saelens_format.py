"""Save and load SAEs in SAELens' on-disk format: a folder with ``cfg.json`` and
``sae_weights.safetensors`` (written by SAELens' ``SAE.save_model``, read by
``SAE.load_from_disk``), so SAEs trained here open in SAELens and SAELens SAEs open here,
from disk only (no hub).

Weights: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec``
[d_in], and ``threshold`` [d_sae] for JumpReLU. ``cfg.json`` fields read and written:
``architecture`` ("standard" for ReLU, "topk", "jumprelu"), ``d_in``, ``d_sae``, ``dtype``,
``device``, ``apply_b_dec_to_input``, ``normalize_activations``, ``hook_name`` and
``model_name`` (top level in SAELens < 6, under ``metadata`` in 6.x: we write both and read
either), ``k`` for TopK (6.x; older files put it in ``activation_fn_kwargs``, also read), and
``activation_fn_str`` (older files: "relu" or "topk"). Transcoders are SAELens'
"transcoder" architecture (ReLU) with ``d_out`` and ``metadata.hook_name_out``; ours need
``d_out == d_in``.
Files whose ``normalize_activations`` is not "none" (they rescale inputs by statistics that
are not in the file) and architectures we do not implement ("gated") are refused with the
reason, never loaded wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from analyses.dictionary.sae import SAE, SAEConfig
from interp.errors import InterpError

__all__ = ["load_saelens", "save_saelens"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
_FROM_SAELENS = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu",
                 "transcoder": "relu"}


def save_saelens(sae: SAE, folder: str | Path) -> Path:
    """Write ``sae`` to ``folder`` (created) as SAELens does; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    meta = {"model_name": c.model_name, "hook_name": c.hook_name}
    arch = _TO_SAELENS[c.architecture]
    if c.is_transcoder:
        if c.architecture != "relu":
            raise InterpError(f"SAELens stores ReLU transcoders only; this one is "
                              f"{c.architecture!r}. Save it with torch.save instead.")
        arch = "transcoder"
        meta["hook_name_out"] = str(c.hook_name_out)
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
        "activation_fn_str": "topk" if c.architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": c.k} if c.architecture == "topk" else {},
        "metadata": meta, **meta,
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False  # 6.x TopK option; ours never rescales
    if c.is_transcoder:
        cfg["d_out"] = c.d_in  # SAELens' Transcoder field; ours map d_in to d_in
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    tensors = {n: p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def _config(raw: dict[str, Any], where: Path) -> SAEConfig:
    meta = raw.get("metadata") or {}
    arch_raw = raw.get("architecture", "standard")
    if raw.get("activation_fn_str") == "topk" and arch_raw == "standard":
        arch_raw = "topk"
    if arch_raw not in _FROM_SAELENS:
        raise InterpError(f"{where} holds a {arch_raw!r} SAE; interp reads "
                          f"{', '.join(sorted(_FROM_SAELENS))} SAEs only.")
    norm = raw.get("normalize_activations") or "none"
    if norm != "none":
        raise InterpError(f"{where} normalises its inputs ({norm!r}) by statistics not in the "
                          "file; fold the scale into W_enc/W_dec first or use one saved with "
                          "normalize_activations='none'.")
    arch = _FROM_SAELENS[arch_raw]
    if raw.get("rescale_acts_by_decoder_norm"):
        raise InterpError(f"{where} is a TopK SAE that rescales activations by decoder norms; "
                          "interp does not implement that option (fold the norms into W_enc "
                          "and W_dec, or save with rescale_acts_by_decoder_norm=False).")
    if "d_out" in raw and int(raw["d_out"]) != int(raw["d_in"]):
        raise InterpError(f"{where} is a transcoder from width {raw['d_in']} to "
                          f"{raw['d_out']}; interp's transcoders map a width to itself.")
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    return SAEConfig(
        d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]),
        hook_name=str(raw.get("hook_name") or meta.get("hook_name") or ""),
        architecture=arch, k=int(k) if arch == "topk" and k is not None else None,
        hook_name_out=raw.get("hook_name_out") or meta.get("hook_name_out"),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        model_name=str(raw.get("model_name") or meta.get("model_name") or ""),
    )


def load_saelens(folder: str | Path) -> SAE:
    """Read an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) into an :class:`SAE`.

    Every tensor's name and shape is checked against the config; a missing or extra tensor is
    named in the error."""
    folder = Path(folder)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise InterpError(f"{folder} has no {name}; an SAELens SAE folder holds {CFG_FILE} "
                              f"and {WEIGHTS_FILE} (SAE.save_model writes them).")
    try:
        raw = json.loads((folder / CFG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InterpError(f"{folder / CFG_FILE} is not valid JSON ({e}).") from None
    missing = [k for k in ("d_in", "d_sae") if k not in raw]
    if missing:
        raise InterpError(f"{folder / CFG_FILE} lacks {', '.join(missing)}; it is not an "
                          "SAELens SAE config.")
    sae = SAE(_config(raw, folder))
    weights = load_file(str(folder / WEIGHTS_FILE))
    wanted = dict(sae.named_parameters())
    extra = sorted(set(weights) - set(wanted))
    lost = sorted(set(wanted) - set(weights))
    if extra or lost:
        raise InterpError(f"{folder / WEIGHTS_FILE}: tensors {lost or extra} "
                          f"{'missing' if lost else 'not expected'} for a "
                          f"{sae.cfg.architecture} SAE (expects {sorted(wanted)}).")
    with torch.no_grad():
        for name, p in wanted.items():
            t = weights[name]
            if tuple(t.shape) != tuple(p.shape):
                raise InterpError(f"{folder / WEIGHTS_FILE}: {name} has shape {list(t.shape)}, "
                                  f"cfg.json implies {list(p.shape)}.")
            p.copy_(t.to(p.dtype))
    sae.eval()
    return sae
