"""Arithmetic word problems with a calculator tool: the task the GRPO recipe and the demo train on.

Problems are generated from a seed, so a run needs no dataset download. The calculator evaluates arithmetic with
`ast` on a whitelist of node types, never with `eval`, since its input is model output.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidValueError
from ..tools.parsers import get_format

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 64
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_TEMPLATES = (
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "+"),
    ("A box holds {a} pens. {b} pens are taken out. How many pens are left?", "-"),
    ("There are {a} rows of {b} chairs. How many chairs are there?", "*"),
    ("{name} reads {a} pages a day for {b} days. How many pages is that?", "*"),
    ("A train has {a} passengers and {b} more get on. How many passengers are on the train?", "+"),
)
_NAMES = ("Ana", "Ben", "Chen", "Dia", "Eli", "Femi", "Gus", "Hana")


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression with +, -, *, /, // and % on numbers.

    Args:
        expression: The arithmetic expression to evaluate, e.g. "12 * (3 + 4)".
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidValueError(f"expression must be a string of at most {MAX_EXPRESSION_CHARS} characters")
    tree = ast.parse(expression.strip(), mode="eval")
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise InvalidValueError("expression is too long")
    value = _evaluate(tree.body)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if abs(left) > 1e12 or abs(right) > 1e12:
            raise InvalidValueError("numbers are too large")
        return _BINARY[type(node.op)](left, right)
    raise InvalidValueError(f"unsupported expression element: {type(node).__name__}")


def worked_example(tool_parser: str = "hermes") -> list[dict[str, Any]]:
    """One solved exchange (question, calculator call, result, answer) that shows a small model the call format.

    Args:
        tool_parser (`str`, *optional*, defaults to `"hermes"`): The tool-call format the model is prompted with and
            parsed by (a name from `tools.parsers.PARSER_NAMES`; `"auto"` shows `registry.DEFAULT_FORMAT`). The call
            is written by that format's renderer, so the example always parses with the same parser.

    Raises:
        ValueError: If `tool_parser` is not a known parser name.
    """
    call = get_format(tool_parser).render([("calculator", {"expression": "3 * 14"})])
    return [
        {"role": "user", "content": "Sam has 3 bags with 14 marbles each. How many marbles does Sam have?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "calculator", "content": "42"},
        {"role": "assistant", "content": "Sam has 42 marbles."},
    ]


def make_problems(
    n: int, seed: int = 0, max_operand: int = 50, few_shot: bool = False, tool_parser: str = "hermes"
) -> list[dict[str, Any]]:
    """Generates `n` word problems as chat prompts with their integer answers.

    Args:
        n (`int`): Number of problems.
        seed (`int`, *optional*, defaults to 0): Seed; the same seed gives the same problems.
        max_operand (`int`, *optional*, defaults to 50): Largest operand.
        few_shot (`bool`, *optional*, defaults to `False`): Start each conversation with `worked_example(tool_parser)`.
        tool_parser (`str`, *optional*, defaults to `"hermes"`): The tool-call format of the worked example.

    Returns:
        `list[dict]`: Rows with `prompt` (a conversation ending with the question) and `answer` (an `int`).
    """
    prefix = worked_example(tool_parser) if few_shot else []
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        template, op = rng.choice(_TEMPLATES)
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
        if op == "-" and b > a:
            a, b = b, a
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = template.format(name=rng.choice(_NAMES), a=a, b=b)
        content = f"{question} Use the calculator tool, then give the final answer as a number."
        rows.append({"prompt": [*map(dict, prefix), {"role": "user", "content": content}], "answer": answer})
    return rows


_NUMBER = re.compile(r"-?\d{1,15}(?:\.\d{1,6})?")


def final_answer(text: str) -> float | None:
    """The last number in the text after the last tool result, or `None`."""
    tail = text.rsplit("</tool_response>", 1)[-1][-2000:]
    numbers = _NUMBER.findall(tail)
    return float(numbers[-1]) if numbers else None


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def correct_answer_reward(completions: Sequence[Any], answer: Sequence[int], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the final number in the completion equals the problem's answer.

    Args:
        completions (`Sequence`): Completions (text or conversational).
        answer (`Sequence[int]`): The dataset's `answer` column.
        **kwargs: Other columns and rollout fields (ignored).
    """
    out = []
    for completion, expected in zip(completions, answer):
        value = final_answer(_completion_text(completion))
        out.append(float(value is not None and abs(value - float(expected)) < 1e-6))
    return out


class CalculatorEnvironment:
    """The calculator as a stateful environment (TRL's `environment_factory` contract): one instance per rollout,
    reset with the problem's row, remembering every result it computed.

    Its `calculator` method is described exactly as the `calculator` function is, so prompts render the same tool.
    `get_reward` is 1.0 when one of the rollout's calculations produced the problem's answer: the environment scores
    the use of its tool from its own state, next to `correct_answer_reward`, which reads the final text.
    """

    def reset(self, answer: int, **row: Any) -> None:
        self.answer = int(answer)
        self.results: list[str] = []

    def calculator(self, expression: str) -> str:
        """Evaluates an arithmetic expression with +, -, *, /, // and % on numbers.

        Args:
            expression: The arithmetic expression to evaluate, e.g. "12 * (3 + 4)".
        """
        result = calculator(expression)
        self.results.append(result)
        return result

    def get_reward(self) -> float:
        return float(str(self.answer) in self.results)
