"""Environment instances in worker processes (and in-process): state per instance, deadlines, crashes, cleanup."""

from __future__ import annotations

import os

import pytest
from environment_fixtures import CLOSED_DIR_ENV, Counter, MissingDocstring, MissingHint, NoReset

from trl_inference_ext.errors import InvalidTypeError, InvalidValueError, OperationError
from trl_inference_ext.tools.environment_host import EnvironmentExecutor, EnvironmentPool
from trl_inference_ext.tools.environments import environment_specs, observation_prompt
from trl_inference_ext.types import ToolCall


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, arguments, "", 0, 0)


def test_spec_offers_public_methods_and_keeps_lifecycle_apart():
    (spec,) = environment_specs(Counter).values()
    assert spec.tools == ("add", "crash", "state", "wait")
    assert "close" not in spec.tools and "reset" not in spec.tools and "get_reward" not in spec.tools
    assert spec.has_reward and spec.has_close
    assert [s["function"]["name"] for s in spec.schemas] == list(spec.tools)
    assert spec.schemas[0]["function"]["parameters"]["properties"]["amount"]["type"] == "integer"


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (NoReset, "has no `reset`"),
        (MissingHint, "`move`.*type hint"),
        (MissingDocstring, "`move`.*no docstring"),
        ({}, "empty dict"),
    ],
)
def test_unusable_environments_are_refused_naming_what_is_missing(factory, message):
    with pytest.raises(InvalidValueError, match=message):
        environment_specs(factory)


def test_an_environment_a_worker_cannot_import_is_refused_unless_in_process():
    class Local(Counter):
        pass

    specs = environment_specs(Local)
    with pytest.raises(InvalidTypeError, match="cannot be sent to a worker process"):
        EnvironmentPool(specs)
    EnvironmentPool(specs, isolation="thread").close()


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_state_stays_with_its_instance_and_every_instance_is_closed(isolation, tmp_path, monkeypatch):
    monkeypatch.setenv(CLOSED_DIR_ENV, str(tmp_path))
    pool = EnvironmentPool(environment_specs(Counter), isolation=isolation, max_instances=4)
    a, b = pool.acquire(None), pool.acquire(None)
    assert a.call("reset", {"start": 10}, 30)[1] == " The counter is at 10."
    assert b.call("reset", {"start": 100}, 30)[1] == " The counter is at 100."
    for _ in range(3):
        a.call("add", {"amount": 1}, 30)
    assert b.call("add", {"amount": 5}, 30) == (None, "105")
    assert a.call("get_reward", {}, 30) == (None, "13.0")
    pid_a, pid_b = a.call("state", {}, 30)[1].split("pid=")[1], b.call("state", {}, 30)[1].split("pid=")[1]
    assert (pid_a != pid_b) == (isolation == "process") and (pid_a == str(os.getpid())) == (isolation == "thread")
    pool.release(a)
    assert pool.acquire(None) is a  # reused: the next rollout starts with its own `reset`
    assert a.call("reset", {}, 30)[1] == " The counter is at 0." and "resets=2" in a.call("state", {}, 30)[1]
    pool.close()
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["0", "105"]
    with pytest.raises(OperationError, match="closed"):
        pool.acquire(None)


def test_a_hung_or_crashed_instance_is_lost_and_replaced_and_the_rollout_sees_errors():
    pool = EnvironmentPool(environment_specs(Counter), max_instances=2)
    try:
        host = pool.acquire(None)
        host.call("reset", {}, 30)
        executor = EnvironmentExecutor(host, None, timeout=1.0)
        results = executor.run([call("add", amount=2), call("wait", seconds=60), call("add", amount=1)])
        assert [r.ok for r in results] == [True, False, False]
        assert results[1].error == "timeout" and results[2].error == "crashed"
        assert not host.alive
        pool.release(host)  # closed, not kept
        fresh = pool.acquire(None)
        assert fresh is not host and fresh.call("reset", {"start": 1}, 30)[0] is None
        (crashed,) = EnvironmentExecutor(fresh, None, timeout=30).run([call("crash")])
        assert crashed.error == "crashed" and "exited with code 3" in crashed.content
        (unknown,) = EnvironmentExecutor(pool.acquire(None), None, timeout=30).run([call("reset")])
        assert unknown.error == "unknown_tool"  # lifecycle methods are not tools
    finally:
        pool.close()


def test_the_number_of_live_instances_is_bounded():
    pool = EnvironmentPool(environment_specs({"a": Counter, "b": Counter}), isolation="thread", max_instances=2)
    first = pool.acquire("a")
    pool.acquire("a")
    with pytest.raises(OperationError, match="max_environments=2"):
        pool.acquire("b")
    pool.release(first)
    assert pool.acquire("b").spec.name == "b" and pool.live == 2  # the idle "a" made room
    pool.close()


def test_observation_is_appended_as_trl_appends_it():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "go"}]
    assert observation_prompt(chat, " now")[-1] == {"role": "user", "content": "go now"}
    assert chat[-1]["content"] == "go"  # rebuilt, not mutated
    assert observation_prompt("go", " now") == "go now"
    assert observation_prompt(chat, "") is chat


def test_the_calculator_environment_describes_its_tool_as_the_calculator_function_and_scores_its_state():
    from trl_inference_ext.tasks.arithmetic import CalculatorEnvironment, calculator
    from trl_inference_ext.tools.schema import normalize_tool

    (spec,) = environment_specs(CalculatorEnvironment).values()
    assert spec.tools == ("calculator",) and spec.has_reward
    assert spec.schemas[0]["function"] == normalize_tool(calculator)["function"]  # the prompt shows the same tool
    env = CalculatorEnvironment()
    env.reset(answer=42, prompt="ignored")
    assert env.get_reward() == 0.0
    assert env.calculator("6 * 7") == "42" and env.get_reward() == 1.0
