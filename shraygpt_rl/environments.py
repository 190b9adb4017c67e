"""Environments for multi-turn rollouts: the policy writes, calls a tool, reads its answer, goes on.

An environment is a plain Python class with a ``stop`` string and a ``step`` method. A
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
MAX_DIGITS = 40  # a result longer than this is an error, not a number to print


class ToolError(ValueError):
    """A tool call the tool cannot answer; its message is what the policy reads back."""


def calculate(expression: str) -> int:
    """The value of an integer expression of ``+``, ``-``, ``*`` and parentheses, parsed with
    ``ast`` (never ``eval``): anything else, or a result of more than ``MAX_DIGITS`` digits, raises
    ``ToolError``."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression.strip()!r}") from None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            result = _OPERATORS[type(node.op)](value(node.left), value(node.right))
            if len(str(abs(result))) > MAX_DIGITS:
                raise ToolError("result too large")
            return result
        raise ToolError(f"only integers, +, - and * are allowed, not {ast.unparse(node)!r}")

    return value(tree.body)


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

    A call the calculator cannot evaluate is answered ``<result>error: …</result>`` and counted
    in ``errors``; the policy may try again. A turn that does not end in a call is the answer.
    """

    stop = "</calc>"
    CALL = re.compile(r"<calc>([^<>]*)</calc>\s*$")

    def step(self, prompt: str, text: str, metadata: dict[str, Any]) -> str | None:
        call = self.CALL.search(text)
        if call is None:
            return None
        self.calls += 1
        try:
            return f"<result>{calculate(call.group(1))}</result>"
        except ToolError as error:
            self.errors += 1
            return f"<result>error: {error}</result>"
