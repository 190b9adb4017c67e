"""Reward functions: the exercise's figures, hand-computed lexical rewards, verifiers, YAML."""

from __future__ import annotations

import random

import pytest
import torch
from jsonargparse import ArgumentParser

from shraygpt_rl.rewards import (
    ANIMALS,
    HUMANS,
    ArithmeticVerifier,
    KeywordReward,
    LearnedReward,
    LexicalPreferenceReward,
    RewardFunction,
    SortingVerifier,
    TaskVerifier,
    WeightedSum,
    animal_frequency,
    task_answer,
)


def seed_001_reward(response: str) -> float:
    """Seed 001's animal-stories reward, transcribed from the notebook line by line."""
    words = response.lower().split()
    n = len(words)
    mentions = [w for w in words if w in ANIMALS]
    a = len(mentions)
    h = len([w for w in words if w in HUMANS])
    length_penalty = 0 if n > 4 else -1.0
    threshold = max(5, int(0.15 * n))
    excess = -0.5 * (a - threshold) if a > threshold else 0
    unique = 0.5 * len(set(mentions)) if a > 0 else 0
    return 1.2 * a - 0.8 * h + length_penalty + excess + unique


def seed_003_reward(response: str, chosen: str, rejected: str) -> float:
    """Seed 003's lexical reward, transcribed from the notebook line by line."""

    def overlap(a, b):
        a_words, b_words = set(a.lower().split()), set(b.lower().split())
        if not a_words:
            return 0.0
        return len(a_words & b_words) / len(a_words)

    r = response.strip()
    length_penalty = min(abs(len(r) - len(chosen)) / max(len(chosen), 1), 1.0)
    return overlap(r, chosen) - overlap(r, rejected) - 0.2 * length_penalty


def random_texts(seed: int, count: int, vocabulary: list[str]) -> list[str]:
    """Strings of 0-60 words drawn from ``vocabulary``, in random case, with random spacing."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(0, 60))]
        words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w for w in words]
        texts.append(rng.choice(["", " ", "\n"]) + rng.choice([" ", "  ", "\t"]).join(words) + rng.choice(["", " "]))
    return texts


STORY_WORDS = sorted(ANIMALS)[:12] + sorted(HUMANS)[:6] + "the a and ran over cat. dog, fox! happy day".split()


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The quick brown fox and a lion met a boy", 2.6),
        ("a cat and dog", 2.4),
        ("cat dog lion tiger bear fox cat dog lion tiger bear fox", 13.9),
        ("This is a simple sentence about nothing special", 0.0),
    ],
)
def test_keyword_reward_reproduces_the_seed_examples(text, expected):
    assert KeywordReward().score("", text, {}) == pytest.approx(expected, abs=1e-12)


def test_keyword_reward_is_the_seed_formula_on_many_strings():
    texts = random_texts(0, 2000, STORY_WORDS)
    got = KeywordReward()([""] * len(texts), texts, [{}] * len(texts))
    want = torch.tensor([seed_001_reward(t) for t in texts])
    assert torch.allclose(got, want, atol=1e-5)
    # The corners of the formula are all visited: short texts, the excess term, humans, no animal.
    assert {t.strip() == "" for t in texts} == {True, False}
    assert (want < -0.5).any() and (want > 10).any()
    # Punctuation stays attached to words, as in the seed: "cat." is not an animal.
    assert KeywordReward().score("", "a cat. and a dog, ran", {}) == pytest.approx(-0.0)


def test_lexical_preference_reward_by_hand():
    meta = {"chosen_response": "the cat sat on the mat", "rejected_response": "dogs bark loudly"}
    reward = LexicalPreferenceReward()
    # "the cat sat loudly": 3 of its 4 distinct words are in chosen, 1 in rejected; 18 vs 22 characters.
    assert reward.score("", "the cat sat loudly", meta) == pytest.approx(3 / 4 - 1 / 4 - 0.2 * 4 / 22)
    assert reward.score("", "  the cat sat on the mat ", meta) == pytest.approx(1.0)
    # 16 characters against 22; no word of the response is in chosen.
    assert reward.score("", "dogs bark loudly", meta) == pytest.approx(0.0 - 1.0 - 0.2 * 6 / 22)
    assert reward.score("", "", meta) == pytest.approx(-0.2)  # no words: no overlap; length penalty capped at 1


def test_lexical_preference_reward_is_the_seed_formula_on_many_strings():
    vocabulary = "I you the a can help with that sorry not sure here is how to do it Yes no maybe".split()
    responses, chosen, rejected = (random_texts(seed, 1500, vocabulary) for seed in (1, 2, 3))
    metadata = [{"chosen_response": c, "rejected_response": r} for c, r in zip(chosen, rejected)]
    got = LexicalPreferenceReward()([""] * len(responses), responses, metadata)
    want = torch.tensor([seed_003_reward(x, c, r) for x, c, r in zip(responses, chosen, rejected)])
    assert torch.allclose(got, want, atol=1e-6)
    assert (want > 0).any() and (want < 0).any()


def test_animal_frequency():
    assert animal_frequency(["a cat and a dog", "the fox"]) == pytest.approx(3 / 7)
    assert animal_frequency(["", " "]) == 0.0


def test_verifiers_score_batches():
    prompts = ["User: What is 2 + 3?\n\nAssistant:"] * 3
    responses = ["Answer: 5", "Answer: 6", "no idea"]
    assert ArithmeticVerifier()(prompts, responses, [{"target": 5}] * 3).tolist() == pytest.approx([1, -0.2, -1])
    assert ArithmeticVerifier()(prompts, responses, [{}] * 3).tolist() == pytest.approx([1, -0.2, -1])
    sort = SortingVerifier()(["p", "p"], ["Answer: 1, 2", "Answer: x"], [{"numbers": [2, 1]}] * 2)
    assert sort.tolist() == pytest.approx([1, -0.5])


def test_task_verifier_dispatches_on_metadata():
    metadata = [{"task": "arithmetic", "target": 4}, {"task": "sorting", "numbers": [3, 1]}]
    rewards = TaskVerifier()(["p", "p"], ["Answer: 4", "Answer: 3, 1"], metadata)
    assert rewards.tolist() == pytest.approx([1.0, -0.2])
    with pytest.raises(ValueError, match="metadata\\['task'\\]"):
        TaskVerifier()(["p"], ["x"], [{}])


def test_task_answer_by_hand():
    arithmetic = {"task": "arithmetic", "target": 19}
    assert task_answer("p", "Answer: 019 apples", arithmetic) == ("19", "19")
    assert task_answer("p", "Answer: -3", arithmetic) == ("-3", "19")
    assert task_answer("p", "Answer: x 19", arithmetic) == (None, "19")  # unparsable, as the verifier reads it
    assert task_answer("p", "19", arithmetic) == (None, "19")
    assert task_answer("User: What is 2 + 3?\n\nAssistant:", "Answer: 5", {"task": "arithmetic"}) == ("5", "5")
    sorting = {"task": "sorting", "numbers": [5, 3, 10]}
    assert task_answer("p", "Answer: 3,5 ,10\nthen 1", sorting) == ("3, 5, 10", "3, 5, 10")
    assert task_answer("p", "Answer: 10, 3", sorting) == ("10, 3", "3, 5, 10")
    assert task_answer("p", "Answer: none", sorting) == (None, "3, 5, 10")
    with pytest.raises(ValueError, match="metadata\\['task'\\]"):
        task_answer("p", "Answer: 1", {})


def test_task_answer_is_right_exactly_when_the_verifier_says_so():
    rng = random.Random(0)
    metadata = [{"task": "arithmetic", "target": 12}, {"task": "sorting", "numbers": [2, 1]}]
    right = [0, 0]
    for _ in range(2000):  # near misses of both tasks' answers: prefixes, separators, padding zeros, signs
        numbers = [rng.choice(["1", "2", "12", "01", "-1", "x"]) for _ in range(rng.randrange(1, 4))]
        body = "".join(n + rng.choice([", ", ",", " ", "\n", "-", ""]) for n in numbers)
        response = rng.choice(["", "Answer:", "Answer: ", "so Answer:"]) + body
        for i, meta in enumerate(metadata):
            answer, correct = task_answer("p", response, meta)
            assert (answer == correct) == bool(TaskVerifier().success(["p"], [response], [meta])), (response, meta)
            right[i] += answer == correct
    assert min(right) > 10  # both tasks' successes were tried, not only failures


def test_weighted_sum_and_components():
    combined = WeightedSum([ArithmeticVerifier(weight=2.0), KeywordReward(weight=0.5)])
    prompts, responses, metadata = ["p"], ["Answer: 4, a cat and a dog ran"], [{"target": 4}]
    parts = combined.components(prompts, responses, metadata)
    assert set(parts) == {"arithmetic_verifier", "keyword_reward"}
    expected = 2.0 * parts["arithmetic_verifier"] + 0.5 * parts["keyword_reward"]
    assert torch.allclose(combined(prompts, responses, metadata), expected)
    assert parts["arithmetic_verifier"].item() == 1.0 and parts["keyword_reward"].item() == pytest.approx(3.4)


def test_plain_callables_combine_too():
    def length(prompts, responses, metadata):
        return torch.tensor([float(len(r)) for r in responses])

    assert WeightedSum([length])(["p"], ["abc"], [{}]).item() == 3.0


def test_learned_reward_fills_the_slot_with_any_scorer():
    class Scorer:
        def score(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses], requires_grad=True)

    reward = LearnedReward(scorer=Scorer())
    out = reward(["a", "b"], ["xy", "xyz"], [{}, {}])
    assert out.tolist() == [2.0, 3.0] and not out.requires_grad


def test_learned_reward_needs_one_source():
    with pytest.raises(ValueError, match="either a reward-model checkpoint or a scorer"):
        LearnedReward()


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one prompt, response and metadata dict per sample"):
        KeywordReward()(["a", "b"], ["x"], [{}])


def test_rewards_are_chosen_in_yaml_by_class_path(tmp_path):
    config = tmp_path / "rewards.yaml"
    config.write_text(
        "rewards:\n"
        "  - class_path: shraygpt_rl.rewards.ArithmeticVerifier\n"
        "  - class_path: shraygpt_rl.rewards.KeywordReward\n"
        "    init_args: {weight: 0.1, human_penalty: 1.0}\n"
    )
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--rewards", type=list[RewardFunction])
    parsed = parser.instantiate(parser.parse_args(["--config", str(config)]))
    first, second = parsed.rewards
    assert isinstance(first, ArithmeticVerifier) and isinstance(second, KeywordReward)
    assert second.weight == 0.1 and second.human_penalty == 1.0
