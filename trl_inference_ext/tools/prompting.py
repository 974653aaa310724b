"""Putting tool descriptions into prompts: the chat template's `tools=` when it renders them, else a preamble."""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidTypeError
from .parsers import get_format

_PROBE_NAME = "trl_inference_ext_probe_tool"
_ASSISTANT_MARKER = "trl_inference_ext_assistant_turn"


def call_instruction(parser_name: str, chat_template: str | None = None) -> str:
    """The call layout a prompt shows for a tool-call format (the format's `ToolFormat.instruction`).

    Args:
        parser_name (`str`): A name from `tools.parsers.PARSER_NAMES`; `"auto"` is the format the chat template
            teaches, else `registry.DEFAULT_FORMAT`.
        chat_template (`str`, *optional*): The tokenizer's chat template, used for `"auto"`.

    Raises:
        ValueError: If `parser_name` is not a known parser name.
    """
    return get_format(parser_name, chat_template=chat_template).instruction


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders the `tools=` argument (checked once per tokenizer)."""
    cached = getattr(tokenizer, "_trl_inference_ext_renders_tools", None)
    if cached is not None:
        return bool(cached)
    renders = False
    if getattr(tokenizer, "chat_template", None):
        probe = {"type": "function", "function": {"name": _PROBE_NAME, "description": "", "parameters": {}}}
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}], tools=[probe], tokenize=False, add_generation_prompt=True
            )
            renders = _PROBE_NAME in text
        except Exception:  # a template that rejects tools does not render them
            renders = False
    tokenizer._trl_inference_ext_renders_tools = renders
    return renders


def tool_preamble(schemas: list[dict[str, Any]], parser_name: str, *, chat_template: str | None = None) -> str:
    """A plain-text description of the tools and of the exact call format the selected parser reads.

    Args:
        schemas (`list[dict]`): Normalised tool schemas.
        parser_name (`str`): The tool-call format (see `call_instruction`).
        chat_template (`str`, *optional*): The tokenizer's chat template, used when `parser_name` is `"auto"`.

    Raises:
        ValueError: If `parser_name` is not a known parser name.
    """
    instruction = call_instruction(parser_name, chat_template)
    lines = ["You can call the following tools:"]
    lines += [json.dumps(s["function"], ensure_ascii=False) for s in schemas]
    lines += [
        "",
        "To call a tool, write exactly:",
        instruction,
        "Call several tools by repeating the format. If no tool is needed, answer directly.",
    ]
    return "\n".join(lines)


def build_tool_prompt(
    tokenizer: Any,
    prompt: Any,
    schemas: list[dict[str, Any]],
    parser_name: str,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Returns the prompt with tools described: token ids for chat messages, text for a text prompt.

    Chat messages come back as token ids when the template renders `tools=`, else as messages with the preamble in the
    system turn (encoded later by `InferenceModule.encode_prompts`, with the same `chat_template_kwargs`).

    Args:
        tokenizer: A transformers tokenizer.
        prompt: A string or a list of chat messages.
        schemas (`list[dict]`): Normalised tool schemas (see `tools.schema.normalize_tools`).
        parser_name (`str`): The selected tool-call format, described in the preamble.
        chat_template_kwargs (`dict`, *optional*): Extra template variables passed to `apply_chat_template` (see
            `tokenization.check_chat_template_kwargs`).

    Raises:
        TypeError: If `prompt` is token ids and tools must be added (ids cannot be augmented safely).
        ValueError: If `parser_name` is not a known parser name.
    """
    if not schemas:
        return prompt
    preamble = tool_preamble(schemas, parser_name, chat_template=getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        return f"{preamble}\n\n{prompt}"
    if not (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt)):
        raise InvalidTypeError("With `available_tools`, prompts must be strings or chat message lists, not token ids.")
    messages = [dict(m) for m in prompt]
    if template_renders_tools(tokenizer):
        encoded = tokenizer.apply_chat_template(
            messages,
            tools=schemas,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return list(encoded["input_ids"])
    if messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0].get('content', '')}\n\n{preamble}"
    else:
        messages.insert(0, {"role": "system", "content": preamble})
    return messages


def tool_results_text(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    chat: bool,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """The text that follows a finished assistant turn to show tool results and open the next assistant turn.

    For chat prompts it is rendered by the chat template (tool messages, then the generation prompt), as the
    difference between a conversation with and without the tool messages, starting right after the assistant's
    end-of-turn token. A template that renders the last assistant turn otherwise than an earlier one (Qwen3 adds an
    empty `<think></think>` block to the last) is cut right after the end-of-turn token that closes the assistant's
    content instead. Plain-text prompts get `<tool_response>` blocks.

    Args:
        tokenizer: A transformers tokenizer.
        messages (`list[dict]`): Tool messages (`{"role": "tool", "name", "content"}`).
        chat (`bool`): Whether the prompt went through the chat template.
        chat_template_kwargs (`dict`, *optional*): Extra template variables passed to `apply_chat_template` (e.g.
            `{"enable_thinking": False}`, which shapes the generation prompt that opens the next turn).

    Returns:
        `tuple[str, bool]`: The text, and whether it must be preceded by the end-of-turn (EOS) token.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        extra = chat_template_kwargs or {}
        dialogue = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _ASSISTANT_MARKER}]
        try:
            base = tokenizer.apply_chat_template(dialogue, tokenize=False, **extra)
            full = tokenizer.apply_chat_template(
                dialogue + messages, tokenize=False, add_generation_prompt=True, **extra
            )
        except Exception:  # a template without a tool role: fall back to plain text
            base = full = ""
        eos = tokenizer.eos_token or ""
        cut = base.rfind(eos) if eos else -1
        prefix = base[: cut + len(eos)] if cut >= 0 else base
        if base and full.startswith(prefix):
            return full[len(prefix) :], cut >= 0
        marker = full.find(_ASSISTANT_MARKER)
        end = full.find(eos, marker) if eos and marker >= 0 else -1
        if end >= 0:
            return full[end + len(eos) :], True
    blocks = "".join(f"\n<tool_response>\n{m['content']}\n</tool_response>" for m in messages)
    return blocks + "\n", False
