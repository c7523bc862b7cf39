"""The arithmetic env: grading, the seeded data stream and the held-out test set."""

import pytest

from mathrl.envs.arithmetic import ArithmeticConfig, ArithmeticDataset
from mathrl.envs.base import SingleTurnEnv
from mathrl.envs.registry import env_options
from mathrl.types import Action, Message


def reply(text: str) -> Action:
    return Action(text, Message("assistant", text))


@pytest.mark.parametrize(
    ("text", "correct", "formatted"),
    [
        ("30 + 12 = 42", True, True),
        ("42 is wrong, it is 41", False, True),
        ("forty-two", False, False),
        ("1,042", False, True),
        ("42.5", False, True),
        ("The answer is -7.", False, True),
    ],
)
def test_env_grades_the_last_number_through_mathrl_grading(text, correct, formatted):
    env = SingleTurnEnv((), "42", style="last_number", format_coef=0.1)
    result = env.step(reply(text))
    assert result.metrics["correct"] == float(correct)
    assert result.metrics["format"] == float(formatted)
    assert result.reward == pytest.approx(float(correct) - (0.0 if formatted else 0.1))


def _problem(builder):
    return builder.messages[-1].content, builder.reference


def test_batches_are_a_pure_function_of_the_step():
    cfg = ArithmeticConfig(max_operand=50, test_size=50)
    a, b = ArithmeticDataset(cfg, 8, seed=1), ArithmeticDataset(cfg, 8, seed=1)
    assert [_problem(x) for x in a.get_batch(3)] == [_problem(x) for x in b.get_batch(3)]
    assert [_problem(x) for x in a.get_batch(3)] != [_problem(x) for x in a.get_batch(4)]
    assert [_problem(x) for x in a.get_batch(3)] != [_problem(x) for x in ArithmeticDataset(cfg, 8, 2).get_batch(3)]


def test_training_never_draws_a_test_problem():
    cfg = ArithmeticConfig(min_operand=0, max_operand=20, test_size=200)
    data = ArithmeticDataset(cfg, 16, seed=0)
    test = {_problem(b) for b in data.test_builders()}
    assert len(test) == 200
    seen = {_problem(b) for step in range(100) for b in data.get_batch(step)}
    assert not seen & test
    for question, answer in seen:
        x, y = question.removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(x) + int(y) == int(answer)


def test_env_prompt_has_one_shot_example_and_rewards_exact_answer():
    data = ArithmeticDataset(ArithmeticConfig(max_operand=50, test_size=10), 1, seed=0)
    builder = data.get_batch(0)[0]
    envs = builder.make_envs(4)
    assert len(envs) == 4
    msgs = envs[0].initial_messages()
    assert [m.role for m in msgs] == ["user", "assistant", "user"]
    assert envs[0].step(reply(builder.reference)).reward == 1.0
    assert envs[0].step(reply(str(int(builder.reference) + 1))).reward == 0.0


def test_operators_option():
    data = ArithmeticDataset(ArithmeticConfig(max_operand=9, operators="*", test_size=10), 4, seed=0)
    for b in data.get_batch(0):
        x, y = b.messages[-1].content.removeprefix("What is ").removesuffix("?").split(" * ")
        assert int(x) * int(y) == int(b.reference)


def test_env_option_errors_name_the_key():
    with pytest.raises(ValueError, match=r"env_args\.max_operandd.*Did you mean 'env_args.max_operand'"):
        env_options("arithmetic", {"max_operandd": 5})
    with pytest.raises(ValueError, match=r"env_args\.max_operand: expected int"):
        env_options("arithmetic", {"max_operand": "ten"})
    with pytest.raises(ValueError, match="operators"):
        env_options("arithmetic", {"operators": "/"})
    with pytest.raises(ValueError, match="Did you mean 'arithmetic'"):
        env_options("arithmetc", {})
    with pytest.raises(ValueError, match="test_size"):
        ArithmeticDataset(ArithmeticConfig(max_operand=5, test_size=30), 4, 0)
