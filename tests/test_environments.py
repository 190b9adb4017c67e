"""The environment interface and the built-in calculator (issue 26's groundwork)."""

from __future__ import annotations

import random
import re

import pytest

from shraygpt_rl.environments import Calculator, Environment, ToolError, calculate


@pytest.mark.parametrize(
    ("expression", "value"),
    [("123*456", 56088), ("2+3*4", 14), ("(2+3)*4", 20), ("-5+2", -3), (" 7 ", 7), ("10-2-3", 5), ("999*999", 998001)],
)
def test_calculate_by_hand(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression", ["2/3", "2**8", "abc", "1e3", "", "1.5*2", "__import__('os')", "[1]", "2+", "9" * 30 + "*" + "9" * 30]
)
def test_calculate_refuses_what_it_is_not(expression):
    with pytest.raises(ToolError):
        calculate(expression)


def test_calculate_agrees_with_python_on_random_expressions():
    rng = random.Random(0)
    for _ in range(500):
        terms = [str(rng.randrange(1000)) for _ in range(rng.randint(1, 5))]
        expression = terms[0]
        for term in terms[1:]:
            expression += rng.choice("+-*") + term
        if rng.random() < 0.3:
            expression = f"({expression})*{rng.randrange(100)}"
        assert calculate(expression) == eval(expression), expression  # our own integer strings only


def test_calculator_answers_a_call_at_the_end_of_the_text_only():
    env = Calculator()
    assert env.step("p", "Let me compute. <calc>123*456</calc>", {}) == "<result>56088</result>"
    assert env.step("p", "<calc>123*456</calc><result>56088</result> Answer: 56088", {}) is None  # answered
    assert env.step("p", "Answer: 12", {}) is None
    assert (env.calls, env.errors) == (1, 0)
    observation = env.step("p", "<calc>123/456</calc>", {})
    assert observation.startswith("<result>error: ") and observation.endswith("</result>")
    assert (env.calls, env.errors) == (2, 1)
    assert env.stop == "</calc>" and env.name == "calculator"


def test_the_documented_example_is_an_environment():
    """The module docstring's dictionary lookup, as written there, works as described."""
    import shraygpt_rl.environments as environments

    example = re.search(r"    class Dictionary.*?(?=\n\n[A-Z])", environments.__doc__, flags=re.S).group(0)
    namespace = {"Environment": Environment, "re": re}
    exec(compile("\n".join(line[4:] for line in example.splitlines()), "docstring", "exec"), namespace)
    env = namespace["Dictionary"]({"cat": "a small feline"})
    assert env.step("p", "What is it? <lookup>cat</lookup>", {}) == "<result>a small feline</result>"
    assert env.step("p", "<lookup>dog</lookup>", {}) == "<result>unknown word</result>"
    assert env.step("p", "It is a cat.", {}) is None
    assert (env.calls, env.errors) == (2, 1)
