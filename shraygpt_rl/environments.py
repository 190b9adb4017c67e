"""Environments for multi-turn rollouts: the policy writes, calls a tool, reads its answer, goes on.

An environment has a ``stop`` string and a ``step`` method (from Python any object with them; from
YAML a subclass of ``Environment``, whose ``calls``/``errors`` counters feed the metrics). A
multi-turn rollout (``turns.py``) stops each row's turn when its text contains ``stop`` (the tool
call is complete) and asks ``step(prompt, text, metadata)`` what comes next: a string, the
observation appended to the row's context (tokenised and fed in; it is not the policy's and is
never trained on), or None when the policy's turn was its answer and the episode is over. At the
policy's EOS it is asked once more and must return None. A YAML config picks one by class path
(``model.environment``), as it picks rewards. A 20-line example, an environment that looks
words up in a dictionary::

    class Dictionary(Environment):
        stop = "</lookup>"

        def __init__(self, words: dict[str, str]):
            super().__init__()
            self.words = words

        def step(self, prompt, text, metadata):
            call = re.search(r"<lookup>(.*?)</lookup>$", text)
            if call is None:  # the policy answered
                return None
            self.calls += 1
            meaning = self.words.get(call.group(1).strip())
            if meaning is None:
                self.errors += 1
                return "<result>unknown word</result>"
            return f"<result>{meaning}</result>"

The reward comes at the end, from the stage's ``rewards`` as for single-turn rollouts (the task's
verifier scoring the final answer).
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 40  # a number longer than this (a constant or any intermediate value) is an error, not a number to print
# The longest expression the calculator reads. Its task needs a dozen characters (123*456), and
# several MAX_DIGITS-digit operands with their operators fit in 200. The bound, checked first, keeps
# every step cheap and shallow whatever the policy samples: ast.parse never sees more than 200
# characters, so its own recursion stays a few hundred C frames deep at most, and deeper parentheses
# than its tokenizer allows (200 levels) are a plain SyntaxError.
MAX_LENGTH = 200
# The deepest operator nesting evaluated (``value`` recurses once per level, far below Python's
# recursion limit). The plain chain 1+1+…+1 of MAX_LENGTH characters nests MAX_LENGTH // 2 deep, so
# every such chain passes; only runs of unary signs (------1) go deeper.
MAX_DEPTH = MAX_LENGTH // 2
# Anything but plain decimal digits, ASCII whitespace, + - * and parentheses: hex/octal/binary
# prefixes, 1_000, 1e3, /, ~, names, NUL, non-ASCII digits (which ``\d`` alone would accept).
_FORBIDDEN = re.compile(r"[^0-9+\-*()\s]", flags=re.ASCII)


class ToolError(ValueError):
    """A tool call the tool cannot answer; its message is what the policy reads back."""


def calculate(expression: str) -> int:
    """The value of an integer expression of ``+``, ``-``, ``*`` and parentheses, parsed with
    ``ast`` (never ``eval``).

    Args:
        expression: The text of the call, at most ``MAX_LENGTH`` characters of decimal digits,
            whitespace, ``+ - *`` and parentheses, nested at most ``MAX_DEPTH`` operators deep.

    Returns:
        Its value, when every number in it (constants and intermediate values) has at most
        ``MAX_DIGITS`` digits.

    Raises:
        ToolError: For anything else, with a short message for the policy to read.
    """
    if len(expression) > MAX_LENGTH:  # first: it bounds the work of everything below
        raise ToolError(f"longer than {MAX_LENGTH} characters")
    forbidden = _FORBIDDEN.search(expression)
    if forbidden is not None:
        raise ToolError(f"{forbidden.group(0)!r} is not allowed: only digits, +, -, * and parentheses")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression.strip()!r}") from None

    def value(node: ast.AST, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ToolError("nested too deeply")
        if isinstance(node, ast.Constant) and type(node.value) is int:
            result = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            result = _UNARY[type(node.op)](value(node.operand, depth + 1))
        elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            result = _OPERATORS[type(node.op)](value(node.left, depth + 1), value(node.right, depth + 1))
        else:
            raise ToolError(f"only integers, +, - and * are allowed, not {ast.unparse(node)!r}")
        # Every value, so a product never grows past 2 * MAX_DIGITS digits before it is refused.
        if len(str(abs(result))) > MAX_DIGITS:
            raise ToolError(f"number too large (more than {MAX_DIGITS} digits)")
        return result

    return value(tree.body, 0)


class Environment:
    """Base class: ``stop`` ends a tool call; ``step`` answers it (see the module docstring).

    Counters for the rollout's metrics: ``calls`` (tool calls answered) and ``errors`` (calls the
    tool could not answer), over the environment's life.
    """

    stop: str = ""

    def __init__(self):
        self.calls = 0
        self.errors = 0

    @property
    def name(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def step(self, prompt: str, text: str, metadata: dict[str, Any]) -> str | None:
        """The observation to append after ``text`` (the row's response so far), or None: done."""
        raise NotImplementedError


class Calculator(Environment):
    """The built-in calculator: ``<calc>123*456</calc>`` is answered ``<result>56088</result>``.

    A call the calculator cannot evaluate, whatever the policy wrote between the tags, is answered
    ``<result>error: …</result>`` and counted in ``errors``; the policy may try again. A turn that
    does not end in a call is the answer.
    """

    stop = "</calc>"
    # The call ending the text: everything from its <calc> on, holding no other tag. Any other
    # character in it (a stray < or >, say) is the calculator's to refuse with an error.
    CALL = re.compile(r"<calc>((?:(?!</?calc>).)*)</calc>\s*$", flags=re.S)

    def step(self, prompt: str, text: str, metadata: dict[str, Any]) -> str | None:
        call = self.CALL.search(text)
        if call is None:
            return None
        self.calls += 1
        try:
            answer = str(calculate(call.group(1)))
        except ToolError as error:
            self.errors += 1
            return f"<result>error: {error}</result>"
        except Exception:  # a bug in calculate costs the policy one error, never the training run
            self.errors += 1
            return "<result>error: cannot evaluate this</result>"
        return f"<result>{answer}</result>"
