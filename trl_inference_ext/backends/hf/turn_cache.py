"""KV caches kept from one `generate` call to the next, so a multi-turn rollout prefills only its appended tokens.

When a row of the sampling loop stops, the keys and values it computed (its context and every sampled token but the
last, which was never run through the model) are copied out, padding removed, under the token ids they cover. On the
next call, a prompt that extends a stored key starts from that entry and runs only the tokens after it (in a tool
loop: the end-of-turn token and the tool message).

Entries live for one call: what the next call does not use is dropped, and all are dropped when the weights or the
active adapters change (`state_key`). Memory per kept token is `2 x layers x kv_heads x head_dim x dtype bytes`,
bounded by `max_bytes`; a row that does not fit is simply re-prefilled on its next turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import InvalidValueError

TURN_CACHE_MEMORY_FRACTION = 0.1
"""Default cap of a `TurnCache`: this fraction of the device's free memory when the cache is opened."""


@dataclass(frozen=True)
class TurnEntry:
    """The keys and values of one row, per layer `[kv_heads, length, head_dim]`, without padding.

    Attributes:
        length (`int`): Tokens covered.
        keys (`tuple[torch.Tensor, ...]`): One tensor per layer.
        values (`tuple[torch.Tensor, ...]`): One tensor per layer.
    """

    length: int
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class TurnCache:
    """Per-row KV caches of the previous `generate` call, keyed by the token ids they cover.

    A call first `take`s the entries its prompts extend (which drops the rest), then `store`s the rows that stop.

    Args:
        max_bytes (`int`): Most bytes of keys and values stored by one call.
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidValueError(f"`max_bytes` must be an int >= 0, got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self._entries: dict[tuple[int, ...], TurnEntry] = {}
        self._state_key: Any = None
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored entries."""
        return self._bytes

    def clear(self) -> None:
        """Drops every entry."""
        self._entries = {}
        self._bytes = 0

    def take(self, prompt_ids: Sequence[Sequence[int]], state_key: Any) -> list[TurnEntry | None]:
        """Per prompt, the entry whose tokens it strictly extends (the longest), then forgets all entries.

        Args:
            prompt_ids (`Sequence[Sequence[int]]`): This call's prompts.
            state_key (`Any`): The backend's weights version and adapter state now; entries stored under another one
                are never returned.

        Returns:
            `list[TurnEntry | None]`: One per prompt; `None` where the prompt must be prefilled from the start.
        """
        entries = self._entries if state_key == self._state_key else {}
        self._state_key = state_key
        self.clear()
        lengths = sorted({len(key) for key in entries}, reverse=True)
        found: list[TurnEntry | None] = []
        for ids in prompt_ids:
            match = None
            for length in lengths:
                if length < len(ids):
                    match = entries.get(tuple(ids[:length]))
                    if match is not None:
                        break
            found.append(match)
        return found

    def store(self, token_ids: Sequence[int], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> bool:
        """Keeps one row's keys and values (already unpadded) for the next call, when they fit in `max_bytes`.

        Args:
            token_ids (`Sequence[int]`): The tokens they cover, in order.
            keys (`Sequence[torch.Tensor]`): Per layer `[kv_heads, len(token_ids), head_dim]`.
            values (`Sequence[torch.Tensor]`): Per layer, the same shape.

        Returns:
            `bool`: Whether the entry was stored (an identical key already stored counts as stored).
        """
        key = tuple(token_ids)
        if key in self._entries:
            return True
        entry = TurnEntry(len(key), tuple(keys), tuple(values))
        if any(t.shape[1] != entry.length for t in (*entry.keys, *entry.values)):
            raise InvalidValueError(f"Keys and values must cover the {entry.length} token ids given.")
        if self._bytes + entry.nbytes > self.max_bytes:
            return False
        self._entries[key] = entry
        self._bytes += entry.nbytes
        return True

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more can be stored within `max_bytes`."""
        return self._bytes + nbytes <= self.max_bytes
