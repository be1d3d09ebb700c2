"""The training checkpoint functions' old import path under :mod:`interp.train`.

The code lives in :mod:`interp.checkpoint` (shared with :mod:`interp.loading`); this module is
kept so ``from interp.train.checkpoint import write_checkpoint`` keeps working.
"""

from interp.checkpoint import (
    FORMAT,
    VERSION,
    model_from_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

__all__ = ["FORMAT", "VERSION", "model_from_checkpoint", "read_checkpoint", "write_checkpoint"]
