"""Built-in tasks: determinism, disjoint splits, verifiers against hand-made cases, SFT noise."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from shraygpt_rl.data.tasks import (
    ArithmeticTask,
    MultiplicationTask,
    SortingTask,
    arithmetic_reward,
    arithmetic_target,
    make_task,
    sorting_reward,
)


@pytest.mark.parametrize(
    "response,reward",
    [
        ("Answer: 19", 1.0),
        ("Let me add. Answer:19 done", 1.0),
        ("Answer: 18", -0.2),
        ("Answer: -19", -0.2),
        ("Answer: nineteen", -0.5),
        ("Answer:", -0.5),
        ("19", -1.0),
        ("", -1.0),
        ("answer: 19", -1.0),  # the rule asks for "Answer:"
    ],
)
def test_arithmetic_rule(response, reward):
    assert arithmetic_reward(response, 19) == reward


def test_arithmetic_target_is_the_sum_of_the_prompts_integers():
    prompt = "System: You are ShrayGPT v2.\n\nUser: What is 12 + 7 + 3?\n\nAssistant:"
    assert arithmetic_target(prompt) == 22  # only the user turn counts


@pytest.mark.parametrize(
    "response,reward",
    [
        ("Answer: 1, 3, 5, 9", 1.0),
        ("Answer: [1, 3, 5, 9]", 1.0),
        ("Answer: 1, 3, 9, 5", -0.2),
        ("Answer: 1, 3, 5", -0.2),
        ("Answer: none", -0.5),
        ("1, 3, 5, 9", -1.0),
        ("Answer: 1, 3\n5, 9", -0.2),  # only the first line is the answer
    ],
)
def test_sorting_rule(response, reward):
    assert sorting_reward(response, [5, 3, 9, 1]) == reward


def test_problems_are_deterministic_and_splits_disjoint():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert a.problems("train") == b.problems("train")
    assert ArithmeticTask(seed=4).problems("test") != a.problems("test")
    splits = {s: {tuple(p) for p in a.problems(s)} for s in ("train", "val", "test")}
    assert len(splits["val"]) == len(splits["test"]) == 200 and len(splits["train"]) == 5000
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["val"])
    assert not (splits["val"] & splits["test"])


def test_difficulty_is_configurable():
    task = ArithmeticTask(num_terms=3, digits=1, num_train=50, num_val=10, num_test=10)
    assert all(len(p) == 3 and all(0 <= n < 10 for n in p) for p in task.problems("train"))
    row = task.prompts("test")[0]
    assert row["question"] == f"What is {' + '.join(map(str, row['numbers']))}?"
    assert row["target"] == sum(row["numbers"])
    assert row["prompt"] == [{"role": "user", "content": row["question"]}]  # the chat format renders it


def test_small_tasks_fill_train_with_what_is_left():
    task = ArithmeticTask(num_terms=2, digits=1, num_train=1000, num_val=20, num_test=20)
    assert len(task.problems("train")) == 100 - 40  # 10 x 10 distinct problems
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        ArithmeticTask(digits=1, num_val=60, num_test=60).problems("train")


@pytest.mark.parametrize("task", [ArithmeticTask(num_train=3000), SortingTask(num_train=3000)], ids=["arith", "sort"])
def test_sft_noise_and_preferences_agree_with_the_verifier(task):
    verify = {
        "arithmetic": lambda r, row: arithmetic_reward(r, row["target"]),
        "sorting": lambda r, row: sorting_reward(r, row["numbers"]),
    }[task.name]
    sft = task.sft("train", wrong_fraction=0.3)
    share_wrong = 1 - sum(sft["correct"]) / len(sft)
    assert abs(share_wrong - 0.3) < 0.03
    assert all(verify(r["response"], r) == (1.0 if r["correct"] else -0.2) for r in sft)
    clean = task.sft("val", wrong_fraction=0.0)
    assert all(clean["correct"])
    pairs = task.preferences("val")
    assert all(verify(r["chosen_response"], r) == 1.0 and verify(r["rejected_response"], r) < 1.0 for r in pairs)
    assert pairs[0]["prompt"] == [{"role": "user", "content": pairs[0]["question"]}]


def test_arithmetic_rejected_answers_cover_every_kind_of_error():
    task = ArithmeticTask(num_train=3000)
    pairs = task.preferences("train")
    kinds = Counter()
    for row in pairs:
        rejected, target = row["rejected_response"], row["target"]
        if not rejected.startswith("Answer:"):
            kinds["no answer"] += 1
            continue
        off = abs(int(rejected.split()[-1]) - target)
        kinds["carry" if off == 10 and target >= 10 else "units" if off < 10 else "far"] += 1
    shares = {k: v / len(pairs) for k, v in kinds.items()}
    assert shares["carry"] == pytest.approx(0.7, abs=0.04) and shares["units"] == pytest.approx(0.15, abs=0.03)
    assert shares["far"] == pytest.approx(0.10, abs=0.03) and shares["no answer"] == pytest.approx(0.05, abs=0.02)


def test_sorting_prompts_carry_their_metadata():
    row = SortingTask(num_items=5, digits=2).prompts("val")[0]
    assert row["task"] == "sorting" and len(row["numbers"]) == 5
    assert row["target"] == sorted(row["numbers"])
    assert row["question"].startswith("Sort in ascending order: ")


def test_make_task_and_bad_options():
    assert isinstance(make_task("sorting", num_terms=5, digits=1), SortingTask)
    with pytest.raises(ValueError, match="Unknown task"):
        make_task("chess")
    with pytest.raises(ValueError, match="num_terms >= 2"):
        ArithmeticTask(num_terms=1)
    with pytest.raises(ValueError, match="wrong_fraction must be in"):
        ArithmeticTask().sft("train", wrong_fraction=1.5)


def test_multiplication_demonstrations_call_the_tool_and_noise_changes_one_operand_digit():
    task = MultiplicationTask(num_train=3000)
    sft = task.sft("train", wrong_fraction=0.4)
    assert abs(1 - sum(sft["correct"]) / len(sft) - 0.4) < 0.03
    call = re.compile(r"^<calc>(\d+)\*(\d+)</calc><result>(\d+)</result>\nAnswer: (\d+)$")
    for row in sft:
        a, b = row["numbers"]
        x, y, result, answer = map(int, call.match(row["response"]).groups())
        assert result == answer == x * y  # the tool's answer, copied
        assert row["target"] == a * b and 100 <= a < 1000 and 100 <= b < 1000
        changed = [(u, v) for u, v in zip(f"{a}{b}", f"{x}{y}") if u != v]
        assert len(changed) == (0 if row["correct"] else 1) and len(str(x)) == len(str(y)) == 3
        assert arithmetic_reward(row["response"], row["target"]) == (1.0 if row["correct"] else -0.2)
    assert task.prompts("test")[0]["question"] == "What is {} * {}?".format(*task.problems("test")[0])
    assert isinstance(make_task("multiplication", digits=2, num_terms=3, num_items=4), MultiplicationTask)
    with pytest.raises(ValueError, match="multiplication needs digits >= 1"):
        MultiplicationTask(digits=0)
