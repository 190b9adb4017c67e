"""Reward functions: the exercise's figures, hand-computed lexical rewards, verifiers, YAML."""

from __future__ import annotations

import random

import pytest
import torch
from jsonargparse import ArgumentParser

from shraygpt_rl.errors import ConfigError
from shraygpt_rl.rewards import (
    ANIMALS,
    HUMANS,
    AnswerVerifier,
    ArithmeticVerifier,
    KeywordReward,
    LearnedReward,
    LexicalPreferenceReward,
    RewardFunction,
    SortingVerifier,
    TaskVerifier,
    WeightedSum,
    animal_frequency,
    extract_answer,
    reference_answer,
    same_answer,
    task_answer,
)
from shraygpt_rl.stages.checks import check_rewards


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


def test_task_verifiers_take_any_string():
    """5,000 random responses, a long digit run now and then (past the 4,300 digits Python reads
    as an int) and a planted right answer in a third of them: the course's rewards stay in their
    four values, nothing raises, and task_answer agrees with the verifier on every one."""
    rng = random.Random(0)
    metadata = [{"task": "arithmetic", "target": 12}, {"task": "sorting", "numbers": [2, 1]}]
    planted = ["Answer: 12", "Answer: 1, 2", "Answer:012", "Answer: " + "0" * 5000 + "12"]
    right = [0, 0]
    for _ in range(5000):
        response = noise(rng) + rng.choice(["", "Answer:", *planted]) + noise(rng)
        for i, meta in enumerate(metadata):
            reward = TaskVerifier().score("p", response, meta)
            assert reward in (1.0, -0.2, -0.5, -1.0), (reward, response[:80])
            answer, correct = task_answer("p", response, meta)
            assert (answer == correct) == (reward == 1.0), (response[:80], meta)
            right[i] += reward == 1.0
    assert min(right) > 100  # successes were tried, not only failures


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


# --------------------------------------------------------------------------------------------
# AnswerVerifier: final answers of math datasets (GSM8K's "#### N", MATH's \boxed{})
# --------------------------------------------------------------------------------------------
# GSM8K's first training problem's solution, verbatim (Cobbe et al., 2021).
NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("She sold 72 clips in total.", "72"),
        ("I think 3, no 4", "4"),
        ("48 + 24 = 72, so the answer is 72.", "72"),
        ("The total is $1,234.50.", "1,234.50"),
        ("A rise of 15%", "15"),
        ("It is -7 degrees, then -3", "-3"),
        ("pages 3-4", "4"),  # a hyphen between numbers is not a sign
        ("1,23", "23"),  # not a thousands group: two numbers
        ("12,345,678 grains", "12,345,678"),
        ("so 0.25 of them", "0.25"),
        (r"Thus \boxed{42}. Checking: 6 * 7 = 42, 1 + 1 = 2", "42"),  # the box beats the last number
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} and then 5", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{3}, then \boxed{ 4 }", "4"),
        (r"\boxed{\boxed{9}}", "9"),
        (r"\boxed{12", "12"),  # unbalanced: not a box, the last number
        (r"\boxed{7} then \boxed{8", "7"),
        (r"we get 5 \boxed{}", "5"),  # a blank box is no box
        (r"\boxed{}", None),
        ("no number here", None),
        ("", None),
        ("٣ and ۴", None),  # other scripts' digits are not read as numbers
    ],
)
def test_extract_answer_by_hand(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "value,expected",
    [
        (NATALIA, "72"),
        ("He pays 2 * 500 = <<2*500=1000>>1000\n#### 1,000", "1,000"),
        ("#### 5 then #### 6", "6"),  # the last marker
        (r"So the area is $\boxed{\frac{9}{2}}$.", r"\frac{9}{2}"),
        ("42", "42"),
        (" 3.50 ", "3.50"),
        (42, "42"),
        (3.5, "3.5"),
        (1e-05, "0.00001"),
        (None, None),
        ("", None),
        ("   ", None),
        ("####", None),
        (float("nan"), None),
    ],
)
def test_reference_answer_by_hand(value, expected):
    assert reference_answer(value) == expected


@pytest.mark.parametrize(
    "a,b",
    [
        ("42", "42.0"),
        ("42", "42.00"),
        ("$42", "42"),
        (r"\$42", "42"),
        ("1,234", "1234"),
        ("-5", "-5.0"),
        ("50%", "50"),
        (r"50\%", "50"),
        ("3.50", "3.5"),
        (".5", "0.5"),
        ("72.", "72"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{3}{4}", "3/4"),
        (r"-\frac{1}{2}", "-0.5"),
        (r"10,\!000", "10000"),  # MATH's thin space in thousands
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"x^{2} + 1", "x^{2}+1"),
        ("−3", "-3"),  # the Unicode minus
    ],
)
def test_same_answers(a, b):
    assert same_answer(a, b) and same_answer(b, a)


@pytest.mark.parametrize(
    "a,b",
    [
        ("42", "43"),
        ("0.1", "0.10000001"),  # exact, no float tolerance
        ("1,234", "1.234"),
        ("1,23", "123"),  # not a thousands group, so not a number
        ("-5", "5"),
        (r"\frac{1}{2}", r"\frac{1}{3}"),
        ("1/0", "0"),
        (r"\leftarrow", "arrow"),  # \left only as a command of its own
        ("72", None),
        (None, None),
    ],
)
def test_different_answers(a, b):
    assert not same_answer(a, b) and not same_answer(b, a)


def test_numbers_too_long_for_int_compare_as_strings():
    digits = "9" * 5000  # Python refuses to read an int of over 4,300 digits
    assert extract_answer(f"so {digits}") == digits
    assert same_answer(digits, digits) and not same_answer(digits, digits[:-1])


def test_answer_verifier_scores_gsm8k_by_hand():
    verifier = AnswerVerifier(correct=1.0, wrong=-0.5, no_answer=-1.0)
    meta = {"question": "How many clips did Natalia sell?", "answer": NATALIA}
    responses = [
        "She sold 48 / 2 = 24 in May, so 48 + 24 = 72.",
        r"24 + 48 = \boxed{72}",
        "72.0 clips",
        "She sold 24 in May.",
        r"\boxed{71}",
        "I do not know.",
        r"\boxed{}",
    ]
    rewards = verifier(["p"] * len(responses), responses, [meta] * len(responses))
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [1.0, 1.0, 1.0, -0.5, -0.5, -1.0, -1.0]
    assert verifier.success(["p"] * len(responses), responses, [meta] * len(responses)).tolist() == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert AnswerVerifier().name == "answer_verifier"


def test_answer_verifier_reads_its_column_and_unreadable_references_give_no_answer():
    verifier = AnswerVerifier(column="solution", no_answer=-1.0)
    assert verifier.score("p", r"\boxed{\dfrac{1}{2}}", {"solution": r"... so $\boxed{\frac12}$"}) == 0.0  # strings
    assert verifier.score("p", r"\boxed{\dfrac{1}{2}}", {"solution": r"... so $\boxed{\frac{1}{2}}$"}) == 1.0
    assert verifier.score("p", "1,234", {"solution": 1234}) == 1.0
    assert verifier.score("p", "3.5", {"solution": 3.5}) == 1.0
    for bad in (None, "", " ", "####", float("nan")):
        assert verifier.score("p", "42", {"solution": bad}) == -1.0
    assert verifier.score("p", "42", {}) == -1.0  # no column (only when called without the startup check)


def test_answer_verifier_without_its_column_is_refused_at_startup():
    keys = {"question", "answer"}
    check_rewards([AnswerVerifier()], keys, "gsm8k")
    with pytest.raises(ConfigError) as refused:
        check_rewards([AnswerVerifier(column="solution")], keys, "gsm8k")
    message = str(refused.value)
    assert message.startswith("AnswerVerifier needs 'solution' in each prompt's metadata, which the data 'gsm8k'")
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_answer_verifier_is_chosen_in_yaml(tmp_path):
    config = tmp_path / "rewards.yaml"
    config.write_text(
        "rewards:\n  - class_path: shraygpt_rl.rewards.AnswerVerifier\n    init_args: {column: solution, wrong: -0.5}\n"
    )
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--rewards", type=list[RewardFunction])
    (verifier,) = parser.instantiate(parser.parse_args(["--config", str(config)])).rewards
    assert isinstance(verifier, AnswerVerifier) and verifier.requires == ("solution",)
    assert (verifier.correct, verifier.wrong, verifier.no_answer) == (1.0, -0.5, 0.0)


# The fuzz alphabet: what trips answer parsers: boxes, braces, GSM8K markers, currency, separators,
# signs, spaces, letters, newlines, non-ASCII (other scripts' digits, the Unicode minus, CJK, a
# zero-width space).
FUZZ_PIECES = [*"0123456789", "\\boxed{", "{", "}", "#", "####", "$", ",", ".", "-", " ", "\n", *"abxyz"]
FUZZ_PIECES += ["\\frac", "é", "٣", "−", "中", "\u200b", "\\"]


def noise(rng: random.Random, allow: list[str] = FUZZ_PIECES) -> str:
    """0-40 pieces from ``allow``; now and then a long run of one of its characters (up to 5,000:
    past the 4,300 digits Python reads as an int)."""
    pieces = [rng.choice(allow) for _ in range(rng.randint(0, 40))]
    if rng.random() < 0.03:
        run = rng.choice([p for p in allow if len(p) == 1])
        pieces.insert(rng.randint(0, len(pieces)), run * rng.randint(100, 5000))
    return "".join(pieces)


def random_number(rng: random.Random) -> str:
    """A number as a model writes it: a sign, thousands separators or none, decimals or none."""
    value = rng.choice([rng.randint(0, 9), rng.randint(0, 999), rng.randint(0, 10**9)])
    digits = f"{value:,}" if rng.random() < 0.5 else str(value)
    decimals = "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3))) if rng.random() < 0.3 else ""
    return ("-" if rng.random() < 0.3 else "") + digits + decimals


def test_answer_parsing_never_raises_on_random_strings():
    rng = random.Random(0)
    verifier = AnswerVerifier(correct=1.0, wrong=-0.5, no_answer=-1.0)
    completions = [noise(rng) for _ in range(5000)]
    references = [
        rng.choice([noise(rng), random_number(rng), None, rng.randint(-99, 99), rng.random()]) for _ in completions
    ]
    # Half the references are the completion itself, so that equal answers are reached too.
    metadata = [{"answer": c if i % 2 else r} for i, (c, r) in enumerate(zip(completions, references))]
    rewards = verifier(["p"] * len(completions), completions, metadata)
    for completion, meta, reward in zip(completions, metadata, rewards.tolist()):
        answer, reference = extract_answer(completion), reference_answer(meta["answer"])
        assert answer is None or isinstance(answer, str) and answer == answer.strip() and answer
        if answer is None or reference is None:
            assert reward == -1.0, (completion, meta)
        else:
            assert reward == (1.0 if same_answer(answer, reference) else -0.5), (completion, meta)
    assert {-1.0, -0.5, 1.0} <= set(rewards.tolist())  # every outcome was reached
    assert any(len(c) > 4300 for c in completions)  # and runs too long for int()


def test_the_planted_answer_is_found_in_random_strings():
    rng = random.Random(1)
    verifier = AnswerVerifier()
    no_box = [p for p in FUZZ_PIECES if p != "\\boxed{"]  # its letters cannot spell "boxed" otherwise
    no_digit = [p for p in no_box if not p.isdigit()]
    latex = [r"\frac{1}{2}", r"\sqrt{3}", "x^{2}+1", r"\{1, 2\}", "{}{}", r"\text{east}"]
    for i in range(3000):
        if i % 2:  # noise, a box, noise without a box
            answer = random_number(rng) if rng.random() < 0.6 else rng.choice(latex)
            tail = noise(rng, no_box)
            completion = noise(rng) + "\\boxed{" + answer + "}" + tail
        else:  # noise without a box, a final number, noise without a box or a digit
            answer = random_number(rng)
            head, tail = noise(rng, no_box), noise(rng, no_digit)
            completion = head + rng.choice([" ", "\n", ": "]) + answer + rng.choice(["", " ", ".", "\n"]) + tail
        assert extract_answer(completion) == answer, completion
        assert verifier.score("p", completion, {"answer": f"So it is {answer}.\n#### {answer}"}) == 1.0, completion
