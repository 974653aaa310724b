"""Which token ids a generated text came from, so that scoring `result.texts` scores what was sampled.

A completion that ended on EOS decodes to text without it, and re-tokenising a decoded text can pick other tokens
than the sampler did (tokenisation is not unique). The original documentation's training loops score
`result.texts`; to make them exact, every generation records `(vocabulary, prompt ids, text) -> completion ids`
here, and scoring a text looks it up before falling back to the tokenizer.

The index is shared by every `InferenceModule` of the process, keyed by a fingerprint of the vocabulary: a
reference module scoring the policy's texts (as in the original PPO loop) finds the policy's ids as long as both
use the same tokenizer. It is not keyed by weights version: the ids a text was decoded from do not change when the
weights do, and PPO epochs re-score the same texts after each update.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

MAX_ENTRIES = 65_536
"""Most (prompt, text) pairs remembered; the least recently used are dropped first."""

MAX_TOKENS = 16 * 1024 * 1024
"""Most completion tokens held in all entries together (about 0.5 GiB of Python ints at worst)."""

_fingerprints: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A digest of the tokenizer's vocabulary and special tokens, computed once per tokenizer object.

    Two tokenizers with the same fingerprint decode the same ids to the same text.

    Args:
        tokenizer: A transformers tokenizer.

    Returns:
        `str`: A hex digest.
    """
    try:
        return _fingerprints[tokenizer]
    except (KeyError, TypeError):
        pass
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\x00{token}\x01".encode())
    digest.update(repr(sorted(getattr(tokenizer, "all_special_ids", []) or [])).encode())
    value = digest.hexdigest()
    with contextlib.suppress(TypeError):  # not weak-referenceable: computed again next time
        _fingerprints[tokenizer] = value
    return value


class SampledTextIndex:
    """A bounded LRU map from `(vocabulary, prompt ids, text)` to the completion ids that text was decoded from.

    Args:
        max_entries (`int`, *optional*, defaults to `MAX_ENTRIES`): Most pairs kept.
        max_tokens (`int`, *optional*, defaults to `MAX_TOKENS`): Most completion tokens kept in all.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES, max_tokens: int = MAX_TOKENS) -> None:
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[str, tuple[int, ...], str], tuple[int, ...]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, vocabulary: str, prompt_ids: Sequence[int], text: str, completion_ids: Sequence[int]) -> None:
        """Remembers that `text` was decoded from `completion_ids`, generated after `prompt_ids`."""
        ids = tuple(completion_ids)
        if len(ids) > self.max_tokens:
            return
        key = (vocabulary, tuple(prompt_ids), text)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._tokens -= len(old)
            self._entries[key] = ids
            self._tokens += len(ids)
            while len(self._entries) > self.max_entries or self._tokens > self.max_tokens:
                _, dropped = self._entries.popitem(last=False)
                self._tokens -= len(dropped)

    def lookup(self, vocabulary: str, prompt_ids: Sequence[int], text: str) -> list[int] | None:
        """The completion ids `text` was decoded from after `prompt_ids`, or `None` if it was not generated here."""
        key = (vocabulary, tuple(prompt_ids), text)
        with self._lock:
            ids = self._entries.get(key)
            if ids is None:
                return None
            self._entries.move_to_end(key)
            return list(ids)

    def clear(self) -> None:
        """Forgets every entry."""
        with self._lock:
            self._entries.clear()
            self._tokens = 0


SAMPLED_TEXTS = SampledTextIndex()
"""The process-wide index every `InferenceModule` records its generations in."""
