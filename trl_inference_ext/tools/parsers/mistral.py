"""The `mistral` format: calls after a `[TOOL_CALLS]` marker.

Both generations of Mistral's format are accepted::

    [TOOL_CALLS][{"name": "search", "arguments": {"query": "x"}}, {"name": "clock", "arguments": {}}]
    [TOOL_CALLS]search{"query": "x"}[TOOL_CALLS]clock{}

In the second form the name may be followed by `[CALL_ID]id` and/or `[ARGS]` before the JSON arguments, and several
`name{...}` calls may follow one marker. Text after the calls of a marker is ignored. Text between the marker and a
JSON list of calls (`[TOOL_CALLS] Calling them now: [{"name": ...}]`) is skipped: when what follows the marker is
neither JSON nor `name{...}`, the first `[{"...` or `{"name": ...` after it is read as the calls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import chain

from ...types import ToolCall
from ._decode import coerce_arguments, loads, make_call, raw_decode
from ._format import Call, ToolFormat, dump_json
from ._json_calls import CallKeys, JsonCallExtractor
from ._scan import NextFinder, empty_pair_end, rstrip_end, scan_json, skip_space
from .base import MAX_CALLS, ToolParser

TOOL_CALLS = "[TOOL_CALLS]"
MISTRAL_KEYS = CallKeys(names=("name",), arguments=("arguments", "parameters"))

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_CALL_ID = re.compile(r"\s{0,16}\[CALL_ID\]\s{0,16}[A-Za-z0-9_\-]{0,64}")
_ARGS = re.compile(r"\s{0,16}\[ARGS\]")
_LATER_CALLS = re.compile(r'\[\s{0,64}\{\s{0,64}"|\{\s{0,64}"(?:name|arguments|parameters|function)"\s{0,64}:')
"""A JSON list of objects or a call object, looked for when prose follows the marker."""


def _arguments_start(view: str, pos: int, end: int) -> int:
    """Offset of the `{` of `name[CALL_ID]id[ARGS]{...}` starting at `pos`, or `-1` when `pos` holds no such call."""
    name = _NAME.match(view, pos, end)
    if name is None:
        return -1
    pos = name.end()
    for pattern in (_CALL_ID, _ARGS):
        extra = pattern.match(view, pos, end)
        if extra is not None:
            pos = extra.end()
    pos = skip_space(view, pos, end)
    return pos if pos < end and view[pos] == "{" else -1


def payload_start(view: str, pos: int, end: int) -> int:
    """Where the calls after a marker start: the first non-blank offset, or the JSON calls after leading prose.

    Args:
        view (`str`): The text with reasoning blanked.
        pos (`int`): Offset just past the marker.
        end (`int`): Where the search stops (the next marker, or the end of the text).
    """
    pos = skip_space(view, pos, end)
    if pos >= end or view[pos] in "[{" or _arguments_start(view, pos, end) >= 0:
        return pos
    later = _LATER_CALLS.search(view, pos, end)
    return later.start() if later is not None else pos


def _json_extent(view: str, pos: int) -> int:
    """End of the valid JSON at `pos` (a list, an object, or the arguments of `name{...}`), or `-1`.

    Markers written inside its strings then do not split it.
    """
    arguments = _arguments_start(view, pos, len(view))
    if arguments >= 0:
        pos = arguments
    if pos >= len(view) or view[pos] not in "[{":
        return -1
    decoded = raw_decode(view, pos)
    return decoded[1] if decoded is not None else -1


class MistralParser(ToolParser):
    """Parses `[TOOL_CALLS][{...}, ...]` lists and `[TOOL_CALLS]name{...}` calls."""

    name = "mistral"

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        calls: list[ToolCall] = []
        markers = NextFinder(view, TOOL_CALLS)
        marker = markers.find(0)
        while marker >= 0 and len(calls) < MAX_CALLS:
            region_start = marker + len(TOOL_CALLS)
            bound = markers.find(region_start)
            payload = payload_start(view, region_start, bound if bound >= 0 else len(view))
            following = markers.find(max(region_start, _json_extent(view, payload)))
            region_end = following if following >= 0 else len(view)
            calls.extend(
                self._parse_region(text, view, marker, region_start, payload, region_end, MAX_CALLS - len(calls))
            )
            marker = following
        return calls

    def _parse_region(
        self, text: str, view: str, marker: int, start: int, pos: int, end: int, max_calls: int
    ) -> list[ToolCall]:
        """The calls of the region `[start, end)` after the marker at `marker`, whose calls start at `pos`."""
        if pos >= end:
            status = "unclosed" if end == len(view) else "missing_name"
            return [make_call(text, marker, start, "", None, status, f"{TOOL_CALLS} is not followed by a call")]
        if view[pos] in "[{":
            extractor = JsonCallExtractor(text, view, MISTRAL_KEYS, standalone=False, max_calls=max_calls)
            pair_end = empty_pair_end(view, pos, end)
            nodes = (
                iter([(pos, pair_end, None)])
                if pair_end >= 0
                else scan_json(view, pos, end, decoded=extractor.decoded, prose=False)
            )
            first = next(nodes, None)
            if first is None or first[0] != pos:
                raw_end = rstrip_end(view, pos, end)
                return [make_call(text, pos, raw_end, "", None, "invalid_json", "tool calls are not valid JSON")]
            if first[1] >= 0:
                extractor.add_closed(first)
                return extractor.finish()
            extractor.add_nodes(chain([first], nodes))
            found = extractor.finish()
            if found:
                return found
            raw_end = rstrip_end(view, pos, end)
            name = MISTRAL_KEYS.recover_name(view, pos, raw_end)
            return [make_call(text, pos, raw_end, name, None, "unclosed", "tool call list is not closed")]
        calls: list[ToolCall] = []
        while pos < end and len(calls) < max_calls:
            name_match = _NAME.match(view, pos, end)
            if name_match is None:
                if not calls:
                    raw_end = rstrip_end(view, marker, end)
                    calls.append(make_call(text, marker, raw_end, "", None, "missing_name", "no tool name"))
                break
            call, pos = self._named_call(text, view, name_match, end, first=not calls)
            if call is None:
                break
            calls.append(call)
            pos = skip_space(view, pos, end)
        return calls

    @staticmethod
    def _named_call(
        text: str, view: str, name_match: re.Match[str], end: int, *, first: bool
    ) -> tuple[ToolCall | None, int]:
        """Parses `name[CALL_ID]id[ARGS]{...}` at `name_match`; returns the call and the offset after it."""
        start = name_match.start()
        name = name_match.group()
        pos = name_match.end()
        for pattern in (_CALL_ID, _ARGS):
            extra = pattern.match(view, pos, end)
            if extra is not None:
                pos = extra.end()
        pos = skip_space(view, pos, end)
        if pos >= end or view[pos] != "{":
            if not first:
                return None, pos
            raw_end = rstrip_end(view, start, end)
            if pos >= end and end == len(view):
                return make_call(text, start, raw_end, name, None, "unclosed", "arguments are missing"), end
            return make_call(text, start, raw_end, name, None, "invalid_json", "expected JSON arguments"), end
        decoded = raw_decode(view, pos)
        if decoded is not None and decoded[1] <= end:
            value, node_end = decoded
            ok = True
        else:
            node_end = empty_pair_end(view, pos, end)
            node_start = pos
            if node_end < 0:
                node_start, node_end, _ = next(scan_json(view, pos, end, prose=False), (-1, -1, None))
            if node_start != pos or node_end < 0:
                raw_end = rstrip_end(view, start, end)
                return make_call(text, start, raw_end, name, None, "unclosed", "JSON arguments are not closed"), end
            ok, value = loads(view[pos:node_end])
        if not ok:
            return make_call(
                text, start, node_end, name, None, "invalid_json", "arguments are not valid JSON"
            ), node_end
        arguments, error = coerce_arguments(value)
        if arguments is None:
            return make_call(text, start, node_end, name, None, "invalid_arguments", error), node_end
        return make_call(text, start, node_end, name, arguments), node_end


def render_mistral(calls: Sequence[Call]) -> str:
    """Writes calls as one `[TOOL_CALLS]` marker followed by a JSON list of `{"name": ..., "arguments": ...}`.

    Domain: any non-blank name without surrounding white space, any JSON-compatible arguments.

    Args:
        calls (`Sequence[tuple[str, Mapping[str, Any]]]`): `(name, arguments)` pairs.
    """
    if not calls:
        return ""
    return TOOL_CALLS + dump_json([{"name": name, "arguments": dict(arguments)} for name, arguments in calls])


FORMAT = ToolFormat(
    parser=MistralParser,
    render=render_mistral,
    instruction=f'{TOOL_CALLS}[{{"name": "<tool name>", "arguments": {{"<argument>": <value>}}}}]',
    template_markers=(TOOL_CALLS,),
    special_tokens=(TOOL_CALLS, "[ARGS]", "[CALL_ID]"),
)
