"""A real tool and the conversation a tiny model is fitted on, shared by the tool and TRL tests."""

from __future__ import annotations


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: First number.
        b: Second number.
    """
    return a + b


def broken_add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: First number.
        b: Second number.
    """
    raise ValueError("overflow")


broken_add.__name__ = "add"  # described as `add` is, so the prompt is the one the model was fitted on


def tool_conversation(a: int, b: int) -> list[dict]:
    return [
        {"role": "user", "content": f"add {a} and {b}"},
        {
            "role": "assistant",
            "content": f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>',
        },
        {"role": "tool", "name": "add", "content": str(a + b)},
        {"role": "assistant", "content": f"the answer is {a + b}"},
    ]
