"""LRU cache for generation results, keyed by request and model state."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Hashable

from .errors import InvalidValueError
from .types import GenerationResult


class GenerationCache:
    """A bounded least-recently-used map from request keys to `GenerationResult`s.

    Keys must include everything the result depends on: prompt token ids, the sampling config and the backend's
    model state (weights version, active adapters), so a weight update can never serve a stale result.

    Args:
        max_size (`int`): Maximum number of entries; 0 disables the cache.
    """

    def __init__(self, max_size: int) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise InvalidValueError(f"`cache_size` must be an int >= 0, got {max_size!r}.")
        self.max_size = max_size
        self._entries: OrderedDict[Hashable, GenerationResult] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> GenerationResult | None:
        """Returns a copy of the cached result for `key`, or `None`."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return copy.deepcopy(entry)

    def put(self, key: Hashable, result: GenerationResult) -> None:
        """Stores a copy of `result`, evicting the least recently used entry when full."""
        if self.max_size == 0:
            return
        self._entries[key] = copy.deepcopy(result)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drops every entry."""
        self._entries.clear()
