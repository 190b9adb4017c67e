"""The environment interface and the built-in calculator (issue 26's groundwork)."""

from __future__ import annotations

import random
import re
import warnings

import pytest

import shraygpt_rl.environments as environments
from shraygpt_rl.environments import MAX_DEPTH, MAX_DIGITS, MAX_LENGTH, Calculator, Environment, ToolError, calculate


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


# What a policy can sample inside <calc>…</calc> that once ended a training run (issue 33): each
# raised RecursionError, ValueError or printed an int that is not a decimal calculator's.
HOSTILE = {
    "unary minus chain": "-" * 1000 + "1",  # 26 r50k tokens; RecursionError
    "unary minus chain within the length": "-" * (MAX_LENGTH - 1) + "1",
    "bitwise not chain": "~" * 600 + "1",
    "deep parentheses": "(" * 300 + "1" + ")" * 300,
    "long hex literal": "0x" + "f" * 3600,  # over 4,300 decimal digits: printing it raises ValueError
    "NUL byte": "1\x00+2",  # ast.parse raises ValueError on Python 3.10
    "underscore": "1_000",
    "hex": "0x10",
    "octal": "0o17",
    "binary": "0b101",
    "long constant": "9" * (MAX_DIGITS + 1),
    "long negative constant": "-" + "9" * (MAX_DIGITS + 1),
}


@pytest.mark.parametrize("expression", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_calls_are_answered_with_a_short_error(expression):
    with pytest.raises(ToolError):
        calculate(expression)
    env = Calculator()
    observation = env.step("p", f"Let me see. <calc>{expression}</calc>", {})
    assert observation.startswith("<result>error: ") and observation.endswith("</result>")
    assert len(observation) < 100 and observation.isprintable(), observation  # the policy reads it back
    assert (env.calls, env.errors) == (1, 1)


def test_calculator_answers_whatever_calculate_raises(monkeypatch):
    """Belt and braces: a bug in ``calculate`` costs the policy one error observation, not the run."""

    def broken(expression):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(environments, "calculate", broken)
    env = Calculator()
    assert env.step("p", "<calc>1+1</calc>", {}).startswith("<result>error: ")
    assert (env.calls, env.errors) == (1, 1)
    with pytest.raises(TypeError):  # misuse outside the expression's evaluation is not hidden
        env.step("p", None, {})


def test_the_bounds_are_exact():
    longest = "+".join(["1"] * (MAX_LENGTH // 2))  # 1+1+…+1: the deepest plain chain that fits
    longest += "0" * (MAX_LENGTH - len(longest))  # the last term becomes 10 (or 100)
    assert len(longest) == MAX_LENGTH
    assert calculate(longest) == eval(longest)  # our own string
    assert Calculator().step("p", f"<calc>{longest}</calc>", {}) == f"<result>{eval(longest)}</result>"
    for too_long in (longest + "0", " " + longest):
        with pytest.raises(ToolError, match="characters"):
            calculate(too_long)
    assert calculate("9" * MAX_DIGITS) == int("9" * MAX_DIGITS)
    assert calculate("-" + "9" * MAX_DIGITS) == -int("9" * MAX_DIGITS)
    assert calculate("1" + "0" * (MAX_DIGITS - 1) + "*9") == 9 * 10 ** (MAX_DIGITS - 1)
    assert calculate("-" * MAX_DEPTH + "7") == (-7 if MAX_DEPTH % 2 else 7)
    too_large = [
        "9" * (MAX_DIGITS + 1),
        "-" + "9" * (MAX_DIGITS + 1),
        "9" * MAX_DIGITS + "+1",
        "9" * MAX_DIGITS + "+1-1",
    ]
    for expression in too_large:  # the last one's result fits, its intermediate value does not
        with pytest.raises(ToolError, match="digits"):
            calculate(expression)
    with pytest.raises(ToolError, match="nested"):
        calculate("-" * (MAX_DEPTH + 1) + "7")


# The policy's alphabet for the fuzz test: arithmetic, what Python would also read (x, _, ~, /, e),
# the tags' brackets, a NUL, non-ASCII look-alikes (an Arabic-Indic digit, a no-break space).
ALPHABET = list("0123456789+-*/~() x_aeE<>\n\t.,") + ["\x00", "\u0663", "\u00a0", "\u00e9", "\u2212"]
PLAIN = re.compile(r"[0-9+\-*() \t\n]*")  # what Python evaluates below: no names, nothing to run


def _fuzz_expression(rng: random.Random) -> str:
    """A random call body: noise, near-arithmetic, a long run of one character, or a valid expression
    with perhaps one character changed."""
    kind = rng.random()
    if kind < 0.25:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(40)))
    if kind < 0.5:
        return "".join(rng.choice("0123456789+-*() ") for _ in range(rng.randrange(40)))
    if kind < 0.6:
        run = rng.choice(ALPHABET) * rng.choice([10, MAX_LENGTH - 1, MAX_LENGTH, 600, 1000, 5000])
        return rng.choice([run, run + "1", "1" + run, f"{run}1{run}"])
    terms = []
    for _ in range(rng.randint(1, 6)):
        term = str(rng.randrange(10 ** rng.randint(1, MAX_DIGITS // 2 + 3)))
        term = "-" * rng.choice([0, 0, 0, 1, 2]) + term
        terms.append(f"({term})" if rng.random() < 0.2 else term)
    expression = "".join(term + rng.choice(["+", "-", "*", " * ", " - "]) for term in terms)[:-1].rstrip(" *-")
    if rng.random() < 0.3:
        expression = f"({expression}) * {rng.randrange(100)}"
    if rng.random() < 0.3:
        at = rng.randrange(len(expression) + 1)
        expression = expression[:at] + rng.choice(ALPHABET) + expression[at + rng.randint(0, 1) :]
    return expression


def test_calculator_survives_fuzzing_and_agrees_with_python():
    rng = random.Random(0)
    env = Calculator()
    agreed = 0
    for i in range(5000):
        expression = _fuzz_expression(rng)
        observation = env.step("p", f"Turn {i}. <calc>{expression}</calc>", {})
        assert isinstance(observation, str) and observation.startswith("<result>"), (expression, observation)
        assert observation.endswith("</result>") and len(observation) < 2 * MAX_LENGTH, (expression, observation)
        if len(expression) > MAX_LENGTH or not PLAIN.fullmatch(expression):
            assert observation.startswith("<result>error: "), (expression, observation)
            continue
        expected = None
        if "**" not in expression:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "(1)(2)" warns that an int is not callable
                try:
                    expected = eval(expression.strip())  # digits, whitespace, + - * and parentheses only, no **
                except (SyntaxError, TypeError):
                    pass
        if type(expected) is not int:  # not Python's integer arithmetic either: "1 2", "(1)(2)", "()"
            assert observation.startswith("<result>error: "), (expression, observation)
        elif observation != f"<result>{expected}</result>":  # only the bounds may refuse it
            assert re.fullmatch(r"<result>error: (.*digits.*|.*nested.*)</result>", observation), (
                expression,
                observation,
            )
        else:
            agreed += 1
    assert agreed > 1000  # the comparison is not vacuous
    assert env.calls == 5000 and 0 < env.errors < 5000
