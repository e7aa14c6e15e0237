"""Tokenizers shared by the engine side and the picker, so both count and hash the same token ids."""

from engine.tokens.tokenizer import (
    BuiltinTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = ["BuiltinTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]
