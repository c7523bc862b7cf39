"""env=math_python: tool turns, error accounting, budgets and rewards, with the real sandbox.

The model's replies are written here as Actions (what the renderer parses from sampled
tokens); the tool calls run in real sandbox sessions.
"""

from __future__ import annotations

import json
import time

import pytest

from mathrl.envs.base import step_envs
from mathrl.envs.math_python import MathPythonConfig, MathPythonDataset, MathPythonEnv, ToolOptions, tool_messages
from mathrl.envs.registry import env_options
from mathrl.rollout.metrics import group_metrics
from mathrl.types import Action, Message, ToolCall, Trajectory, TrajectoryGroup, Transition

OPTIONS = ToolOptions(tool_wall_s=2.0, tool_cpu_s=1.0, one_shot=False)


def call(code: str, k: int = 0) -> Action:
    tool_call = ToolCall("python", json.dumps({"code": code}), f"call_{k}")
    return Action(f"<tool_call>{code}</tool_call>", Message("assistant", "", tool_calls=(tool_call,)))


def final(text: str) -> Action:
    return Action(text, Message("assistant", text))


def env(reference: str = "43", options: ToolOptions = OPTIONS) -> MathPythonEnv:
    return MathPythonEnv(tool_messages("What is 6 * 7 + 1?", options), reference, "boxed", options)


def test_a_tool_turn_runs_the_code_and_answers_with_its_output():
    e = env()
    try:
        result = e.step(call("x = 6 * 7\nprint(x)"))
        assert not result.episode_done and result.reward == 0.0
        (message,) = result.next_messages
        assert (message.role, message.content, message.tool_call_id) == ("tool", "42", "call_0")
        assert result.metrics["num_tool_calls"] == 1 and result.metrics["num_tool_errors"] == 0
        assert result.logs["tool_calls"][0]["code"] == "x = 6 * 7\nprint(x)"
        assert e.step(call("x + 1")).next_messages[0].content == "43"  # the session keeps its state
        done = e.step(final("So the answer is \\boxed{43}."))
        assert done.episode_done and done.reward == 1.0 and done.metrics["correct"] == 1.0
        assert done.logs["answer"] == "43"
    finally:
        e.close()
    assert e.session is None


@pytest.mark.parametrize(
    ("code", "kind", "says"),
    [
        ("print(1", "syntax", "SyntaxError"),
        ("1 / 0", "runtime", "ZeroDivisionError"),
        ("while True:\n    pass", "timeout", "TimeoutError"),
        ("x = bytearray(8 * 1024**3)", "memory", "MemoryError"),
    ],
)
def test_tool_errors_are_counted_by_kind_and_cost_reward(code, kind, says):
    e = env()
    try:
        result = e.step(call(code))
        assert says in result.next_messages[0].content  # the model reads what went wrong
        assert result.metrics[f"num_tool_errors/{kind}"] == 1 and result.metrics["num_tool_errors"] == 1
        assert result.reward == pytest.approx(-0.1)
        assert e.step(final("\\boxed{43}")).reward == 1.0  # total: correct - 0.1 x errors
    finally:
        e.close()


def test_a_lost_session_is_told_to_the_model():
    e = env()
    try:
        e.step(call("kept = 1"))
        lost = e.step(call("import os\nos._exit(3)"))
        assert lost.metrics["num_state_lost"] == 1 and lost.metrics["num_tool_errors/runtime"] == 1
        assert "variables and imports are gone" in lost.next_messages[0].content
        assert "NameError" in e.step(call("kept")).next_messages[0].content
    finally:
        e.close()


def test_an_unreadable_call_is_a_tool_message_with_the_parse_error():
    e = env()
    broken = Action("<tool_call>{oops</tool_call>", Message("assistant", ""), ("the call is not valid JSON",))
    result = e.step(broken)
    assert not result.episode_done
    assert result.next_messages[0].content.startswith("Error: the tool call could not be read: the call is not valid")
    assert result.metrics["num_tool_errors/parse"] == 1 and result.reward == pytest.approx(-0.1)
    e.close()


def test_the_tool_budget_ends_the_episode_and_a_cut_reply_too():
    e = env(options=ToolOptions(max_tool_calls=1, one_shot=False))
    try:
        assert not e.step(call("print(42)")).episode_done
        over = e.step(call("print(43)"))  # past max_tool_calls: not run, graded as it is
        assert over.episode_done and over.metrics["over_budget"] == 1.0 and over.reward == 0.0
    finally:
        e.close()
    cut = env().step(Action("<tool_call>", Message("assistant", "<tool_call>"), ("unclosed",), 8, truncated=True))
    assert cut.episode_done and cut.metrics["void"] == 1.0


def test_void_replies_are_flagged_for_dropping_only_when_asked():
    plain = env().step(final("I am not sure."))
    assert plain.metrics["void"] == 1.0 and "drop_trajectory" not in plain.metrics
    dropping = env(options=ToolOptions(drop_void_turns=True, one_shot=False)).step(final("I am not sure."))
    assert dropping.metrics["drop_trajectory"] == 1.0
    answered = env(options=ToolOptions(drop_void_turns=True, one_shot=False)).step(final("\\boxed{7}"))
    assert answered.metrics["void"] == 0.0 and "drop_trajectory" not in answered.metrics


def test_a_turn_of_many_episodes_runs_their_calls_at_once():
    envs = [env() for _ in range(16)]
    try:
        start = time.monotonic()
        results = step_envs(envs, [call("import time\ntime.sleep(1)\nprint('done')") for _ in envs])
        assert time.monotonic() - start < 6  # 16 one-second calls, not 16 seconds
        assert all(r.next_messages[0].content == "done" for r in results)
    finally:
        for e in envs:
            e.close()


def test_metrics_sum_tool_counts_per_episode():
    def transition(metrics: dict[str, float], done: bool) -> Transition:
        from mathrl.types import Completion

        return Transition((), Completion((1,), (0.0,), "stop"), "", 0.0, done, metrics)

    tool = {"correct": 0.0, "num_tool_calls": 1.0, "num_tool_errors": 1.0, "num_tool_errors/syntax": 1.0,
            "num_state_lost": 0.0}  # fmt: skip
    episode = Trajectory((transition(tool, False), transition(tool, False), transition({"correct": 1.0}, True)))
    short = Trajectory((transition({"correct": 0.0}, True),))
    metrics = group_metrics([TrajectoryGroup((episode, short))])
    assert metrics["env/all/num_tool_calls"] == 1.0 and metrics["env/all/num_tool_errors/syntax"] == 1.0
    assert metrics["env/all/num_turns"] == 2.0 and metrics["env/all/correct"] == 0.5
    assert metrics["env/all/frac_state_lost"] == 0.0


def test_math_python_takes_any_source_and_its_options():
    options = env_options("math_python", {"dataset": "arithmetic", "operators": "*", "min_operand": 100,
                                           "max_operand": 999, "max_tool_calls": 2})  # fmt: skip
    assert isinstance(options, MathPythonConfig) and options.max_tool_calls == 2
    data = MathPythonDataset(options, groups_per_batch=2, seed=0)
    builder = data.get_batch(0)[0]
    messages = builder.messages
    assert messages[0].role == "system" and "python tool" in messages[0].content
    assert [m.role for m in messages[1:]] == ["user", "assistant", "tool", "assistant", "user"]  # the one-shot
    x, y = messages[-1].content.removeprefix("What is ").removesuffix("?").split(" * ")
    assert int(x) * int(y) == int(builder.reference) and 100 <= int(x) <= 999
    with pytest.raises(ValueError, match=r"env_args\.sandbox"):
        env_options("math_python", {"sandbox": "docker"})
