"""Turning balanced JSON spans (from `scan_json`) into tool calls; shared by the JSON-payload formats."""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from ...types import ToolCall
from ._decode import call_from_parts, element_spans, loads, make_call
from ._scan import JsonNode, rstrip_end

_SCHEMA_KEYS = frozenset({"description", "properties", "required"})
"""Top-level keys of a tool *schema*; an object carrying one is a definition echoed in prose, not a call."""

_CALL_METADATA_KEYS = frozenset({"id", "type", "call_id"})
_MISSING = object()


def _first_key(obj: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if key in obj:
            return key
    return None


class CallKeys:
    """Which JSON keys hold a call's name and arguments in one format.

    Args:
        names (`tuple[str, ...]`): Keys for the tool name, by priority.
        arguments (`tuple[str, ...]`): Keys for the arguments, by priority.
        require_arguments (`bool`, *optional*, defaults to `False`): Whether an object in prose is a call only when
            it has an arguments key (`{"name": "Alice"}` is then data, not a call to `Alice`).
    """

    def __init__(self, names: tuple[str, ...], arguments: tuple[str, ...], *, require_arguments: bool = False) -> None:
        self.names = names
        self.arguments = arguments
        self.require_arguments = require_arguments
        every = "|".join(re.escape(key) for key in (*names, *arguments, "function"))
        name_keys = "|".join(re.escape(key) for key in names)
        argument_keys = "|".join(re.escape(key) for key in arguments)
        self._any_key = re.compile(f'"(?:{argument_keys if require_arguments else every})"')
        self._arguments_key = re.compile(f'"(?:{argument_keys})"\\s{{0,64}}:')
        self._call_start = re.compile(f'\\{{\\s{{0,64}}"(?:{every})"\\s{{0,64}}:')
        self._name_value = re.compile(f'"(?:{name_keys})"\\s{{0,64}}:\\s{{0,64}}"([^"\\\\\\n]{{1,256}})"')
        self._allowed_without_arguments = frozenset(names) | _CALL_METADATA_KEYS

    def key_positions(self, view: str) -> list[int]:
        """Offsets of every quoted key that a call object in prose must hold (`"name"`, `"arguments"`, ...).

        Args:
            view (`str`): The text to search.
        """
        return [match.start() for match in self._any_key.finditer(view)]

    def starts_call(self, view: str, start: int, end: int = -1) -> bool:
        """Whether the object at `start` opens like a call (`{"name": ...`), to report it when it is malformed.

        With `require_arguments`, an arguments key must also occur in its first 4 KB.

        Args:
            view (`str`): The text.
            start (`int`): Offset of the `{`.
            end (`int`, *optional*): End of the object (`-1` when it is not closed).
        """
        if self._call_start.match(view, start, start + 300) is None:
            return False
        if not self.require_arguments:
            return True
        stop = min(len(view) if end < 0 else end, start + 4096)
        return self._arguments_key.search(view, start, stop) is not None

    def recover_name(self, view: str, start: int, end: int) -> str:
        """Best-effort tool name of a malformed call: the first `"name": "..."` pair in its first 4 KB.

        Args:
            view (`str`): The text.
            start (`int`): Start offset of the malformed call.
            end (`int`): End offset (exclusive).
        """
        match = self._name_value.search(view, start, min(end, start + 4096))
        return match.group(1).strip() if match else ""

    def call_from_object(
        self, obj: dict[str, Any], text: str, start: int, end: int, *, standalone: bool
    ) -> ToolCall | None:
        """Interprets a decoded JSON object as a call.

        Args:
            obj (`dict[str, Any]`): The decoded object.
            text (`str`): The original text.
            start (`int`): Start offset of the call.
            end (`int`): End offset (exclusive).
            standalone (`bool`): Whether the object sits in prose (no surrounding call markup). Then an object that
                does not look like a call (no name nor arguments key, a tool schema, or a name plus unrelated keys)
                is prose and `None` is returned.

        Returns:
            `ToolCall | None`: The call, or `None` when the object is not one.
        """
        name_key = _first_key(obj, self.names)
        arguments_key = _first_key(obj, self.arguments)
        if name_key is None and arguments_key is None and isinstance(obj.get("function"), dict):
            obj = obj["function"]
            name_key = _first_key(obj, self.names)
            arguments_key = _first_key(obj, self.arguments)
        if standalone:
            if name_key is None and arguments_key is None:
                return None
            if not _SCHEMA_KEYS.isdisjoint(obj):
                return None
            if arguments_key is None and (
                self.require_arguments or not self._allowed_without_arguments.issuperset(obj)
            ):
                return None
        name = obj.get(name_key) if name_key is not None else None
        arguments = obj.get(arguments_key) if arguments_key is not None else None
        return call_from_parts(text, start, end, name, arguments, has_arguments=arguments_key is not None)


class JsonCallExtractor:
    """Collects the calls held by a list of `JsonNode`s.

    Balanced spans are decoded; a failure on a span that opens like a call is reported as `invalid_json`, other
    failures descend into the nested spans (within a decode budget linear in the text size, so nested garbage cannot
    make parsing quadratic). Lists map their object elements onto the nested spans, so each call of
    `[{...}, {...}]` gets its own offsets. The first unclosed object that opens like a call is reported as
    `unclosed`, running to the next call or the end of the text.

    Args:
        text (`str`): The original text.
        view (`str`): The text with reasoning blanked.
        keys (`CallKeys`): The format's name and argument keys.
        standalone (`bool`): `True` in prose (non-call objects are skipped), `False` inside call markup (every
            object is a call, every decoding failure is reported).
        max_calls (`int`): Stop once this many calls were collected.
    """

    def __init__(self, text: str, view: str, keys: CallKeys, *, standalone: bool, max_calls: int) -> None:
        self.text = text
        self.view = view
        self.keys = keys
        self.standalone = standalone
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._budget = 4 * len(view) + 65536
        self._unclosed_at = -1
        self._keys_at = keys.key_positions(view) if standalone else []
        self.decoded: dict[int, Any] = {}
        """Values of spans already decoded by `scan_json(..., decoded=extractor.decoded)`."""

    @property
    def may_hold_calls(self) -> bool:
        """`False` when, in prose, no call key occurs at all (nothing to scan)."""
        return not self.standalone or bool(self._keys_at)

    def _mentions_key(self, start: int, end: int) -> bool:
        index = bisect_left(self._keys_at, start)
        return index < len(self._keys_at) and self._keys_at[index] < end

    def add_nodes(self, nodes: Iterable[JsonNode]) -> None:
        """Processes the nodes yielded by `scan_json` (closed spans, then unclosed markers with their contents).

        Args:
            nodes (`Iterable[JsonNode]`): The nodes, in order.
        """
        skipping = False
        view = self.view
        standalone = self.standalone
        for node in nodes:
            if len(self.calls) >= self.max_calls:
                return
            start, end, _ = node
            if end < 0:
                if self._unclosed_at >= 0:
                    skipping = True
                elif view[start] == "{" and (not standalone or self.keys.starts_call(view, start)):
                    self._unclosed_at = start
                continue
            if not skipping:
                children = self._add_one(node, None)
                if children:
                    self._add_all(children)

    def add_closed(self, node: JsonNode, raw: tuple[int, int] | None = None) -> None:
        """Processes one balanced span.

        Args:
            node (`JsonNode`): The span.
            raw (`tuple[int, int]`, *optional*): Offsets to report for a single call instead of the span's own (for
                example the whole `<tool_call>...</tool_call>` block).
        """
        children = self._add_one(node, raw)
        if children:
            self._add_all(children)

    def _add_all(self, nodes: list[JsonNode]) -> None:
        """Processes nested spans depth-first with an explicit stack (nesting can be `MAX_DEPTH` deep)."""
        pending = nodes[::-1]
        while pending and len(self.calls) < self.max_calls:
            children = self._add_one(pending.pop(), None)
            if children:
                pending.extend(reversed(children))

    def finish(self) -> list[ToolCall]:
        """Adds the pending unclosed call, if any, and returns every call found."""
        if self._unclosed_at >= 0 and len(self.calls) < self.max_calls:
            start = self._unclosed_at
            after = [call.start_pos for call in self.calls if call.start_pos > start]
            end = rstrip_end(self.view, start, min(after) if after else len(self.view))
            name = self.keys.recover_name(self.view, start, end)
            self.calls.append(make_call(self.text, start, end, name, None, "unclosed", "JSON object is not closed"))
            self._unclosed_at = -1
        return self.calls

    def _add_one(self, node: JsonNode, raw: tuple[int, int] | None) -> list[JsonNode] | None:
        start, end, children = node
        view = self.view
        if self.standalone and not self._mentions_key(start, end):
            return None
        value = self.decoded.pop(start, _MISSING)
        if value is _MISSING and self._budget >= end - start:
            self._budget -= end - start
            ok, value = loads(view[start:end])
            value = value if ok else _MISSING
        elif value is _MISSING:
            return None
        raw_start, raw_end = raw if raw is not None else (start, end)
        if value is not _MISSING:
            if isinstance(value, dict):
                self._add_object(value, raw_start, raw_end)
            elif isinstance(value, list):
                self._add_list(value, start, end)
            elif not self.standalone:
                self._add_invalid(raw_start, raw_end, "tool call must be a JSON object")
            return None
        if view[start] == "{" and (not self.standalone or self.keys.starts_call(view, start, end)):
            self._add_invalid(raw_start, raw_end, "tool call is not valid JSON")
            return None
        if not children and not self.standalone:
            self._add_invalid(raw_start, raw_end, "tool calls are not valid JSON")
        return children

    def _add_object(self, obj: dict[str, Any], start: int, end: int) -> None:
        call = self.keys.call_from_object(obj, self.text, start, end, standalone=self.standalone)
        if call is not None:
            self.calls.append(call)

    def _add_list(self, values: list[Any], start: int, end: int) -> None:
        spans = element_spans(self.view, start, end)
        if spans is None or len(spans) != len(values):
            spans = [(start, end)] * len(values)
        for value, (value_start, value_end) in zip(values, spans):
            if len(self.calls) >= self.max_calls:
                return
            if isinstance(value, dict):
                self._add_object(value, value_start, value_end)
            elif not self.standalone:
                self._add_invalid(value_start, value_end, "tool call must be a JSON object")

    def _add_invalid(self, start: int, end: int, error: str) -> None:
        name = self.keys.recover_name(self.view, start, end)
        self.calls.append(make_call(self.text, start, end, name, None, "invalid_json", error))
