"""Several labellers per pair: verdicts, exports, Krippendorff's alpha, agreement and quality control."""

from __future__ import annotations

import json
import random

import pytest
from conftest import naive_ordinal_alpha

from shraygpt_rl.data.agreement import (
    aggregate,
    grade,
    krippendorff_alpha,
    labeller_report,
    preference_rows,
    report,
    unanimous_share,
    unpaired_rows,
)
from shraygpt_rl.data.labels import load_judgements

SCREEN = {2: "A++", 1: "A+", 0: "=", -1: "B+", -2: "B++"}


def judgement(item: str, who: str, value: int | None, shown: str = "ab", **extra) -> dict:
    """A judgement record grading response_a over response_b by ``value`` (None: a skip), as the
    page writes it when it showed the answers in ``shown`` order."""
    on_screen = None if value is None else value if shown == "ab" else -value
    return {
        "type": "judgement",
        "id": f"{item}-{who}-{random.random()}",
        "item": item,
        "prompt": f"prompt of {item}",
        "response_a": f"a of {item}",
        "response_b": f"b of {item}",
        "shown": shown,
        "choice": "skip" if value is None else SCREEN[on_screen],
        "labeller": who,
        **extra,
    }


def test_a_grade_is_response_a_over_response_b_whatever_the_screen_showed():
    assert [grade(judgement("x", "ann", v, "ab")) for v in (2, 1, 0, -1, -2)] == [2, 1, 0, -1, -2]
    assert [grade(judgement("x", "ann", v, "ba")) for v in (2, 1, 0, -1, -2)] == [2, 1, 0, -1, -2]
    assert judgement("x", "ann", 2, "ba")["choice"] == "B++"  # B on screen was response_a
    assert grade(judgement("x", "ann", None)) is None


@pytest.mark.parametrize(
    "votes,side,agreement,strength,kept",
    [
        ((1, 2, -1), "a", 2 / 3, 2 / 3, True),  # two for A, one for B: mean (1 + 2 - 1) / 3
        ((-2, -2, 0), "b", 2 / 3, 4 / 3, True),  # the tie counts 0 in the mean
        ((1, 0, 0), "a", 1 / 3, 1 / 3, False),  # one A, two ties: below min_agreement 0.5
        ((1, -1), None, 0.0, 0.0, False),  # a split
        ((1, -2, 1), "a", 2 / 3, 0.0, False),  # a majority the mean does not back: a split too
        ((2,), "a", 1.0, 2.0, True),  # one labeller: the grade is the strength
        ((0,), None, 0.0, 0.0, False),  # a tie alone
        ((-1, None), "b", 1.0, 1.0, True),  # a skip is no vote
    ],
)
def test_a_pairs_verdict_follows_the_stated_rule(votes, side, agreement, strength, kept):
    records = [judgement("x", f"l{n}", v, "ab" if n % 2 else "ba") for n, v in enumerate(votes)]
    (verdict,) = aggregate(records, min_agreement=0.5)
    assert verdict.side == side and verdict.kept == kept
    assert verdict.agreement == pytest.approx(agreement, abs=1e-12)
    assert verdict.strength == pytest.approx(strength, abs=1e-12)
    if kept:
        chosen, rejected = ("a of x", "b of x") if side == "a" else ("b of x", "a of x")
        assert (verdict.chosen, verdict.rejected) == (chosen, rejected)


def test_min_agreement_keeps_or_drops_by_the_majoritys_share():
    records = [judgement("x", w, v) for w, v in zip("abcd", (1, 1, 1, -1))]  # 3 of 4 for A
    assert aggregate(records, min_agreement=0.75)[0].kept
    assert not aggregate(records, min_agreement=0.76)[0].kept
    with pytest.raises(ValueError, match="min_agreement"):
        aggregate(records, min_agreement=1.5)


def test_retracted_gold_and_repeat_judgements_are_not_votes():
    records = [
        judgement("x", "ann", 2),
        judgement("x", "bob", -2),
        judgement("x", "ann", -2, repeat=True),
        judgement("g", "ann", 2, gold="a"),
    ]
    records.append({"type": "retraction", "id": "r", "retracts": records[1]["id"], "item": "x", "labeller": "bob"})
    (verdict,) = aggregate(records)
    assert verdict.grades == (2,) and verdict.labellers == ("ann",) and verdict.side == "a"


def test_exports_are_trl_preference_rows_with_a_margin_and_kto_rows():
    records = [judgement("x", w, v) for w, v in zip("abc", (-1, -2, -2))] + [judgement("y", "a", 1, "ba")]
    records += [judgement("z", w, v) for w, v in zip("ab", (1, -1))]  # a split: in neither export
    empty = judgement("e", "a", 2)
    records.append({**empty, "response_b": " "})  # kept, but TRL's formats refuse an empty reply
    verdicts = aggregate(records)
    assert preference_rows(verdicts) == [
        {"prompt": "prompt of x", "chosen": "b of x", "rejected": "a of x", "margin": pytest.approx(5 / 3)},
        {"prompt": "prompt of y", "chosen": "a of y", "rejected": "b of y", "margin": 1.0},
    ]
    assert unpaired_rows(verdicts) == [
        {"prompt": "prompt of x", "completion": "b of x", "label": True},
        {"prompt": "prompt of x", "completion": "a of x", "label": False},
        {"prompt": "prompt of y", "completion": "a of y", "label": True},
        {"prompt": "prompt of y", "completion": "b of y", "label": False},
    ]


def test_one_judgement_per_pair_loads_as_before(tmp_path):
    """With one labeller per pair, ``--data.source`` reads what it read before several labellers:
    every judgement that prefers an answer, its grade the strength; ties and skips left out."""
    records = [judgement(f"i{n}", "ann", v, "ab" if n % 3 else "ba") for n, v in enumerate((2, 1, 0, -1, -2, None))]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_judgements(path)
    assert data["strength"] == [2.0, 1.0, 1.0, 2.0]
    assert data["chosen_response"] == ["a of i0", "a of i1", "b of i3", "b of i4"]


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", section C: four observers,
# twelve units, values 1-5, missing ones as None. Published: ordinal alpha 0.815.
PUBLISHED = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def _records_of(table) -> list[dict]:
    """Judgements from a coders x units table of values 1-5 (the grade is the value less 3)."""
    return [
        judgement(f"u{unit:02d}", f"coder{coder}", value - 3, "ab" if (coder + unit) % 2 else "ba")
        for coder, row in enumerate(table)
        for unit, value in enumerate(row)
        if value is not None
    ]


def test_alpha_matches_the_published_example():
    assert krippendorff_alpha(_records_of(PUBLISHED)) == pytest.approx(0.815, abs=5e-4)


def test_naive_alpha_reproduces_the_published_figure():
    assert naive_ordinal_alpha(PUBLISHED) == pytest.approx(0.815, abs=5e-4)


def test_alpha_equals_the_naive_computation_on_random_judgements():
    rng = random.Random(0)
    for _ in range(200):
        coders, units = rng.randint(2, 5), rng.randint(2, 12)
        table = [[rng.choice([None, 1, 2, 3, 4, 5, 5, 4]) for _ in range(units)] for _ in range(coders)]
        pairable = [u for u in zip(*table) if sum(v is not None for v in u) >= 2]
        if len({v for u in pairable for v in u if v is not None}) < 2:
            assert krippendorff_alpha(_records_of(table)) is None
            continue
        assert krippendorff_alpha(_records_of(table)) == pytest.approx(naive_ordinal_alpha(table), rel=1e-9, abs=1e-12)


def test_alpha_is_one_for_perfect_agreement_and_none_without_two_votes():
    assert krippendorff_alpha(_records_of([[1, 5, 3, 2], [1, 5, 3, 2], [1, 5, 3, 2]])) == pytest.approx(1.0)
    assert krippendorff_alpha(_records_of([[1, 5], [None, None]])) is None
    assert krippendorff_alpha([]) is None


def test_the_labeller_report_by_hand():
    """ann and bob agree on x and y, cat dissents on y; on z ann and cat agree, bob ties. Gold:
    ann right, cat wrong. Repeats: ann consistent, bob not."""
    records = [
        judgement("x", "ann", 2),
        judgement("x", "bob", 1, "ba"),
        judgement("y", "ann", -1),
        judgement("y", "bob", -2),
        judgement("y", "cat", 1),
        judgement("z", "ann", 1),
        judgement("z", "bob", 0),
        judgement("z", "cat", 2),
        judgement("g", "ann", 2, gold="a"),
        judgement("g", "cat", -1, gold="a"),
        judgement("x", "ann", 1, repeat=True),
        judgement("y", "bob", 0, repeat=True),
        judgement("w", "bob", None),  # a skip: counted as a judgement, not as a vote
    ]
    figures = labeller_report(records)
    # ann: x vs {bob: a} agrees; y vs {bob: b, cat: a} a split, not counted; z vs {bob: tie, cat: a} split.
    assert figures["ann"]["agreement_with_majority"] == 1.0 and figures["ann"]["majority_count"] == 1
    # bob: x vs {ann: a} yes; y vs {ann: b, cat: a} split; z (tie) vs {ann: a, cat: a} no.
    assert figures["bob"]["agreement_with_majority"] == 0.5 and figures["bob"]["majority_count"] == 2
    # cat: y (a) vs {ann: b, bob: b} no; z (a) vs {ann: a, bob: tie} split.
    assert figures["cat"]["agreement_with_majority"] == 0.0 and figures["cat"]["majority_count"] == 1
    assert figures["ann"]["gold_accuracy"] == 1.0 and figures["cat"]["gold_accuracy"] == 0.0
    assert figures["bob"]["gold_accuracy"] is None and figures["bob"]["gold_count"] == 0
    assert figures["ann"]["self_consistency"] == 1.0 and figures["bob"]["self_consistency"] == 0.0
    assert figures["bob"]["judgements"] == 5 and figures["ann"]["judgements"] == 5
    verdicts = aggregate(records)
    assert unanimous_share(verdicts) == pytest.approx(1 / 3)  # x only; y and z have dissent
    summary = report(records)
    assert summary["pairs_judged"] == 3 and summary["votes_per_pair"] == {"2": 1, "3": 2}
    assert [(v.item, v.side, v.kept) for v in verdicts] == [("x", "a", True), ("y", "b", True), ("z", "a", True)]
    assert summary["pairs_kept"] == 3


def test_a_labellers_repeated_vote_on_a_pair_counts_once_the_last():
    """A merged file may hold one labeller twice on a pair: one vote, the last, as alpha reads it."""
    records = [judgement("x", "ann", -2), judgement("x", "bob", 1), judgement("x", "ann", 2)]
    (verdict,) = aggregate(records)
    assert sorted(verdict.grades) == [1, 2] and sorted(verdict.labellers) == ["ann", "bob"]
