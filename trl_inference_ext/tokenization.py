"""Between text and token ids: normalising inputs (strings, ids, chat messages) and decoding completions.

Prompts and responses are tokenised separately and concatenated as ids: re-tokenising `prompt + response` as one
string can merge tokens across the boundary and score different tokens than were sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from .errors import InvalidTypeError, InvalidValueError
from .tools.parsers.registry import marker_tokens

Message = dict[str, Any]
PromptLike = Union[str, Sequence[int], Sequence[Message]]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def as_batch(value: Any, argname: str) -> list[Any]:
    """Turns a single prompt/response or a list of them into a non-empty list.

    A string, a list of ints (token ids) or a list of message dicts (one conversation) is a batch of one.

    Raises:
        ValueError: If the batch is empty.
        TypeError: If an item is not a string, a list of token ids or a list of chat messages.
    """
    if isinstance(value, str) or (_is_token_ids(value) and len(value) > 0) or _is_messages(value):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidTypeError(
            f"`{argname}` must be a string, a list of token ids, a list of chat messages, or a list of these; "
            f"got {type(value).__name__}."
        )
    if len(value) == 0:
        raise InvalidValueError(f"`{argname}` is empty: pass at least one item.")
    for i, item in enumerate(value):
        if not (isinstance(item, str) or _is_token_ids(item) or _is_messages(item)):
            raise InvalidTypeError(
                f"`{argname}[{i}]` must be a string, a list of token ids or a list of chat messages, "
                f"got {type(item).__name__}."
            )
    return list(value)


def check_ids(ids: Sequence[int], vocab_size: int, argname: str) -> list[int]:
    """Validates token ids against the vocabulary."""
    bad = [t for t in ids if t < 0 or t >= vocab_size]
    if bad:
        raise InvalidValueError(f"`{argname}` has token ids outside [0, {vocab_size}): {bad[:5]}.")
    return list(ids)


RESERVED_TEMPLATE_KWARGS: tuple[str, ...] = (
    "conversation",
    "messages",
    "tools",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "return_dict",
    "return_tensors",
    "return_assistant_tokens_mask",
    "padding",
    "truncation",
    "max_length",
    "tokenizer_kwargs",
)
"""Arguments of `apply_chat_template` that `chat_template_kwargs` may not hold: this package sets them itself (the
conversation, `tools`, the generation prompt, tokenisation) or they change the form of what comes back. The chat
template and the tools come from the tokenizer and from `tools=` / `available_tools=`, as with TRL's
`chat_template` and `tools`."""


def check_chat_template_kwargs(value: Any, argname: str = "chat_template_kwargs") -> dict[str, Any]:
    """Validates extra chat-template variables (TRL's `GRPOConfig.chat_template_kwargs`, e.g.
    `{"enable_thinking": False}` for Qwen3) and returns them as a new dict.

    Args:
        value (`dict`, *optional*): Keyword arguments passed to every `apply_chat_template` call; `None` means none.
        argname (`str`, *optional*, defaults to `"chat_template_kwargs"`): Name used in error messages.

    Returns:
        `dict[str, Any]`: A copy of `value` (`{}` for `None`).

    Raises:
        TypeError: If `value` is not a dict with string keys.
        ValueError: If it holds one of `RESERVED_TEMPLATE_KWARGS`.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidTypeError(f"`{argname}` must be a dict of chat template variables or None, got {value!r:.80}.")
    bad_keys = [k for k in value if not isinstance(k, str)]
    if bad_keys:
        raise InvalidTypeError(f"`{argname}` must have string keys, got {bad_keys[:5]!r}.")
    reserved = [k for k in value if k in RESERVED_TEMPLATE_KWARGS]
    if reserved:
        raise InvalidValueError(
            f"`{argname}` may not set {', '.join(repr(k) for k in reserved)}: trl_inference_ext sets these arguments "
            f"of `apply_chat_template` itself, or they change what it returns ({', '.join(RESERVED_TEMPLATE_KWARGS)}). "
            "It holds the template's own variables (e.g. `{'enable_thinking': False}`); tools go through `tools=` "
            "or `available_tools=`."
        )
    return dict(value)


def encode_prompt(
    tokenizer: Any,
    prompt: Any,
    argname: str,
    *,
    vocab_size: int,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of one prompt: strings are tokenised with special tokens, chat messages through the chat template.

    Args:
        tokenizer: A transformers tokenizer.
        prompt: A string, token ids, or a list of chat messages.
        argname (`str`): Name used in error messages, e.g. `"prompts[3]"`.
        vocab_size (`int`): The model's vocabulary size, to validate token ids.
        tools (`list[dict]`, *optional*): JSON-schema tools rendered by the chat template.
        chat_template_kwargs (`dict`, *optional*): Extra template variables (checked by `check_chat_template_kwargs`),
            passed to `apply_chat_template` as TRL passes `GRPOConfig.chat_template_kwargs`.
    """
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if _is_messages(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidValueError(f"`{argname}` is a list of chat messages but the tokenizer has no chat template.")
        encoded = tokenizer.apply_chat_template(
            list(prompt),
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return list(encoded["input_ids"])
    return check_ids(prompt, vocab_size, argname)


def encode_response(tokenizer: Any, response: Any, argname: str, *, vocab_size: int) -> list[int]:
    """Token ids of one response: strings are tokenised without special tokens; ids pass through."""
    if isinstance(response, str):
        return list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if _is_messages(response):
        raise InvalidTypeError(f"`{argname}` must be a string or token ids, not chat messages.")
    return check_ids(response, vocab_size, argname)


TOOL_MARKERS: frozenset[str] = marker_tokens()
"""Tokens that some tokenizers mark special but that carry tool-call or reasoning structure: kept when decoding.

They are the special tokens of every registered tool-call format (`tools.parsers.registry.FORMATS`: `<tool_call>`,
`<|python_tag|>`, `[TOOL_CALLS]`, `[ARGS]`, ...) and the reasoning markers `<think>` and `</think>`."""


class CompletionDecoder:
    """Decodes completion ids to text, dropping special tokens except the tool-call and reasoning markers.

    Args:
        tokenizer: A transformers tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        keep = {tokenizer.convert_tokens_to_ids(t) for t in TOOL_MARKERS if t in tokenizer.get_vocab()}
        self.skip_ids = frozenset(tokenizer.all_special_ids) - keep

    def __call__(self, ids: Sequence[int]) -> str:
        """Returns the text of `ids`."""
        return self.tokenizer.decode([t for t in ids if t not in self.skip_ids], skip_special_tokens=False)
