"""Built-in verifiable tasks: generated in code, deterministic by seed, no download.

* ``arithmetic``: "What is 12 + 7?"; the answer is ``Answer: 19``.
* ``sorting``: "Sort in ascending order: 5, 3, 9, 1"; the answer is ``Answer: 1, 3, 5, 9``.
* ``multiplication``: "What is 123 * 456?", for a policy with a calculator (``environments``): the
  demonstration calls it, ``<calc>123*456</calc>``, reads ``<result>56088</result>`` and answers
  ``Answer: 56088``. Scored as arithmetic is, against the product.

Each task yields, per split (train, val, test; disjoint problems): SFT demonstrations with a
configurable fraction of deliberately wrong answers, preference pairs (correct against wrong), and
prompts with the verifier's metadata. Rewards follow the course's rule for arithmetic: +1 if right,
−0.2 if wrong, −0.5 if ``Answer:`` is there but unparsable, −1 if there is no ``Answer:``.
"""

from __future__ import annotations

import random
import re
from typing import Literal

import datasets

Split = Literal["train", "val", "test"]
TASKS = ("arithmetic", "sorting", "multiplication")
_INT = re.compile(r"-?\d+")


# --------------------------------------------------------------------------------------------
# Verifiers: pure functions of a response and the task's metadata
# --------------------------------------------------------------------------------------------
def _after_answer(response: str) -> str | None:
    """The text after the first ``Answer:``, or None when there is none."""
    index = response.find("Answer:")
    return None if index < 0 else response[index + len("Answer:") :]


def read_int(digits: str) -> int | None:
    """``int(digits)`` for a run of digits a model wrote, or None past the 4,300 digits Python
    converts (no target is that long: such an answer is a wrong one, not a crash)."""
    try:
        return int(digits)
    except ValueError:
        return None


def arithmetic_reward(response: str, target: int) -> float:
    """The course's rule: +1 right, −0.2 wrong, −0.5 unparsable, −1 without ``Answer:``."""
    after = _after_answer(response)
    if after is None:
        return -1.0
    match = re.match(r"\s*(-?\d+)", after)
    if match is None:
        return -0.5
    return 1.0 if read_int(match.group(1)) == target else -0.2


def arithmetic_target(prompt: str) -> int:
    """The course's target: the sum of the integers in the prompt's last user turn."""
    question = prompt.rsplit("User:", 1)[-1]
    return sum(int(n) for n in _INT.findall(question))


def sorting_reward(response: str, numbers: list[int]) -> float:
    """+1 if the first line after ``Answer:`` lists ``numbers`` sorted, −0.2 if another list,
    −0.5 if it holds no integer, −1 without ``Answer:``."""
    after = _after_answer(response)
    if after is None:
        return -1.0
    answer = [read_int(n) for n in _INT.findall(after.strip().split("\n", 1)[0])]
    if not answer:
        return -0.5
    return 1.0 if answer == sorted(numbers) else -0.2


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------
class VerifiableTask:
    """Problem generation and splits shared by the tasks.

    Args:
        seed: Seeds the problems, their split and the SFT noise.
        num_train: Training problems (fewer if the task has fewer distinct problems).
        num_val: Validation problems.
        num_test: Held-out test problems.

    Prompts are conversations of one user message (the question); the DataModule's chat format
    renders them (the course's by default) and adds its system prompt.
    """

    name = "task"

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 5000,
        num_val: int = 200,
        num_test: int = 200,
    ):
        self.seed = seed
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self._splits: dict[str, list[list[int]]] | None = None

    # Subclasses define these four.
    def sample(self, rng: random.Random) -> list[int]:
        raise NotImplementedError

    def question(self, numbers: list[int]) -> str:
        raise NotImplementedError

    def answer(self, numbers: list[int]) -> str:
        raise NotImplementedError

    def wrong_answer(self, numbers: list[int], rng: random.Random) -> str:
        raise NotImplementedError

    def target(self, numbers: list[int]) -> int | list[int]:
        raise NotImplementedError

    def rejected_answer(self, numbers: list[int], rng: random.Random) -> str:
        """The rejected side of a preference pair; by default the SFT noise's wrong answer."""
        return self.wrong_answer(numbers, rng)

    def problems(self, split: Split) -> list[list[int]]:
        """The split's problems: distinct across splits, the same for the same seed."""
        if self._splits is None:
            rng = random.Random(f"{self.name}-{self.seed}")
            wanted, seen, pool = sum(self.sizes.values()), set(), []
            for _ in range(20 * wanted):  # stops early when the task has few distinct problems
                numbers = self.sample(rng)
                if tuple(numbers) not in seen:
                    seen.add(tuple(numbers))
                    pool.append(numbers)
                    if len(pool) == wanted:
                        break
            test, val = self.sizes["test"], self.sizes["val"]
            if len(pool) <= test + val:
                raise ValueError(
                    f"The {self.name} task has only {len(pool)} distinct problems, too few for {val} validation "
                    f"and {test} test problems; make it harder or ask for fewer."
                )
            self._splits = {"test": pool[:test], "val": pool[test : test + val], "train": pool[test + val :]}
        return self._splits[split]

    def _row(self, numbers: list[int]) -> dict:
        question = self.question(numbers)
        return {
            "prompt": [{"role": "user", "content": question}],
            "task": self.name,
            "question": question,
            "numbers": numbers,
            "target": self.target(numbers),
        }

    def prompts(self, split: Split) -> datasets.Dataset:
        """Prompts for PPO/GRPO with the verifier's metadata: task, question, numbers, target."""
        return datasets.Dataset.from_list([self._row(n) for n in self.problems(split)])

    def sft(self, split: Split, wrong_fraction: float = 0.0, copies: int = 1) -> datasets.Dataset:
        """Demonstrations (``response`` column); a ``wrong_fraction`` of them is deliberately wrong.

        ``copies`` demonstrations per problem, each wrong or not independently, like several
        annotators of uneven care, so that no prompt has only a wrong answer to memorise.
        """
        if not 0.0 <= wrong_fraction <= 1.0:
            raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}.")
        rng = random.Random(f"{self.name}-{self.seed}-sft-{split}")
        rows = []
        for numbers in self.problems(split):
            for _ in range(copies):
                wrong = rng.random() < wrong_fraction
                response = self.wrong_answer(numbers, rng) if wrong else self.answer(numbers)
                rows.append({**self._row(numbers), "response": response, "correct": not wrong})
        return datasets.Dataset.from_list(rows)

    def preferences(self, split: Split) -> datasets.Dataset:
        """Pairs with the correct answer chosen and a wrong one rejected."""
        rng = random.Random(f"{self.name}-{self.seed}-pairs-{split}")
        rows = []
        for numbers in self.problems(split):
            chosen, rejected = self.answer(numbers), self.rejected_answer(numbers, rng)
            rows.append({**self._row(numbers), "chosen_response": chosen, "rejected_response": rejected})
        return datasets.Dataset.from_list(rows)


class ArithmeticTask(VerifiableTask):
    """Sums of ``num_terms`` non-negative integers of up to ``digits`` digits.

    Args:
        num_terms: Numbers to add.
        digits: Largest number of digits per number.
        **kwargs: ``VerifiableTask``'s arguments.
    """

    name = "arithmetic"

    def __init__(self, num_terms: int = 2, digits: int = 2, **kwargs):
        super().__init__(**kwargs)
        if num_terms < 2 or digits < 1:
            raise ValueError(f"arithmetic needs num_terms >= 2 and digits >= 1, got {num_terms} and {digits}.")
        self.num_terms, self.digits = num_terms, digits

    def sample(self, rng):
        return [rng.randrange(10**self.digits) for _ in range(self.num_terms)]

    def question(self, numbers):
        return f"What is {' + '.join(map(str, numbers))}?"

    def target(self, numbers):
        return sum(numbers)

    def answer(self, numbers):
        return f"Answer: {sum(numbers)}"

    def wrong_answer(self, numbers, rng):
        """A dropped or doubled carry: off by ten (by one for one-digit sums).

        Systematic errors like these leave the rule learnable under noise: with slips of 1 to 20
        in 30% of the demonstrations, the tiny model reached 85% greedy success against 93.5%
        with 40% carry slips, and its sampled answers were far more spread out.
        """
        total = sum(numbers)
        step = 10 if total >= 10 else 1
        offset = step if total < step or rng.random() < 0.5 else -step
        return f"Answer: {total + offset}"

    def rejected_answer(self, numbers, rng):
        """Every kind of wrong answer a policy may give, so that a reward model trained on the
        pairs cannot be gamed by the kinds it never saw: a carry slip (70%), a units-digit slip
        (15%), a number far off (10%), or no ``Answer:`` at all (5%). Carry slips are the hard
        kind for a small reward model, so they get most of the pairs.

        With carry slips alone, PPO against the reward model learnt to answer off by one to
        nine: held-out verifier success fell from 0.375 to 0.30 while the reward rose.
        """
        total, draw = sum(numbers), rng.random()
        if draw < 0.7:
            return self.wrong_answer(numbers, rng)
        if draw < 0.85:
            units = total % 10
            return f"Answer: {total - units + rng.choice([d for d in range(10) if d != units])}"
        if draw < 0.95:
            return f"Answer: {rng.choice([n for n in range(total + 60) if abs(n - total) > 10])}"
        return str(total)


class SortingTask(VerifiableTask):
    """Sort ``num_items`` non-negative integers of up to ``digits`` digits in ascending order.

    Args:
        num_items: Length of the list.
        digits: Largest number of digits per number.
        **kwargs: ``VerifiableTask``'s arguments.
    """

    name = "sorting"

    def __init__(self, num_items: int = 4, digits: int = 1, **kwargs):
        super().__init__(**kwargs)
        if num_items < 2 or digits < 1:
            raise ValueError(f"sorting needs num_items >= 2 and digits >= 1, got {num_items} and {digits}.")
        self.num_items, self.digits = num_items, digits

    def sample(self, rng):
        while True:
            numbers = [rng.randrange(10**self.digits) for _ in range(self.num_items)]
            if len(set(numbers)) > 1:  # a constant list has no wrong order
                return numbers

    def question(self, numbers):
        return f"Sort in ascending order: {', '.join(map(str, numbers))}"

    def target(self, numbers):
        return sorted(numbers)

    def answer(self, numbers):
        return "Answer: " + ", ".join(map(str, sorted(numbers)))

    def wrong_answer(self, numbers, rng):
        ordered = sorted(numbers)
        wrong = ordered[:]
        while wrong == ordered:
            rng.shuffle(wrong)
        return "Answer: " + ", ".join(map(str, wrong))


class MultiplicationTask(VerifiableTask):
    """Multiply two ``digits``-digit numbers with a calculator: too hard for a tiny model in its
    head, easy with the tool once it copies the operands right.

    Demonstrations call the tool (``environments.Calculator``'s format) and copy its result; the
    deliberately wrong ones (``wrong_fraction``) call it with one operand's digit changed, and copy
    that (wrong) result, as a careless annotator would.

    Args:
        digits: Digits of each operand (the first one never 0).
        **kwargs: ``VerifiableTask``'s arguments.
    """

    name = "multiplication"

    def __init__(self, digits: int = 3, **kwargs):
        super().__init__(**kwargs)
        if digits < 1:
            raise ValueError(f"multiplication needs digits >= 1, got {digits}.")
        self.digits = digits

    def sample(self, rng):
        low = 10 ** (self.digits - 1)
        return [rng.randrange(low, 10 * low) for _ in range(2)]

    def question(self, numbers):
        return f"What is {numbers[0]} * {numbers[1]}?"

    def target(self, numbers):
        return numbers[0] * numbers[1]

    @staticmethod
    def worked(a: int, b: int) -> str:
        """The demonstration for the call ``a*b``: the call, the tool's answer, the answer."""
        return f"<calc>{a}*{b}</calc><result>{a * b}</result>\nAnswer: {a * b}"

    def answer(self, numbers):
        return self.worked(*numbers)

    def wrong_answer(self, numbers, rng):
        """One digit of one operand changed (never to a leading 0) before the call."""
        operands = [str(n) for n in numbers]
        i, j = rng.randrange(2), rng.randrange(self.digits)
        digits = [d for d in "0123456789" if d != operands[i][j] and not (j == 0 and d == "0" and self.digits > 1)]
        operands[i] = operands[i][:j] + rng.choice(digits) + operands[i][j + 1 :]
        return self.worked(int(operands[0]), int(operands[1]))


def make_task(name: str, **kwargs) -> VerifiableTask:
    """``arithmetic``, ``sorting`` or ``multiplication`` with the given options (options of the
    other tasks are ignored)."""
    if name == "arithmetic":
        kwargs.pop("num_items", None)
        return ArithmeticTask(**kwargs)
    if name == "sorting":
        kwargs.pop("num_terms", None)
        return SortingTask(**kwargs)
    if name == "multiplication":
        kwargs.pop("num_items", None), kwargs.pop("num_terms", None)
        return MultiplicationTask(**kwargs)
    raise ValueError(f"Unknown task '{name}'; choose one of {', '.join(TASKS)}.")
