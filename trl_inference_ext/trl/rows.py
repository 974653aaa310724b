"""The dataset row behind each prompt a `rollout_func` receives.

TRL calls `rollout_func(prompts, trainer)` with the prompts only, while an environment's `reset(**row)` needs the
whole row (an answer, a seed, a task id). Two ways to get it, tried in this order:

1. `tag_rows(dataset)`: the dataset handed to the trainer delivers each prompt with its text (a chat prompt: its last
   message's text) as a `str` subclass that carries the row. TRL copies prompts with `copy.deepcopy`, which keeps
   the subclass and its row, so each prompt brings its own row, also when several rows share one prompt text.
   Exact in every case.
2. Otherwise the prompt is looked up in `trainer.train_dataset` and `trainer.eval_dataset` (an index built once per
   dataset). Exact when no two rows with this prompt differ in another column; when they do, the lookup cannot tell
   which row TRL drew and raises, naming `tag_rows`.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidValueError


class RowText(str):
    """A prompt's text that carries its dataset row (`.row`)."""

    row: dict[str, Any]


def _tagged(prompt: Any, row: dict[str, Any]) -> Any:
    """`prompt` with its text (a text prompt) or its last message's text (a chat prompt) as a `RowText`.

    The row rides on a string, not on the list or dict around it: accelerate's data loader rebuilds lists and
    dicts (`type(obj)(...)`, which would drop an attribute), but passes strings through as they are.
    """
    if isinstance(prompt, str):
        text = RowText(prompt)
        text.row = row
        return text
    messages = [dict(m) for m in prompt]
    if not messages:
        return prompt
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = _tagged(content, row)
    elif (
        isinstance(content, list)
        and content
        and isinstance(content[-1], dict)
        and isinstance(content[-1].get("text"), str)
    ):
        last["content"] = [*content[:-1], {**content[-1], "text": _tagged(content[-1]["text"], row)}]
    return messages


def carried_row(prompt: Any) -> dict[str, Any] | None:
    """The row `tag_rows` attached to `prompt`, or `None`."""
    if isinstance(prompt, str):
        row = getattr(prompt, "row", None)
        return row if isinstance(row, dict) else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        content = prompt[-1].get("content")
        if isinstance(content, list) and content and isinstance(content[-1], dict):
            content = content[-1].get("text")
        return carried_row(content) if isinstance(content, str) else None
    return None


def _tag_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    columns = list(batch)
    rows = [dict(zip(columns, values)) for values in zip(*batch.values())]
    return {**batch, "prompt": [_tagged(row["prompt"], row) for row in rows]}


def tag_rows(dataset: Any) -> Any:
    """The same dataset, delivering each `prompt` with its row attached (see the module docstring).

    Args:
        dataset (`datasets.Dataset`): A dataset with a `prompt` column.

    Returns:
        `datasets.Dataset`: A view with an on-the-fly transform (`with_transform`); the data is not copied.
    """
    if "prompt" not in getattr(dataset, "column_names", []):
        raise InvalidValueError("`tag_rows` needs a dataset with a `prompt` column.")
    return dataset.with_transform(_tag_batch)


def prompt_key(prompt: Any) -> str:
    """A hashable key equal for equal prompts (text or messages)."""
    return json.dumps(prompt if isinstance(prompt, str) else list(prompt), sort_keys=True, default=str)


class RowFinder:
    """Finds the row of each prompt: its tag, or a lookup in the trainer's datasets (see the module docstring)."""

    def __init__(self) -> None:
        self._indexes: dict[int, dict[str, list[dict[str, Any]]]] = {}

    def rows(self, prompts: list[Any], trainer: Any) -> list[dict[str, Any]]:
        """One row per prompt.

        Raises:
            InvalidValueError: If a prompt is in no dataset of the trainer, or in several rows that differ.
        """
        out = []
        for prompt in prompts:
            row = carried_row(prompt)
            out.append(dict(row) if row is not None else self._lookup(prompt, trainer))
        return out

    def _lookup(self, prompt: Any, trainer: Any) -> dict[str, Any]:
        key = prompt_key(prompt)
        candidates: list[dict[str, Any]] = []
        for dataset in _datasets(trainer):
            candidates += self._index(dataset).get(key, [])
        distinct = {json.dumps(row, sort_keys=True, default=str): row for row in candidates}
        if len(distinct) == 1:
            return dict(next(iter(distinct.values())))
        if not distinct:
            raise InvalidValueError(
                f"The prompt {key[:200]} is in no row of the trainer's train or eval dataset, so its environment "
                "cannot be reset with its row. Pass the dataset through `tag_rows(dataset)` "
                "(`trl_inference_ext.trl.tag_rows`) so that each prompt carries its row."
            )
        raise InvalidValueError(
            f"{len(distinct)} dataset rows share the prompt {key[:200]} but differ in other columns, so the row TRL "
            "drew cannot be told from the prompt. Pass the dataset through `tag_rows(dataset)` "
            "(`trl_inference_ext.trl.tag_rows`) so that each prompt carries its own row."
        )

    def _index(self, dataset: Any) -> dict[str, list[dict[str, Any]]]:
        index = self._indexes.get(id(dataset))
        if index is None:
            index = {}
            plain = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
            for row in plain:
                index.setdefault(prompt_key(row["prompt"]), []).append(dict(row))
            self._indexes[id(dataset)] = index
        return index


def _datasets(trainer: Any) -> list[Any]:
    found = []
    for dataset in (getattr(trainer, "train_dataset", None), getattr(trainer, "eval_dataset", None)):
        if isinstance(dataset, dict):
            found += list(dataset.values())
        elif dataset is not None and hasattr(dataset, "__iter__") and hasattr(dataset, "__len__"):
            found.append(dataset)
    return found
