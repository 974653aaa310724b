"""Sticky routing: the turns of one multi-turn rollout go to the server that served its earlier turns.

Each turn of a rollout sends a prompt that extends the prompt of its previous turn (the completion and the tool
results are appended), so the server that answered the previous turn holds that prefix in its prefix cache. A
request whose prompt starts with a prompt some server answered before goes to that server (the longest such prefix
wins); other requests go to the least loaded server. The memory is bounded and forgets the oldest prompts first; it
is cleared whenever weights change, since the servers' prefix caches are dropped then too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

MAX_REMEMBERED = 4096
"""Most prompts remembered (each as a hash of its token ids, with its length and server)."""


class PrefixAffinity:
    """Which server answered which prompt, to send a prompt's continuations to the same server."""

    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self.max_remembered = max_remembered
        self._servers: OrderedDict[tuple[int, int], str] = OrderedDict()  # (length, hash of ids) -> server URL
        self._lengths: dict[int, int] = {}  # remembered prompt length -> how many prompts have it

    def remember(self, prompt: Sequence[int], server: str) -> None:
        """Records that `server` answered `prompt` (token ids)."""
        key = (len(prompt), hash(tuple(prompt)))
        if key not in self._servers:
            self._lengths[key[0]] = self._lengths.get(key[0], 0) + 1
        self._servers[key] = server
        self._servers.move_to_end(key)
        while len(self._servers) > self.max_remembered:
            (length, _), _ = self._servers.popitem(last=False)
            self._lengths[length] -= 1
            if not self._lengths[length]:
                del self._lengths[length]

    def server_for(self, prompt: Sequence[int]) -> str | None:
        """The server that answered the longest remembered prefix of `prompt` (the prompt itself included)."""
        for length in sorted((n for n in self._lengths if n <= len(prompt)), reverse=True):
            server = self._servers.get((length, hash(tuple(prompt[:length]))))
            if server is not None:
                return server
        return None

    def clear(self) -> None:
        """Forgets everything (the servers' prefix caches were dropped)."""
        self._servers.clear()
        self._lengths.clear()
