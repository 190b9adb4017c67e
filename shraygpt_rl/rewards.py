"""Reward functions: ``reward(prompts, responses, metadata) -> (B,) float tensor``.

A reward function is any callable with that signature. The classes here subclass
``RewardFunction`` so that a YAML config can pick them by class path, for example::

    rewards:
      - class_path: shraygpt_rl.rewards.ArithmeticVerifier
      - class_path: shraygpt_rl.rewards.KeywordReward
        init_args: {weight: 0.1}

``WeightedSum`` combines several, and reports each one's value for logging (``reward/<name>``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from shraygpt_rl.data.tasks import TASKS, arithmetic_reward, arithmetic_target, sorting_reward
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
    """Dispatches on ``metadata["task"]`` to the arithmetic or sorting verifier."""

    requires = ("task",)

    @staticmethod
    def covers(metadata: Metadata) -> bool:
        """Whether every sample comes from a built-in task, so that success can be measured."""
        return all(m.get("task") in TASKS for m in metadata)

    def score(self, prompt, response, metadata):
        task = metadata.get("task")
        if task == "arithmetic":
            return ArithmeticVerifier().score(prompt, response, metadata)
        if task == "sorting":
            return SortingVerifier().score(prompt, response, metadata)
        raise ValueError(f"TaskVerifier needs metadata['task'] to be 'arithmetic' or 'sorting', got {task!r}.")


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
    """The "animal stories" exercise: reward animal words, penalise human words and short or
    repetitive responses, and give a bonus per distinct animal.

    ``score = animal_weight·#animal words + distinct_bonus·#distinct animals − human_penalty·#human
    words − short_penalty·[≤ short_words words] − repetition_penalty·[distinct/total ≤ 0.5]``.
    The defaults reproduce the exercise's checks: "The quick brown fox and a lion met a boy" → 2.6,
    "a cat and dog" → 2.4, "cat dog lion tiger bear fox" twice → 13.9, and a sentence with no
    animal → 0.0.
    """

    def __init__(
        self,
        animal_weight: float = 1.0,
        distinct_bonus: float = 0.4,
        human_penalty: float = 0.2,
        short_words: int = 4,
        short_penalty: float = 0.4,
        repetition_penalty: float = 0.5,
        weight: float = 1.0,
    ):
        super().__init__(weight)
        self.animal_weight, self.distinct_bonus, self.human_penalty = animal_weight, distinct_bonus, human_penalty
        self.short_words, self.short_penalty, self.repetition_penalty = short_words, short_penalty, repetition_penalty

    def score(self, prompt, response, metadata):
        words = re.findall(r"[a-z]+", response.lower())
        animals = [w for w in words if w in ANIMALS]
        score = self.animal_weight * len(animals) + self.distinct_bonus * len(set(animals))
        score -= self.human_penalty * sum(w in HUMANS for w in words)
        if len(words) <= self.short_words:
            score -= self.short_penalty
        if words and len(set(words)) / len(words) <= 0.5:
            score -= self.repetition_penalty
        return round(score, 6)  # no float dust: the exercise's figures compare exactly


class LexicalPreferenceReward(RewardFunction):
    """The HH-RLHF notebook's lexical reward: ``overlap(response, chosen) − overlap(response,
    rejected) − length_coef · |len(response) − len(chosen)| / len(chosen)``.

    ``overlap(a, b)`` is the share of b's distinct words that a contains; lengths are in words.
    It reads ``metadata["chosen_response"]`` and ``metadata["rejected_response"]``.
    """

    requires = ("chosen_response", "rejected_response")

    def __init__(self, length_coef: float = 0.2, weight: float = 1.0):
        super().__init__(weight)
        self.length_coef = length_coef

    @staticmethod
    def _words(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def score(self, prompt, response, metadata):
        words = self._words(response)
        chosen, rejected = self._words(metadata["chosen_response"]), self._words(metadata["rejected_response"])

        def overlap(reference: list[str]) -> float:
            return len(set(words) & set(reference)) / max(len(set(reference)), 1)

        length_penalty = abs(len(words) - len(chosen)) / max(len(chosen), 1)
        return overlap(chosen) - overlap(rejected) - self.length_coef * length_penalty


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
            name = getattr(fn, "name", getattr(fn, "__name__", "reward"))
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
