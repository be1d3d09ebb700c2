"""The checkpoint functions' old import path under :mod:`interp.loading`.

The code lives in :mod:`interp.checkpoint` (shared with :mod:`interp.train`); this module is
kept so ``from interp.loading.checkpoint import tokenizer_to_dict`` keeps working.
"""

from interp.checkpoint import (
    FORMAT,
    VERSION,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    tokenizer_from_dict,
    tokenizer_to_dict,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "tokenizer_from_dict",
    "tokenizer_to_dict",
]
