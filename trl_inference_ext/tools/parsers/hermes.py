"""The `hermes` format (Hermes 2 Pro, Qwen2.5, Qwen3): JSON calls wrapped in `<tool_call>` tags.

::

    <tool_call>
    {"name": "search", "arguments": {"query": "x"}}
    </tool_call>
    <tool_call>
    {"name": "clock", "arguments": {}}
    </tool_call>

A final `<tool_call>` left unclosed at the end of the output (generation stopped on the closing tag) is accepted
when its JSON is complete, and reported as `unclosed` otherwise. A block may also hold a list of calls or several
call objects, and a ```json fence around the JSON is tolerated.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from ...types import ToolCall
from ._decode import make_call
from ._format import Call, ToolFormat, dump_json
from ._json_calls import CallKeys, JsonCallExtractor
from ._scan import Block, empty_pair_end, iter_blocks, rstrip_end, scan_json, skip_space
from .base import MAX_CALLS, ToolParser

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

HERMES_KEYS = CallKeys(names=("name",), arguments=("arguments", "parameters"))


def _strip_fence(view: str, start: int, end: int) -> tuple[int, int]:
    if not view.startswith("```", start, end):
        return start, end
    newline = view.find("\n", start, min(end, start + 64))
    if newline < 0:
        return start, end
    start = skip_space(view, newline + 1, end)
    if view.endswith("```", start, end):
        end = rstrip_end(view, start, end - 3)
    return start, end


def _separated_only(view: str, gaps: list[tuple[int, int]]) -> bool:
    return all(not view[start:end].strip(" \t\r\n,;") for start, end in gaps)


def parse_json_block(
    text: str, view: str, block: Block, start: int, keys: CallKeys = HERMES_KEYS, max_calls: int = MAX_CALLS
) -> list[ToolCall]:
    """Parses the JSON payload of one `<tool_call>` block.

    Args:
        text (`str`): The original text.
        view (`str`): The text with reasoning blanked.
        block (`Block`): The block.
        start (`int`): Offset of the first non-blank character of the body.
        keys (`CallKeys`, *optional*): Name and argument keys.
        max_calls (`int`, *optional*): Most calls to return.

    Returns:
        `list[ToolCall]`: The block's calls (one malformed call when the payload does not parse).
    """
    end = rstrip_end(view, block.body_start, block.body_end)
    start = min(start, end)
    start, end = _strip_fence(view, start, end)
    raw_end = block.end if block.closed else max(end, block.body_start)
    extractor = JsonCallExtractor(text, view, keys, standalone=False, max_calls=max_calls)
    nodes = list(scan_json(view, start, end, decoded=extractor.decoded, prose=False)) if start < end else []
    if not nodes and start < end and empty_pair_end(view, start, end) == end:
        nodes = [(start, end, None)]
    if (
        nodes
        and all(node[1] >= 0 for node in nodes)
        and nodes[0][0] == start
        and nodes[-1][1] == end
        and _separated_only(view, [(a[1], b[0]) for a, b in pairwise(nodes)])
    ):
        if len(nodes) == 1:
            extractor.add_closed(nodes[0], raw=(block.start, raw_end))
        else:
            for node in nodes:
                extractor.add_closed(node)
        return extractor.finish()
    name = keys.recover_name(view, start, end)
    if not block.closed:
        return [make_call(text, block.start, raw_end, name, None, "unclosed", f"{TOOL_CALL_OPEN} is not closed")]
    error = "empty tool call" if start >= end else "tool call is not valid JSON"
    return [make_call(text, block.start, raw_end, name, None, "invalid_json", error)]


class HermesParser(ToolParser):
    """Parses `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks."""

    name = "hermes"

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for block in iter_blocks(view, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, json_bodies=True):
            if len(calls) >= MAX_CALLS:
                break
            start = skip_space(view, block.body_start, block.body_end)
            calls.extend(self._parse_body(text, view, block, start, MAX_CALLS - len(calls)))
        return calls

    def _parse_body(self, text: str, view: str, block: Block, start: int, max_calls: int) -> list[ToolCall]:
        """The calls of one `<tool_call>` block whose body starts (after white space) at `start`."""
        return parse_json_block(text, view, block, start, max_calls=max_calls)


def render_hermes(calls: Sequence[Call]) -> str:
    """Writes calls as `hermes` blocks, one `<tool_call>` per call, one per line.

    Domain: any non-blank name without surrounding white space, any JSON-compatible arguments.

    Args:
        calls (`Sequence[tuple[str, Mapping[str, Any]]]`): `(name, arguments)` pairs.
    """
    return "\n".join(
        f"{TOOL_CALL_OPEN}\n{dump_json({'name': name, 'arguments': dict(arguments)})}\n{TOOL_CALL_CLOSE}"
        for name, arguments in calls
    )


FORMAT = ToolFormat(
    parser=HermesParser,
    render=render_hermes,
    instruction=f'{TOOL_CALL_OPEN}\n{{"name": "<tool name>", "arguments": {{"<argument>": <value>}}}}\n'
    f"{TOOL_CALL_CLOSE}",
    template_markers=(TOOL_CALL_OPEN,),
    special_tokens=(TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<tool_response>", "</tool_response>"),
)
