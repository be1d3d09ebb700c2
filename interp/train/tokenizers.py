"""The training tokenizers' old import path; they live in :mod:`interp.tokenizers`.

Kept so ``from interp.train.tokenizers import WordTokenizer`` keeps working.
"""

from interp.tokenizers import (
    TEXT_TOKENIZERS,
    ByteTokenizer,
    WordTokenizer,
    gpt2_tokenizer,
    tokenizer_from_dict,
    tokenizer_to_dict,
)

__all__ = [
    "TEXT_TOKENIZERS",
    "ByteTokenizer",
    "WordTokenizer",
    "gpt2_tokenizer",
    "tokenizer_from_dict",
    "tokenizer_to_dict",
]
