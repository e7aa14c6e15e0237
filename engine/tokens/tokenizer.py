"""Tokenizers: a real one (HF ``tokenizers`` + the model's chat template) and a fast built-in one.

The simulator counts tokens with the same tokenizer the picker uses, so that the token ids a pod
publishes in its KV events are the ids the picker hashes for incoming requests. The built-in tokenizer
exists so that a simulated fleet needs no model files: it maps every 4 bytes of UTF-8 to one token id,
which is deterministic, roughly as dense as a BPE tokenizer on English text (~4 characters per token)
and costs a few microseconds for a 200 KB prompt. Two prompts that share a byte prefix share a token
prefix, which is all prefix caching needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Message = dict[str, Any]


class Tokenizer(Protocol):
    """What the engine and the picker need from a tokenizer."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray: ...

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str: ...

    def encode_chat(self, messages: Sequence[Message]) -> np.ndarray:
        """The prompt token ids of a chat request exactly as the engine computes them."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def message_text(content: Any) -> str:
    """The text of a chat message's ``content``: a string, or a list of parts of which text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


class BuiltinTokenizer:
    """Four UTF-8 bytes per token, ids below ``vocab_size``. Chat turns use a fixed plain template."""

    name = "builtin"
    BYTES_PER_TOKEN = 4

    def __init__(self, vocab_size: int = 32000) -> None:
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        # The built-in tokenizer has no special tokens; the flag exists to match HFTokenizer.
        data = text.encode("utf-8")
        pad = -len(data) % self.BYTES_PER_TOKEN
        if pad:
            data += b"\0" * pad
        words = np.frombuffer(data, dtype="<u4")
        return (words % np.uint32(self._vocab_size)).astype(np.uint32, copy=False)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def count(self, text: str) -> int:
        return -(-len(text.encode("utf-8")) // self.BYTES_PER_TOKEN)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        out = [f"<|{m.get('role', 'user')}|>\n{message_text(m.get('content'))}\n" for m in messages]
        if add_generation_prompt:
            out.append("<|assistant|>\n")
        return "".join(out)

    def encode_chat(self, messages: Sequence[Message]) -> np.ndarray:
        return self.encode_array(self.render_chat(messages))

    def decode(self, ids: Sequence[int]) -> str:
        # Ids are lossy (modulo the vocabulary); a readable stand-in keeps responses printable.
        return "".join(f" t{i % 1000}" for i in ids)


class HFTokenizer:
    """A model's own tokenizer from a local ``tokenizer.json`` (and ``tokenizer_config.json`` for chat).

    The chat template is rendered with Jinja2 the way ``transformers.apply_chat_template`` does, so the
    rendered prompt (and hence the token ids) match what vLLM computes for the same messages.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HF

        p = Path(path)
        folder = p if p.is_dir() else p.parent
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self.name = str(folder)
        self._tok = _HF.from_file(str(file))
        self._template = None
        self._special: dict[str, str] = {}
        cfg = folder / "tokenizer_config.json"
        if cfg.exists():
            conf = json.loads(cfg.read_text())
            for key in ("bos_token", "eos_token"):
                tok = conf.get(key)
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if tok:
                    self._special[key] = tok
            template = conf.get("chat_template")
            if template:
                import jinja2
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
                self._template = env.from_string(template)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a completions prompt gets the special tokens (BOS) as in vLLM."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self.encode(text, add_special_tokens), dtype=np.uint32)

    def encode_with_starts(self, text: str, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and, per token, the character offset in ``text`` where it starts (0 for added tokens)."""
        e = self._tok.encode(text, add_special_tokens=add_special_tokens)
        starts = np.fromiter((o[0] for o in e.offsets), dtype=np.int64, count=len(e.offsets))
        return np.asarray(e.ids, dtype=np.uint32), starts

    def encode_chat(self, messages: Sequence[Message]) -> np.ndarray:
        # A rendered chat template carries its own BOS: vLLM encodes it without adding special tokens.
        return self.encode_array(self.render_chat(messages), add_special_tokens=False)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            return BuiltinTokenizer().render_chat(messages, add_generation_prompt)
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self._special
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The HF tokenizer at ``path``, or the built-in one when no path is given."""
    return HFTokenizer(path) if path else BuiltinTokenizer()
