"""Linear-time scanning helpers shared by the tool-call parsers.

Everything here works on untrusted model output, so every routine is a single forward pass over the text: loops only
move forward, nesting depth is tracked with a capped stack, and every regex quantifier is bounded and never nested
(a repeated group such as `(?:\\.){1,4096}` holds no quantifier), so no regex can backtrack more than a bounded amount.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from ._decode import raw_decode

MAX_DEPTH = 512
"""Nesting levels tracked with positions. Deeper levels are only counted: values nested deeper are never candidates
(no decoder accepts them anyway), but the brackets still balance."""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_EMPTY_PAIRS = r"(?:\{\}|\[\]){1,4096}|\{\s{0,64}\}|\[\s{0,64}\]"
_JSON_OPENING = re.compile(r"[{\[]")
"""Finds the next opening bracket in prose (a plain character set, which the regex engine skips to quickly)."""
_JSON_OUTER = re.compile(f"({_EMPTY_PAIRS})|([{{\\[]{{1,4096}})")
"""`scan_json` tokens at an opening bracket outside brackets, by group: 1 empty pairs (skipped), 2 openings."""
_JSON_VALUE_START = re.compile(r'\s{0,256}(?:["{}\[\]0-9-]|true|false|null)')
"""What may follow an opening bracket in JSON; a bracket in prose followed by anything else is not scanned."""
_JSON_INNER = re.compile(
    r'("[^"\\]{0,4096}"[^"\\{}\[\]]{0,65536}|[^"\\{}\[\]]{1,65536})|(")|(' + _EMPTY_PAIRS + r")|([{\[]{1,4096})"
    r"|([}\]]{1,4096})|(?:\\.){1,4096}",
    re.DOTALL,
)
"""`scan_json` tokens inside brackets, by group: 1 an optional simple string and the plain characters after it, 2 the
opening quote of a string with escapes (or a long one), 3 empty pairs, 4 openings, 5 closings, none for escapes."""
_JSON_DEEP = re.compile(
    r'("[^"\\{}\[\]]{0,4096}"[^"\\}\]]{0,65536}|[^"\\}\]]{1,65536})|(")|([}\]]{1,4096})|(?:\\.){1,4096}',
    re.DOTALL,
)
"""`scan_json` tokens beyond `MAX_DEPTH`, where openings are only counted, by group: 1 an optional string without
brackets and the characters after it up to a quote or a closing (its openings are counted), 2 the opening quote of
any other string, 3 closings, none for escapes."""
_STRING_BODY = re.compile(r'(?:\\.|[^"\\]){0,4096}', re.DOTALL)
"""Up to 4096 characters or escape sequences of a JSON string body."""

_PY_OUTER = re.compile(r"[(\[{]{1,4096}")
_PY_PLAIN = r"""[^"'\\()\[\]{}]"""
_PY_INNER = re.compile(
    "("
    + r'"[^"\\\n]{0,4096}"'
    + _PY_PLAIN
    + "{0,65536}|"
    + r"'[^'\\\n]{0,4096}'"
    + _PY_PLAIN
    + "{0,65536}|"
    + _PY_PLAIN
    + "{1,65536})"
    + r"""|(["'])|([(\[{]{1,4096})|([)\]}]{1,4096})|(?:\\.){1,4096}""",
    re.DOTALL,
)
"""`ParenMatcher` tokens inside brackets, by group: 1 an optional simple string and the plain characters after it, 2
the opening quote of any other string, 3 openings, 4 closings, none for escapes."""
_PY_DEEP_PLAIN = r"""[^"'\\)\]}]"""
_PY_DEEP = re.compile(
    "("
    + r'"[^"\\\n()\[\]{}]{0,4096}"'
    + _PY_DEEP_PLAIN
    + "{0,65536}|"
    + r"'[^'\\\n()\[\]{}]{0,4096}'"
    + _PY_DEEP_PLAIN
    + "{0,65536}|"
    + _PY_DEEP_PLAIN
    + "{1,65536})"
    + r"""|(["'])|([)\]}]{1,4096})|(?:\\.){1,4096}""",
    re.DOTALL,
)
"""`ParenMatcher` tokens beyond `MAX_DEPTH`, where openings are only counted, by group: 1 an optional string without
brackets and the characters after it up to a quote or a closing (its openings are counted), 2 the opening quote of any
other string, 3 closings, none for escapes."""
_PY_STRING_BODY = {
    '"': re.compile(r'(?:\\.|[^"\\\n]){0,4096}', re.DOTALL),
    "'": re.compile(r"(?:\\.|[^'\\\n]){0,4096}", re.DOTALL),
}
"""Up to 4096 characters or escape sequences of a one-line Python string body."""

_SPACE_RUN = re.compile(r"\s{1,4096}")
_EMPTY_PAIR = re.compile(r"\{\s{0,64}\}|\[\s{0,64}\]")


JsonNode = tuple[int, int, "list[JsonNode] | None"]
"""A balanced `{...}` / `[...]` span found by `scan_json`: `(start, end, children)`.

`start` is the offset of the opening bracket, `end` the offset just past the closing one (`-1` when it never closes)
and `children` the directly nested non-empty spans in order (`None` when there are none). Plain tuples, because
adversarial inputs can hold hundreds of thousands of spans."""


def blank_think(text: str) -> str:
    """Replaces every `<think>...</think>` region (tags included) with spaces of the same length.

    Offsets stay valid, so parsers scan the blanked text and slice `raw_text` out of the original. An unclosed
    `<think>` blanks to the end of the text, and a `</think>` that appears before any `<think>` blanks everything up to
    it (templates that open the reasoning block in the prompt, so the completion only holds the closing tag).

    Args:
        text (`str`): The model output.

    Returns:
        `str`: The text with reasoning regions blanked (the same object when there are none).
    """
    first_open = text.find(THINK_OPEN)
    first_close = text.find(THINK_CLOSE)
    if first_open < 0 and first_close < 0:
        return text
    parts: list[str] = []
    pos = 0
    if first_close >= 0 and (first_open < 0 or first_close < first_open):
        pos = first_close + len(THINK_CLOSE)
        parts.append(" " * pos)
    while True:
        opening = text.find(THINK_OPEN, pos)
        if opening < 0:
            parts.append(text[pos:])
            break
        parts.append(text[pos:opening])
        closing = text.find(THINK_CLOSE, opening + len(THINK_OPEN))
        if closing < 0:
            parts.append(" " * (len(text) - opening))
            break
        pos = closing + len(THINK_CLOSE)
        parts.append(" " * (pos - opening))
    return "".join(parts)


class NextFinder:
    """Memoised `str.find` for one needle, so that repeated look-ups from increasing offsets stay linear overall.

    Without it, `n` unmatched openings each searching for a closing tag that never comes would cost `O(n^2)`.

    Args:
        text (`str`): The text to search.
        needle (`str`): The substring to find.
        end (`int`, *optional*): Search bound (defaults to `len(text)`).
    """

    __slots__ = ("_at", "_from", "end", "needle", "text")

    def __init__(self, text: str, needle: str, end: int | None = None) -> None:
        self.text = text
        self.needle = needle
        self.end = len(text) if end is None else end
        self._from = len(text) + 1
        self._at = -1

    def find(self, pos: int) -> int:
        """Returns the first occurrence at or after `pos`, or `-1`.

        Args:
            pos (`int`): Where to start; queries are cheapest when `pos` never decreases.
        """
        if self._from <= pos and (self._at < 0 or self._at >= pos):
            return self._at
        self._from = pos
        self._at = self.text.find(self.needle, pos, self.end)
        return self._at


def skip_space(text: str, pos: int, end: int) -> int:
    """Returns the first offset in `[pos, end)` that is not whitespace (or `end`).

    Args:
        text (`str`): The text.
        pos (`int`): Start offset.
        end (`int`): End bound.
    """
    while pos < end:
        match = _SPACE_RUN.match(text, pos, end)
        if match is None:
            return pos
        pos = match.end()
    return end


def empty_pair_end(text: str, pos: int, end: int) -> int:
    """Returns the offset past an empty `{}` / `[]` pair starting at `pos` (which `scan_json` skips), or `-1`.

    Args:
        text (`str`): The text.
        pos (`int`): Where the pair would start.
        end (`int`): End bound.
    """
    match = _EMPTY_PAIR.match(text, pos, end)
    return match.end() if match else -1


def rstrip_end(text: str, start: int, end: int) -> int:
    """Returns `end` moved back over trailing whitespace, not before `start`.

    Args:
        text (`str`): The text.
        start (`int`): Lower bound.
        end (`int`): Offset just past the region.
    """
    return start + len(text[start:end].rstrip())


def _skip_string(text: str, pos: int, end: int, body: re.Pattern[str], quote: str, stop: str = "") -> int:
    """Skips a string body starting at `pos` (just past the opening `quote`).

    Returns:
        `int`: The offset past the closing quote; the offset of the `stop` character (a newline for Python strings)
        that ended the string early; or `-1` when the text ends first.
    """
    while True:
        match = body.match(text, pos, end)
        pos = match.end() if match else pos
        if pos >= end:
            return -1
        char = text[pos]
        if char == quote:
            return pos + 1
        if char == stop:
            return pos
        if char == "\\" and pos + 1 >= end:
            return -1  # a lone backslash at the very end
        # otherwise the body's 4096-unit bound was reached: continue from there


_QUOTE, _OPENINGS, _CLOSINGS = 2, 4, 5
"""The `_JSON_INNER` groups of the tokens `scan_json` acts on (the other scanner states map theirs to these): the
opening quote of a string it skips, a run of opening brackets, a run of closing brackets."""
_ACTED_ON = frozenset((_QUOTE, _OPENINGS, _CLOSINGS))


class _OpenBrackets:
    """The brackets a `scan_json` pass holds open.

    The first `MAX_DEPTH` levels are tracked (`positions`, `kinds`, and the closed spans directly inside each in
    `kids`); deeper levels are only counted in `overflow`, and close first.
    """

    __slots__ = ("kids", "kinds", "overflow", "positions")

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.kinds: list[str] = []
        self.kids: list[list[JsonNode] | None] = []
        self.overflow = 0

    def push(self, text: str, first: int, last: int) -> None:
        """Opens the run of opening brackets `text[first:last]`: tracked up to `MAX_DEPTH` levels, counted beyond.

        Args:
            text (`str`): The text.
            first (`int`): Offset of the first bracket of the run.
            last (`int`): Offset just past the run.
        """
        positions, kinds, kids = self.positions, self.kinds, self.kids
        room = min(last - first, MAX_DEPTH - len(positions))
        for offset in range(first, first + room):
            positions.append(offset)
            kinds.append(text[offset])
            kids.append(None)
        self.overflow += last - first - room

    def close(self, text: str, first: int, last: int) -> JsonNode | None:
        """Closes brackets with the run of characters `text[first:last]`.

        Counted levels close first, one per character; then a character closes the innermost tracked bracket when it
        matches its kind and is ignored otherwise. A closed span is added to the children of the bracket around it.

        Args:
            text (`str`): The text.
            first (`int`): Offset of the first character of the run.
            last (`int`): Offset just past the run.

        Returns:
            `JsonNode` or `None`: The top-level span, when one closes. The rest of the run is then ignored: no bracket
            is left open for it to close.
        """
        offset = first
        if self.overflow:
            closed = min(self.overflow, last - first)
            self.overflow -= closed
            offset += closed
        positions, kinds, kids = self.positions, self.kinds, self.kids
        while offset < last and positions:
            if (text[offset] == "}") != (kinds[-1] == "{"):
                offset += 1
                continue
            offset += 1
            node = (positions.pop(), offset, kids.pop())
            kinds.pop()
            if not positions:
                return node
            if kids[-1] is None:
                kids[-1] = [node]
            else:
                kids[-1].append(node)
        return None

    def unclosed(self) -> Iterator[JsonNode]:
        """Yields the tracked brackets still open (`end == -1`), outermost first, each followed by its children."""
        for position, children in zip(self.positions, self.kids):
            yield (position, -1, None)
            if children:
                yield from children


def _next_outer(text: str, pos: int, end: int, prose: bool) -> re.Match[str] | None:
    """Finds the next run of opening brackets outside brackets (`_JSON_OUTER` group 2) that may start a JSON value.

    Empty pairs are skipped, and with `prose` so are brackets that are not followed by something that can start a
    JSON value (`[link](url)`, `{x}`). Every step moves past a match.

    Returns:
        `re.Match` or `None`: The run, or `None` when the text has no more.
    """
    while True:
        opening = _JSON_OPENING.search(text, pos, end)
        if opening is None:
            return None
        match = _JSON_OUTER.match(text, opening.start(), end)
        if match is None:  # cannot happen: an opening bracket always starts a token
            return None
        pos = match.end()
        if match.lastindex != 1 and (not prose or _JSON_VALUE_START.match(text, pos, end) is not None):
            return match


def _next_inner(text: str, pos: int, end: int) -> re.Match[str] | None:
    """Finds the next token inside brackets that `scan_json` acts on: a quote, openings or closings.

    Runs of plain characters and simple strings, empty pairs and escape sequences before it are skipped, one regex
    match per run.

    Returns:
        `re.Match` or `None`: The `_JSON_INNER` match (group `_QUOTE`, `_OPENINGS` or `_CLOSINGS`), or `None` when the
        text has no more.
    """
    while True:
        match = _JSON_INNER.search(text, pos, end)
        if match is None:
            return None
        group = match.lastindex
        if group in _ACTED_ON:
            return match
        pos = match.end()


def _next_deep(text: str, pos: int, end: int) -> tuple[re.Match[str] | None, int]:
    """Finds the next token beyond `MAX_DEPTH`, where openings are only counted: a quote, closings or escapes.

    Returns:
        `tuple[re.Match | None, int]`: The `_JSON_DEEP` match (group 2, 3 or none for escapes), or `None` when the
        text has no more; and the number of opening brackets in the runs skipped before it.
    """
    opened = 0
    while True:
        match = _JSON_DEEP.search(text, pos, end)
        if match is None or match.lastindex != 1:
            return match, opened
        pos = match.end()
        opened += text.count("{", match.start(), pos) + text.count("[", match.start(), pos)


def scan_json(
    text: str,
    start: int = 0,
    end: int | None = None,
    decoded: dict[int, Any] | None = None,
    *,
    prose: bool = True,
) -> Iterator[JsonNode]:
    """Finds the maximal balanced `{...}` / `[...]` spans of a text in one pass, lazily.

    Brackets are matched with a stack; double-quoted strings (with backslash escapes) are skipped inside brackets but
    not in prose, so apostrophes and stray quotes outside JSON do no harm. A closing bracket that does not match the
    innermost opening one is ignored. Runs of plain characters and simple strings, of brackets and of escape
    sequences are each consumed by one regex match, and empty pairs (`{}`, `[ ]`) produce no node, which keeps
    adversarial inputs such as `{{{{...`, `{}{}{}...` or long runs of escaped quotes fast.

    Top-level spans are yielded as soon as they close, so a consumer that stops early does not pay for the rest of
    the text. With `decoded`, each top-level span is first decoded as JSON in one C call; when that succeeds the
    span is yielded at once (without children) and its value stored in `decoded` under its start offset, which
    makes valid JSON nearly free. The attempts cover disjoint spans, so this stays linear. Brackets still open at
    the end of the text come last, as nodes with `end == -1`, each followed by the balanced spans directly inside
    it, so a complete call after a stray `{` in prose is still found.

    Args:
        text (`str`): The text to scan.
        start (`int`, *optional*, defaults to `0`): Start offset.
        end (`int`, *optional*): End bound (defaults to `len(text)`).
        decoded (`dict[int, Any]`, *optional*): Where to store the values of top-level spans that are valid JSON.
        prose (`bool`, *optional*, defaults to `True`): Whether the text is prose, where a top-level bracket that is
            not followed by something that can start a JSON value (`[link](url)`, `{x}`) is not a span. Set to
            `False` when the text is expected to be JSON, so that malformed spans are still reported.

    Yields:
        `JsonNode`: Top-level nodes in order of position.
    """
    if end is None:
        end = len(text)
    stack = _OpenBrackets()
    positions = stack.positions  # the same list all along, bound once: tested on every token
    pos = start
    while True:
        if stack.overflow:  # beyond MAX_DEPTH
            match, opened = _next_deep(text, pos, end)
            stack.overflow += opened
            if match is None:
                break
            # closings; an escape run (no group) is handled as closings too, where inside brackets it is skipped
            group = _CLOSINGS if match.lastindex == 3 else match.lastindex
        elif positions:  # inside brackets
            match = _next_inner(text, pos, end)
            if match is None:
                break
            group = match.lastindex
        else:  # in prose
            match = _next_outer(text, pos, end, prose)
            if match is None:
                break
            first = match.start()
            if decoded is not None:
                value = raw_decode(text, first)
                if value is not None and value[1] <= end:
                    decoded[first] = value[0]
                    pos = value[1]
                    yield (first, pos, None)
                    continue
            group = _OPENINGS
        pos = match.end()
        if group == _QUOTE:
            pos = _skip_string(text, pos, end, _STRING_BODY, '"')
            if pos < 0:
                break
        elif group == _OPENINGS:
            stack.push(text, match.start(), pos)
        else:
            node = stack.close(text, match.start(), pos)
            if node is not None:
                yield node
    yield from stack.unclosed()


class ParenMatcher:
    """Matches Python-style brackets lazily, in one forward pass, skipping quoted strings inside brackets.

    Strings use `"` or `'` with backslash escapes and end at a newline (a broken quote can only hide one line).
    Quotes outside brackets are prose and ignored, and parentheses inside strings are never matched. The scan only
    advances as far as the queries need, so a caller that stops early does not pay for the rest of the text.

    Args:
        text (`str`): The text to scan.
        start (`int`, *optional*, defaults to `0`): Where scanning starts.
    """

    def __init__(self, text: str, start: int = 0) -> None:
        self._closes: dict[int, int] = {}
        self._unclosed: frozenset[int] = frozenset()
        self._done = False
        self._events = self._scan(text, start)

    def close_of(self, paren: int) -> int | None:
        """Returns the offset just past the `)` matching the `(` at `paren`, or `None` if it never closes.

        Args:
            paren (`int`): Offset of a `(` at or after the start offset.
        """
        closes = self._closes
        while paren not in closes and not self._done:
            event = next(self._events, None)
            if event is None:
                self._done = True
                break
            closes[event[0]] = event[1]
        return closes.get(paren)

    def is_unclosed(self, paren: int) -> bool:
        """Whether the `(` at `paren` is still open at the end of the text (valid after `close_of` returned `None`).

        Args:
            paren (`int`): Offset of a `(`.
        """
        return paren in self._unclosed

    def _scan(self, text: str, start: int) -> Iterator[tuple[int, int]]:
        end = len(text)
        positions: list[int] = []
        kinds: list[str] = []
        overflow = 0
        pos = start
        pairs = {")": "(", "]": "[", "}": "{"}
        while True:
            if overflow:
                match = _PY_DEEP.search(text, pos, end)
                if match is None:
                    break
                group = match.lastindex
                if group == 1:
                    run = text[match.start() : match.end()]
                    overflow += run.count("(") + run.count("[") + run.count("{")
                    group = None
                elif group == 3:
                    group = 4
            elif positions:
                match = _PY_INNER.search(text, pos, end)
                if match is None:
                    break
                group = match.lastindex
                if group == 1:
                    group = None
            else:
                match = _PY_OUTER.search(text, pos, end)
                if match is None:
                    break
                group = 3
            pos = last = match.end()
            if group is None:
                continue
            first = match.start()
            if group == 2:
                pos = _skip_string(text, last, end, _PY_STRING_BODY[text[first]], text[first], "\n")
                if pos < 0:
                    break
                continue
            if group == 3:
                room = min(last - first, MAX_DEPTH - len(positions))
                for offset in range(first, first + room):
                    positions.append(offset)
                    kinds.append(text[offset])
                overflow += last - first - room
                continue
            offset = first
            if overflow:
                closed = min(overflow, last - first)
                overflow -= closed
                offset += closed
            while offset < last and positions:
                if pairs[text[offset]] != kinds[-1]:
                    offset += 1
                    continue
                position = positions.pop()
                offset += 1
                if kinds.pop() == "(":
                    yield position, offset
        self._unclosed = frozenset(p for p, kind in zip(positions, kinds) if kind == "(")


class Block(NamedTuple):
    """One `<open>...</close>` region found by `iter_blocks`.

    Attributes:
        start (`int`): Offset of the opening tag.
        body_start (`int`): Offset just past the opening tag.
        body_end (`int`): Offset of the closing tag, or where the unclosed body stops (the next opening tag or the
            end of the text).
        end (`int`): Offset just past the closing tag (`body_end` when unclosed).
        closed (`bool`): Whether the closing tag was found.
    """

    start: int
    body_start: int
    body_end: int
    end: int
    closed: bool


def block_at(
    text: str, start: int, open_tag: str, opens: NextFinder, closes: NextFinder, *, json_bodies: bool = False
) -> Block:
    """The tagged block whose opening tag is at `start`.

    Its closing tag is the first one after the opening tag, unless the next opening tag comes first: the block is
    then unclosed and stops at that opening tag (or at the end of the text).

    Args:
        text (`str`): The text.
        start (`int`): Offset of the opening tag.
        open_tag (`str`): Opening tag, e.g. `"<tool_call>"`.
        opens (`NextFinder`): Finder of the opening tag in `text`.
        closes (`NextFinder`): Finder of the closing tag in `text`.
        json_bodies (`bool`, *optional*, defaults to `False`): When the body starts with a valid JSON value, look
            for the tags only after it, so that tags written inside JSON strings do not end the block.
    """
    body_start = search_from = start + len(open_tag)
    if json_bodies:
        value_start = skip_space(text, body_start, len(text))
        if value_start < len(text) and text[value_start] in "{[":
            decoded = raw_decode(text, value_start)
            if decoded is not None:
                search_from = decoded[1]
    following = opens.find(search_from)
    closing = closes.find(search_from)
    if closing >= 0 and (following < 0 or closing < following):
        return Block(start, body_start, closing, closing + len(closes.needle), True)
    end = following if following >= 0 else len(text)
    return Block(start, body_start, end, end, False)


def iter_blocks(text: str, open_tag: str, close_tag: str, *, json_bodies: bool = False) -> Iterator[Block]:
    """Yields the tagged blocks of a text in order, in linear time.

    A block whose closing tag is missing (or comes after the next opening tag) is unclosed and stops at the next
    opening tag or at the end of the text. Stray closing tags are ignored.

    Args:
        text (`str`): The text.
        open_tag (`str`): Opening tag, e.g. `"<tool_call>"`.
        close_tag (`str`): Closing tag, e.g. `"</tool_call>"`.
        json_bodies (`bool`, *optional*, defaults to `False`): When a body starts with a valid JSON value, look for
            the tags only after it, so that tags written inside JSON strings do not end the block.
    """
    opens = NextFinder(text, open_tag)
    closes = NextFinder(text, close_tag)
    pos = 0
    while True:
        start = opens.find(pos)
        if start < 0:
            return
        block = block_at(text, start, open_tag, opens, closes, json_bodies=json_bodies)
        pos = block.end
        yield block
