"""Reward functions: ``reward(prompts, responses, metadata) -> (B,) float tensor``.

From Python, a reward function is any callable with that signature (named by its ``name``, else
``__name__``: ``reward_name``). From YAML it must subclass ``RewardFunction``, which is how a
config picks one by class path (jsonargparse refuses other classes), for example::

    rewards:
      - class_path: shraygpt_rl.rewards.ArithmeticVerifier
      - class_path: shraygpt_rl.rewards.KeywordReward
        init_args: {weight: 0.1}

``WeightedSum`` combines several, and reports each one's value for logging (``reward/<name>``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol

import torch
from torch import Tensor

from shraygpt_rl.data.tasks import TASKS, arithmetic_reward, arithmetic_target, read_int, sorting_reward
from shraygpt_rl.reward_model import RewardModel

Metadata = Sequence[dict[str, Any]]


class RewardFunction:
    """Base class: subclasses implement ``score`` for one response; ``__call__`` scores a batch.

    Args:
        weight: Multiplies this function's reward when several are combined.
    """

    requires: tuple[str, ...] = ()  # metadata keys ``score`` reads: checked against the data at startup

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    @property
    def name(self) -> str:
        """Snake-case class name, used as the ``reward/<name>`` metric."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def score(self, prompt: str, response: str, metadata: dict[str, Any]) -> float:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], metadata: Metadata) -> Tensor:
        _check_lengths(prompts, responses, metadata)
        return torch.tensor([self.score(p, r, m) for p, r, m in zip(prompts, responses, metadata)], dtype=torch.float32)


def _check_lengths(prompts, responses, metadata) -> None:
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(
            f"a reward needs one prompt, response and metadata dict per sample, got {len(prompts)}, "
            f"{len(responses)} and {len(metadata)}."
        )


# --------------------------------------------------------------------------------------------
# Verifiers for the built-in tasks
# --------------------------------------------------------------------------------------------
class Verifier(RewardFunction):
    """A reward function that checks an answer: a response succeeds when it earns ``SUCCESS``."""

    SUCCESS = 1.0

    def success(self, prompts: Sequence[str], responses: Sequence[str], metadata: Metadata) -> Tensor:
        """(B,) bool: which responses are right. The one definition of "success" that training,
        evaluation and the benchmarks report."""
        return self(prompts, responses, metadata) == self.SUCCESS


class ArithmeticVerifier(Verifier):
    """The course's arithmetic rule (+1 / −0.2 / −0.5 / −1); the target is ``metadata["target"]``,
    else the sum of the integers in the prompt's last user turn."""

    def score(self, prompt, response, metadata):
        target = metadata.get("target")
        return arithmetic_reward(response, int(target) if target is not None else arithmetic_target(prompt))


class SortingVerifier(Verifier):
    """+1 if ``Answer:`` lists ``metadata["numbers"]`` sorted (same scale as arithmetic)."""

    requires = ("numbers",)

    def score(self, prompt, response, metadata):
        return sorting_reward(response, list(metadata["numbers"]))


class TaskVerifier(Verifier):
    """Dispatches on ``metadata["task"]`` to the arithmetic verifier (``arithmetic`` and
    ``multiplication``, whose ``target`` is the product) or the sorting one."""

    requires = ("task",)

    @staticmethod
    def covers(metadata: Metadata) -> bool:
        """Whether every sample comes from a built-in task, so that success can be measured."""
        return all(m.get("task") in TASKS for m in metadata)

    def score(self, prompt, response, metadata):
        task = metadata.get("task")
        if task in ("arithmetic", "multiplication"):  # multiplication's target is the product
            return ArithmeticVerifier().score(prompt, response, metadata)
        if task == "sorting":
            return SortingVerifier().score(prompt, response, metadata)
        raise ValueError(f"TaskVerifier needs metadata['task'] to be one of {', '.join(TASKS)}, got {task!r}.")


_FIRST_INT = re.compile(r"\s*(-?\d+)")
_INTS = re.compile(r"-?\d+")


def _canonical(digits: str) -> str:
    """An integer's canonical text (``"019"`` is ``"19"``); a run too long to read stays as written."""
    value = read_int(digits)
    return digits if value is None else str(value)


def task_answer(prompt: str, response: str, metadata: dict[str, Any]) -> tuple[str | None, str]:
    """The answer a response to a built-in task prompt gives, and the correct one, both canonical.

    The answer is read as ``TaskVerifier`` reads it, so ``answer == correct`` exactly when the
    verifier counts a success: arithmetic's first integer after ``Answer:`` (``"019"`` is
    ``"19"``); sorting's integers on the first line after it, joined by ``", "``. None when there
    is no ``Answer:`` or nothing it could parse. Majority voting (maj@k) compares these strings.

    Args:
        prompt: The prompt, for arithmetic without ``metadata["target"]`` (its integers' sum).
        response: The sampled response.
        metadata: The prompt's metadata: ``task``, and ``target`` or ``numbers``.

    Returns:
        ``(answer, correct)``.
    """
    task, index = metadata.get("task"), response.find("Answer:")
    after = None if index < 0 else response[index + len("Answer:") :]
    if task in ("arithmetic", "multiplication"):
        target = metadata.get("target")
        match = _FIRST_INT.match(after) if after is not None else None
        answer = _canonical(match.group(1)) if match else None
        return answer, str(int(target) if target is not None else arithmetic_target(prompt))
    if task == "sorting":
        found = _INTS.findall(after.strip().split("\n", 1)[0]) if after is not None else []
        answer = ", ".join(map(_canonical, found)) if found else None
        return answer, ", ".join(map(str, sorted(metadata["numbers"])))
    raise ValueError(f"task_answer needs metadata['task'] to be one of {', '.join(TASKS)}, got {task!r}.")


# --------------------------------------------------------------------------------------------
# Verifier for math datasets: the completion's final answer against a reference column
# --------------------------------------------------------------------------------------------
# ``\boxed{`` (``\boxed {`` too): the brace it opens is matched by counting braces, see ``_boxed``.
_BOXED = re.compile(r"\\boxed\s*\{")
# A number in running text: a sign only where it cannot be a hyphen or minus between two terms
# ("pages 3-4" ends with 4, not -4); thousands groups only of exactly three digits ("1,23" is 1 and
# 23); ASCII digits only, as Python's ``\d`` also takes other scripts' digits, which ``int`` reads.
_NUMBER_IN_TEXT = re.compile(r"(?:(?<![0-9A-Za-z_.])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?")
# A whole (normalised) answer that is a number: the same grammar, with "+" and ".5" besides.
_NUM = r"[-+]?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)"
_NUMBER = re.compile(_NUM)
_FRACTION = re.compile(rf"(?P<sign>-?)\\frac\{{(?P<a>{_NUM})\}}\{{(?P<b>{_NUM})\}}|(?P<p>{_NUM})/(?P<q>{_NUM})")
# What does not change an answer: spacing (LaTeX's thin spaces ``\,`` ``\!`` ``\;`` ``\:`` too, as in
# MATH's ``10,\!000``), ``\left``/``\right`` (but not ``\leftarrow``), currency and percent signs.
_NOISE = re.compile(r"\s+|\\[,!;:]|\\(?:left|right)(?![A-Za-z])|\\?\$|\\?%")


def _boxed(text: str) -> str | None:
    """The stripped content of the last ``\\boxed{…}`` whose braces balance and which is not blank.

    One pass pairs every ``{`` with its ``}`` (a stack), so that a completion full of unclosed
    braces costs linear time, not quadratic.
    """
    closing: dict[int, int] = {}
    stack: list[int] = []
    for i, char in enumerate(text):
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            closing[stack.pop()] = i
    for match in reversed(list(_BOXED.finditer(text))):
        start = match.end() - 1  # the "{"
        if start in closing:
            content = text[start + 1 : closing[start]].strip()
            if content:
                return content
    return None


def extract_answer(completion: str) -> str | None:
    """A completion's final answer, as written: the last ``\\boxed{…}``, else the last number.

    The boxed answer is the content of the last ``\\boxed{…}`` whose braces balance (nested braces
    count: ``\\boxed{\\frac{1}{2}}`` is ``\\frac{1}{2}``); an unclosed or blank box is ignored, as
    if absent. Without one, the last number: digits with an optional ``-``, thousands separators
    (``1,234``) and decimal part, so that ``"$1,234.50"`` gives ``"1,234.50"`` and ``"I think 3, no 4"``
    gives ``"4"``. Fractions written ``a/b`` are not numbers here (their last number is ``b``): a
    model should box them.

    Args:
        completion: The sampled response.

    Returns:
        The answer's text, stripped; None when there is neither a box nor a number.
    """
    boxed = _boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER_IN_TEXT.findall(completion)
    return numbers[-1] if numbers else None


def reference_answer(value: Any) -> str | None:
    """The reference answer in a dataset's answer column, as text.

    A string is a GSM8K solution when it contains ``####`` (Cobbe et al., 2021, "Training Verifiers
    to Solve Math Word Problems": the worked solution ends with ``#### <answer>``), and the answer
    is what follows the last ``####``; else a MATH-style solution when it has a ``\\boxed{…}``, and
    the answer is the box's content; else the answer is the whole string. A number is written out
    in full (a float without exponent: ``1e-05`` is ``"0.00001"``).

    Args:
        value: The metadata column's value: a string, an int or a float.

    Returns:
        The answer, stripped; None for None, a blank answer, or a float that is not finite.
    """
    if value is None:
        return None
    if isinstance(value, float):
        # ``repr`` is the shortest string that reads back as the same float; ``f`` drops its exponent.
        return format(Decimal(repr(value)), "f") if math.isfinite(value) else None
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    elif (boxed := _boxed(text)) is not None:
        text = boxed
    return text.strip() or None


def _normalise(answer: str) -> str:
    """An answer without what does not change it (``_NOISE``), with ``\\dfrac`` and ``\\tfrac`` as
    ``\\frac``, the Unicode minus as ``-``, and without a trailing period (the end of a sentence)."""
    answer = _NOISE.sub("", answer.replace("\u2212", "-"))
    return re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", answer).rstrip(".")


def _number(text: str) -> Fraction | None:
    """A plain number's exact value, None when ``text`` is not one (or has over 4,300 digits, past
    which Python refuses to read an int)."""
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except ValueError:  # too many digits
        return None


def _value(answer: str) -> Fraction | None:
    """A normalised answer's exact value: a number, ``a/b`` or ``\\frac{a}{b}``; None otherwise."""
    if (number := _number(answer)) is not None:
        return number
    match = _FRACTION.fullmatch(answer)
    if match is None:
        return None
    a, b = (_number(match["a"]), _number(match["b"])) if match["a"] else (_number(match["p"]), _number(match["q"]))
    if a is None or b is None or b == 0:
        return None
    return -a / b if match["sign"] else a / b


def same_answer(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same: as numbers when both are numbers, else as strings.

    Both are first normalised: spaces, LaTeX's thin spaces, ``\\left``/``\\right``, ``$`` and ``%``
    (escaped or not) are dropped, ``\\dfrac``/``\\tfrac`` read as ``\\frac``, and a trailing period
    is dropped. When both then read as numbers (an optional sign, digits with optional thousands
    separators and decimal part, or ``a/b`` or ``\\frac{a}{b}`` of two such), they are compared
    exactly as fractions, not with a float tolerance: ``"42" == "42.00" == "$42"``, ``"1,234" ==
    "1234"``, ``"\\frac{1}{2}" == "0.5"``, but ``"0.1" != "0.10000001"``. Otherwise the normalised
    strings must be equal.

    Args:
        a: One answer (``extract_answer``'s or ``reference_answer``'s); None is no answer.
        b: The other.

    Returns:
        False when either is None.
    """
    if a is None or b is None:
        return False
    a, b = _normalise(a), _normalise(b)
    x, y = _value(a), _value(b)
    if x is not None and y is not None:
        return x == y
    return a == b


class AnswerVerifier(Verifier):
    """Scores a completion's final answer against the reference in a metadata column.

    The flagship use: GRPO of an instruct model on a math dataset, such as GSM8K, whose prompts
    carry the dataset's ``answer`` column. The completion's answer is ``extract_answer``'s (the
    last ``\\boxed{…}``, else the last number); the reference is ``reference_answer``'s (after the
    last ``####`` of a GSM8K solution, Cobbe et al. 2021; else a ``\\boxed{…}``; else the whole
    value); they are compared by ``same_answer`` (exactly as numbers when both are, else as
    normalised strings). The reward is ``correct`` when they match, ``wrong`` when they do not,
    and ``no_answer`` when the completion has no answer or the reference cannot be read (None,
    blank): a bad row of data gives no signal rather than stopping training.

    Args:
        column: The metadata column holding the reference answer; a data set without it is refused
            at startup (``requires``).
        correct: The reward for the right answer.
        wrong: The reward for a wrong one.
        no_answer: The reward when there is no answer to compare.
        weight: As for every reward function.
    """

    requires = ("answer",)

    def __init__(
        self,
        column: str = "answer",
        correct: float = 1.0,
        wrong: float = 0.0,
        no_answer: float = 0.0,
        weight: float = 1.0,
    ):
        super().__init__(weight)
        self.column, self.correct, self.wrong, self.no_answer = column, correct, wrong, no_answer
        self.requires = (column,)  # per instance: the column is an argument

    def is_correct(self, response: str, metadata: dict[str, Any]) -> bool:
        """Whether the response's answer is the reference's."""
        return same_answer(extract_answer(response), reference_answer(metadata.get(self.column)))

    def score(self, prompt, response, metadata):
        answer, reference = extract_answer(response), reference_answer(metadata.get(self.column))
        if answer is None or reference is None:
            return self.no_answer
        return self.correct if same_answer(answer, reference) else self.wrong

    def success(self, prompts, responses, metadata):
        # From the answers, not the reward: ``correct`` is an argument, and may equal another value.
        _check_lengths(prompts, responses, metadata)
        return torch.tensor([self.is_correct(r, m) for r, m in zip(responses, metadata)], dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Rule-based rewards
# --------------------------------------------------------------------------------------------
ANIMALS = frozenset(
    "ant bear bee bird cat cow deer dog dolphin duck eagle elephant fish fox frog giraffe goat horse kangaroo "
    "lion monkey mouse owl panda pig rabbit sheep snake squirrel tiger turtle whale wolf zebra".split()
)
HUMANS = frozenset(
    "boy girl man woman men women person people human humans child children kid kids baby adult "
    "mother father king queen farmer teacher".split()
)


class KeywordReward(RewardFunction):
    """Seed 001's "animal stories" reward, exactly as the notebook computes it.

    With ``words = response.lower().split()`` (whitespace split: punctuation stays attached, as
    in the seed), ``n = len(words)``, ``a`` the number of words in ``ANIMALS`` and ``h`` the
    number in ``HUMANS``::

        length_penalty = 0 if n > 4 else -1.0
        threshold      = max(5, int(0.15 * n))
        excess         = -0.5 * (a - threshold) if a > threshold else 0
        unique         = 0.5 * len(set(mentions)) if a > 0 else 0
        reward         = 1.2 * a - 0.8 * h + length_penalty + excess + unique

    The seed's word lists are not in the seed; ``ANIMALS`` and ``HUMANS`` are the project's, and
    give its checks: "The quick brown fox and a lion met a boy" → 2.6, "a cat and dog" → 2.4,
    "cat dog lion tiger bear fox" twice → 13.9, a sentence of five words or more with neither
    kind of word → 0.0. Every coefficient is an argument; the defaults are the seed's.
    """

    def __init__(
        self,
        animal_weight: float = 1.2,
        human_penalty: float = 0.8,
        min_words: int = 4,
        short_penalty: float = 1.0,
        repeat_fraction: float = 0.15,
        min_repeats: int = 5,
        excess_penalty: float = 0.5,
        distinct_bonus: float = 0.5,
        weight: float = 1.0,
    ):
        super().__init__(weight)
        self.animal_weight, self.human_penalty = animal_weight, human_penalty
        self.min_words, self.short_penalty = min_words, short_penalty
        self.repeat_fraction, self.min_repeats, self.excess_penalty = repeat_fraction, min_repeats, excess_penalty
        self.distinct_bonus = distinct_bonus

    def score(self, prompt, response, metadata):
        words = response.lower().split()
        n = len(words)
        mentions = [w for w in words if w in ANIMALS]
        a, h = len(mentions), sum(w in HUMANS for w in words)
        length_penalty = 0.0 if n > self.min_words else -self.short_penalty
        threshold = max(self.min_repeats, int(self.repeat_fraction * n))
        excess = -self.excess_penalty * (a - threshold) if a > threshold else 0.0
        unique = self.distinct_bonus * len(set(mentions)) if a > 0 else 0.0
        return self.animal_weight * a - self.human_penalty * h + length_penalty + excess + unique

    def report(self, responses: Sequence[str]) -> dict[str, float]:
        """What held-out evaluation logs besides the reward (``reward/animal_frequency``)."""
        return {"animal_frequency": animal_frequency(responses)}


def animal_frequency(texts: Sequence[str]) -> float:
    """Animal words per word over ``texts`` (seed 001's "animal-word frequency"), 0 for no words."""
    words = [w for text in texts for w in text.lower().split()]
    return sum(w in ANIMALS for w in words) / len(words) if words else 0.0


class LexicalPreferenceReward(RewardFunction):
    """Seed 003's lexical reward for HH-RLHF prompts, exactly as the notebook computes it.

    With ``r = response.strip()`` and ``overlap(a, b) = |words(a) ∩ words(b)| / |words(a)|`` over
    the distinct lower-cased whitespace-split words (0 when ``a`` has none)::

        length_penalty = min(|len(r) - len(chosen)| / max(len(chosen), 1), 1.0)   # characters
        reward         = overlap(r, chosen) - overlap(r, rejected) - 0.2 * length_penalty

    It reads ``metadata["chosen_response"]`` and ``metadata["rejected_response"]``.

    Args:
        length_coef: Weight of the length penalty (the seed's 0.2).
    """

    requires = ("chosen_response", "rejected_response")

    def __init__(self, length_coef: float = 0.2, weight: float = 1.0):
        super().__init__(weight)
        self.length_coef = length_coef

    @staticmethod
    def overlap(a: str, b: str) -> float:
        """The share of ``a``'s distinct words that ``b`` also contains."""
        words_a, words_b = set(a.lower().split()), set(b.lower().split())
        return len(words_a & words_b) / len(words_a) if words_a else 0.0

    def score(self, prompt, response, metadata):
        r, chosen, rejected = response.strip(), metadata["chosen_response"], metadata["rejected_response"]
        length_penalty = min(abs(len(r) - len(chosen)) / max(len(chosen), 1), 1.0)
        return self.overlap(r, chosen) - self.overlap(r, rejected) - self.length_coef * length_penalty


# --------------------------------------------------------------------------------------------
# Learned reward model, and combinations
# --------------------------------------------------------------------------------------------
class Scorer(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor: ...


class LearnedReward(RewardFunction):
    """A learned reward model as a reward function: the slot the reward-model stage fills.

    Args:
        checkpoint: A reward-model checkpoint (``python train.py --stage reward`` writes one);
            in YAML: ``{class_path: shraygpt_rl.rewards.LearnedReward, init_args: {checkpoint: …}}``.
        scorer: Instead of a checkpoint, any object with ``score(prompts, responses) -> (B,)``.
        weight: As for every reward function.
    """

    def __init__(self, checkpoint: str | None = None, scorer: Any = None, weight: float = 1.0):
        super().__init__(weight)
        if (checkpoint is None) == (scorer is None):
            raise ValueError("LearnedReward needs either a reward-model checkpoint or a scorer, not both.")
        if checkpoint is not None:
            scorer = RewardModel.load_from_checkpoint(checkpoint).eval()
        self.scorer: Scorer = scorer

    def __call__(self, prompts, responses, metadata):
        _check_lengths(prompts, responses, metadata)
        return self.scorer.score(list(prompts), list(responses)).detach().float().cpu()


def reward_name(fn: Callable) -> str:
    """A reward function's name in metrics (``reward/<name>``): its ``name``, else ``__name__``."""
    return getattr(fn, "name", getattr(fn, "__name__", "reward"))


class WeightedSum:
    """``sum_i weight_i · reward_i``; ``components`` also returns each unweighted reward by name."""

    def __init__(self, functions: Sequence[Callable]):
        if not functions:
            raise ValueError("WeightedSum needs at least one reward function.")
        self.functions = list(functions)

    def components(self, prompts, responses, metadata) -> dict[str, Tensor]:
        names = Counter()
        out = {}
        for fn in self.functions:
            name = reward_name(fn)
            names[name] += 1
            out[name if names[name] == 1 else f"{name}_{names[name]}"] = fn(prompts, responses, metadata)
        return out

    def score(self, prompts, responses, metadata) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total (B,) and each function's unweighted reward by name."""
        parts = self.components(prompts, responses, metadata)
        weights = [getattr(fn, "weight", 1.0) for fn in self.functions]
        return sum(w * r for w, r in zip(weights, parts.values())), parts

    def __call__(self, prompts, responses, metadata) -> Tensor:
        return self.score(prompts, responses, metadata)[0]
