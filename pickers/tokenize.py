"""Prompt -> the engine's token ids, cheaply: cached by a hash of the text, off the event loop when big.

Precise prefix scoring only works when the picker tokenizes exactly as the engine does: the same
tokenizer and, for chat, the chat template rendered as the engine renders it (engine.tokens). The built-in
tokenizer (4 bytes per token, what the simulator uses) costs microseconds and is never offloaded.
"""

from __future__ import annotations

import array
import asyncio
import threading
from collections import OrderedDict

import numpy as np
import xxhash

from engine.tokens.tokenizer import BuiltinTokenizer, HFTokenizer, Tokenizer
from pickers.prefixtokens import PrefixTokens
from pickers.types import InferenceRequest


def _as_u32(ids) -> np.ndarray:
    """Token ids as a uint32 array; array.array converts a list 4x faster than np.asarray."""
    if isinstance(ids, np.ndarray):
        return ids if ids.dtype == np.uint32 else ids.astype(np.uint32)
    try:
        return np.frombuffer(array.array("I", ids), dtype=np.uint32)
    except (OverflowError, TypeError):
        return np.asarray(ids, dtype=np.int64).astype(np.uint32)


# The built-in tokenizer encodes about 1 GB/s (numpy over the UTF-8 bytes: a 200 KB prompt in ~0.2 ms of CPU, 1 MiB
# ~2 ms, 8 MiB ~10 ms), so a worker thread's hop (submit, wake, the loop woken back, the GIL handed twice) costs a
# smaller prompt more than it frees the event loop.
BUILTIN_OFFLOAD_MIN_CHARS = 1 << 20


class TokenService:
    def __init__(self, tokenizer: Tokenizer | None = None, cache_size: int = 4096,
                 offload_min_chars: int = 16384) -> None:
        self.tokenizer = tokenizer or BuiltinTokenizer()
        self.builtin = isinstance(self.tokenizer, BuiltinTokenizer)
        self.cache_size = cache_size
        self.offload_min_chars = offload_min_chars
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # _encode runs in worker threads for big prompts
        # a prompt that extends one seen before (a conversation's next turn) encodes only its new tail
        self.prefix = PrefixTokens(self.tokenizer) if isinstance(self.tokenizer, HFTokenizer) else None
        self.hits = 0
        self.misses = 0

    def text_for(self, request: InferenceRequest) -> tuple[str, bool]:
        """The text the engine tokenizes, and whether it adds special tokens to it.

        A rendered chat template carries its own BOS, so vLLM encodes it without special tokens; a
        completions prompt gets them (engine.tokens.Tokenizer.encode_chat).
        """
        if request.messages is not None:
            return self.tokenizer.render_chat(request.messages), False
        return request.prompt or "", True

    def estimate(self, request: InferenceRequest) -> int:
        """A token count without tokenizing (~4 bytes per token), for profiles that need no ids."""
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        n = len(request.prompt) if request.prompt is not None else max(request.body_size, len(request.text))
        return max(1, n // 4)

    def _encode(self, text: str, special: bool = True) -> np.ndarray:
        if self.builtin:
            return self.tokenizer.encode_array(text)
        key = xxhash.xxh3_128_digest(text.encode("utf-8", "surrogatepass"), seed=int(special))
        with self._lock:
            got = self._cache.get(key)
            if got is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return got
            self.misses += 1
        if self.prefix is not None:
            arr = self.prefix.encode(text, special)
        else:
            arr = self.tokenizer.encode_array(text, add_special_tokens=special)
            arr.setflags(write=False)
        with self._lock:
            self._cache[key] = arr
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return arr

    def given(self, request: InferenceRequest) -> np.ndarray | None:
        """The request's own token ids (a completions prompt sent as ids), or None."""
        if request.prompt_token_ids is not None:
            return _as_u32(request.prompt_token_ids)
        return None

    def tokens_sync(self, request: InferenceRequest) -> np.ndarray:
        got = self.given(request)
        if got is None:
            got = self._encode(*self.text_for(request))
        return got

    async def tokens(self, request: InferenceRequest) -> np.ndarray:
        """Like tokens_sync, but a big prompt is encoded in a worker thread so the event loop keeps serving: from
        ``offload_min_chars`` with a real tokenizer, from ``BUILTIN_OFFLOAD_MIN_CHARS`` with the built-in one."""
        got = self.given(request)
        if got is not None:
            return got
        text, special = self.text_for(request)
        offload_min = max(self.offload_min_chars, BUILTIN_OFFLOAD_MIN_CHARS) if self.builtin else self.offload_min_chars
        if len(text) >= offload_min:
            return await asyncio.to_thread(self._encode, text, special)
        return self._encode(text, special)
