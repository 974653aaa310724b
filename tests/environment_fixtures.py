"""Environments for the tests: top-level classes, so that spawned worker processes can build them."""

from __future__ import annotations

import os
import time
from pathlib import Path

CLOSED_DIR_ENV = "TEST_ENVIRONMENT_CLOSED_DIR"
"""Where `Counter.close` leaves one file per closed instance (set by the tests; inherited by worker processes)."""


class Counter:
    """A counter that starts where the dataset row says and that the model moves with `add`."""

    def __init__(self) -> None:
        self.value = 0
        self.resets = 0
        self.pid = os.getpid()

    def reset(self, start: int = 0, **row) -> str:
        self.value = int(start)
        self.resets += 1
        return f" The counter is at {self.value}."

    def add(self, amount: int) -> int:
        """Adds to the counter.

        Args:
            amount: How much to add.

        Returns:
            The new value.
        """
        self.value += amount
        return self.value

    def state(self) -> str:
        """Reports the counter's value, how often it was reset and the process it lives in."""
        return f"value={self.value} resets={self.resets} pid={self.pid}"

    def wait(self, seconds: float) -> str:
        """Waits.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "waited"

    def crash(self) -> str:
        """Ends its process abruptly."""
        os._exit(3)

    def get_reward(self) -> float:
        return float(self.value)

    def close(self) -> None:
        folder = os.environ.get(CLOSED_DIR_ENV)
        if folder:
            (Path(folder) / f"{os.getpid()}-{id(self)}").write_text(str(self.value))


class Grouped:
    """Records which GRPO group and member its rollout is."""

    def reset(self, group_index: int, group_member: int, **row) -> None:
        self.seen = (group_index, group_member)

    def where(self) -> str:
        """Says which group and member this rollout is."""
        return f"{self.seen[0]}:{self.seen[1]}"


class NoReset:
    def act(self, x: int) -> int:
        """Acts.

        Args:
            x: A number.
        """
        return x


class MissingHint:
    def reset(self, **row) -> None:
        pass

    def move(self, direction) -> str:
        """Moves.

        Args:
            direction: Where.
        """
        return direction


class MissingDocstring:
    def reset(self, **row) -> None:
        pass

    def move(self, direction: str) -> str:
        return direction


class Adder:
    """Offers `add` as the fitted tool model knows it (same schema), shifted by the row's `offset`: the tool results
    show which row reset the instance, and the reward which results it produced."""

    def reset(self, offset: int = 0, **row) -> None:
        self.offset = int(offset)
        self.results: list[int] = []

    def add(self, a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: First number.
            b: Second number.
        """
        self.results.append(a + b + self.offset)
        return self.results[-1]

    def get_reward(self) -> float:
        return float(self.results[-1]) if self.results else -1.0

    def close(self) -> None:
        folder = os.environ.get(CLOSED_DIR_ENV)
        if folder:
            (Path(folder) / f"adder-{os.getpid()}-{id(self)}").write_text(str(self.offset))


class Observed(Adder):
    """`Adder` whose reset tells the model something."""

    def reset(self, offset: int = 0, **row) -> str:
        super().reset(offset, **row)
        return f" (offset {self.offset})"


class GroupedAdder(Adder):
    """`Adder` whose reward says which GRPO group and member its rollout is."""

    def reset(self, group_index: int, group_member: int, **row) -> None:
        super().reset(**row)
        self.group = (group_index, group_member)

    def get_reward(self) -> float:
        return self.group[0] * 100.0 + self.group[1]


class SlowAdder(Adder):
    """`Adder` whose calls take the row's `delay` seconds and leave their end time in `TEST_ENVIRONMENT_CLOSED_DIR`."""

    def reset(self, delay: float = 0.0, **row) -> None:
        super().reset(**row)
        self.delay = float(delay)

    def add(self, a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: First number.
            b: Second number.
        """
        time.sleep(self.delay)
        folder = os.environ.get(CLOSED_DIR_ENV)
        if folder:
            (Path(folder) / f"call-{self.delay}-{time.time()}").write_text("")
        return super().add(a, b)
