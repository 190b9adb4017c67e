"""Several labellers per pair: what their judgements say together, and how far to trust them.

Seed 004 has several evaluators rate each comparison, "to ensure reliability", with quality
control that keeps the standard consistent. This module turns a judgement file
(``data/labels.py``) into:

* a verdict per pair (``aggregate``): the majority direction, and a strength from the mean grade.
  A grade is a judgement on the five-point scale, read as response A's advantage over response B
  (the file's ``response_a``/``response_b``, whatever order the page showed): ``A++`` 2, ``A+`` 1,
  ``=`` 0, ``B+`` -1, ``B++`` -2. Skips carry no grade. The rule, in full:

  - votes: the grades of the pair's regular judgements (not gold, not repeats, not retracted);
  - the direction is the side with more votes than the other; equal votes are a split, dropped;
  - ``agreement`` is that side's share of all votes, ties included; the pair is kept when it is
    at least ``min_agreement`` (0.5 by default: two "A" and one "B" keep A; one "A" and two "="
    drop the pair);
  - ``strength`` is the mean grade toward that side (ties count 0; the minority's grades count
    against it); a pair whose strength is not positive is a split too, and dropped.

  With one judgement per pair this is the page's behaviour before several labellers: each
  judgement that prefers an answer is a pair, its strength the grade (2 or 1).
* training rows: TRL's preference rows (``prompt``, ``chosen``, ``rejected``, ``margin``) and,
  for KTO, unpaired rows (``prompt``, ``completion``, ``label``);
* agreement: Krippendorff's alpha on the ordinal five-point scale (the ``krippendorff`` package;
  labellers as coders, pairs as units, skips missing), the share of pairs with two or more votes
  on which every vote points the same way, and each labeller's agreement with the majority of the
  *other* labellers of the same pairs;
* quality control: each labeller's accuracy on gold pairs (``gold``: the answer known, ``a`` or
  ``b``) and self-consistency on repeats (``repeat``: a pair shown to the same person again),
  both kept out of the verdicts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

GRADES = {"A++": 2, "A+": 1, "=": 0, "B+": -1, "B++": -2}  # on screen; "skip" has none


def grade(record: dict[str, Any]) -> int | None:
    """A judgement's grade of ``response_a`` over ``response_b`` (-2 to 2); None for a skip."""
    if record["choice"] not in GRADES:
        return None
    on_screen = GRADES[record["choice"]]
    return on_screen if record.get("shown", "ab") == "ab" else -on_screen


def direction(value: float) -> str | None:
    """``a``, ``b`` or None (a tie) for a grade or a sum of grades."""
    return "a" if value > 0 else "b" if value < 0 else None


@dataclass(frozen=True)
class Verdict:
    """What the regular judgements of one pair say together (see the module's rule)."""

    item: str
    prompt: Any
    response_a: str
    response_b: str
    grades: tuple[int, ...]  # one per vote, in file order
    labellers: tuple[str, ...]
    side: str | None  # "a", "b", or None for a split
    agreement: float  # the side's share of the votes (0 for a split)
    strength: float  # the mean grade toward the side
    kept: bool

    @property
    def chosen(self) -> str:
        return self.response_a if self.side == "a" else self.response_b

    @property
    def rejected(self) -> str:
        return self.response_b if self.side == "a" else self.response_a


def regular(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The judgements that count toward verdicts: active, neither gold nor repeats."""
    return [r for r in active(records) if not r.get("gold") and not r.get("repeat")]


def active(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The judgements not retracted, in file order."""
    retracted = {r["retracts"] for r in records if r.get("type") == "retraction"}
    return [r for r in records if r.get("type") == "judgement" and r["id"] not in retracted]


def aggregate(records: list[dict[str, Any]], min_agreement: float = 0.5) -> list[Verdict]:
    """One ``Verdict`` per pair with at least one graded regular judgement, in file order."""
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement must be between 0 and 1, got {min_agreement}.")
    last: dict[tuple[str, str], dict[str, Any]] = {}  # one vote per labeller and pair, the last (merged files)
    for record in regular(records):
        if grade(record) is not None:
            last.pop((record["item"], record["labeller"]), None)
            last[record["item"], record["labeller"]] = record
    votes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (item, _), record in last.items():
        votes[item].append(record)
    verdicts = []
    for item, judged in votes.items():
        grades = tuple(grade(r) for r in judged)
        for_a, for_b = sum(g > 0 for g in grades), sum(g < 0 for g in grades)
        side = direction(for_a - for_b)
        agreement = max(for_a, for_b) / len(grades) if side else 0.0
        strength = (sum(grades) if side == "a" else -sum(grades)) / len(grades) if side else 0.0
        first = judged[0]
        verdicts.append(
            Verdict(
                item=item,
                prompt=first["prompt"],
                response_a=first["response_a"],
                response_b=first["response_b"],
                grades=grades,
                labellers=tuple(r["labeller"] for r in judged),
                side=side,
                agreement=agreement,
                strength=strength,
                kept=side is not None and strength > 0 and agreement >= min_agreement,
            )
        )
    return verdicts


def exportable(verdicts: list[Verdict]) -> list[Verdict]:
    """The kept verdicts whose answers both have text: TRL's formats refuse an empty reply, which
    a policy may sample (and a labeller rightly reject)."""
    return [v for v in verdicts if v.kept and v.chosen.strip() and v.rejected.strip()]


def preference_rows(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    """TRL's preference rows of the ``exportable`` verdicts, the strength as ``margin``."""
    return [
        {"prompt": v.prompt, "chosen": v.chosen, "rejected": v.rejected, "margin": v.strength}
        for v in exportable(verdicts)
    ]


def unpaired_rows(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    """KTO's unpaired rows of the ``exportable`` verdicts: the chosen answer desirable, the other not."""
    rows = []
    for v in exportable(verdicts):
        if v.kept:
            rows += [
                {"prompt": v.prompt, "completion": v.chosen, "label": True},
                {"prompt": v.prompt, "completion": v.rejected, "label": False},
            ]
    return rows


def krippendorff_alpha(records: list[dict[str, Any]]) -> float | None:
    """Krippendorff's alpha, ordinal, of the regular judgements' grades: labellers are the
    coders, pairs the units, skips and pairs a labeller did not judge are missing. None when no
    pair has two grades, or when every grade is the same (alpha is undefined then)."""
    import krippendorff

    grades: dict[tuple[str, str], int] = {}
    for record in regular(records):
        value = grade(record)
        if value is not None:
            grades[record["labeller"], record["item"]] = value
    labellers = {who: n for n, who in enumerate(sorted({who for who, _ in grades}))}
    items = {item: n for n, item in enumerate(sorted({item for _, item in grades}))}
    table = np.full((len(labellers), len(items)), np.nan)
    for (who, item), value in grades.items():
        table[labellers[who], items[item]] = value
    pairable = (~np.isnan(table)).sum(axis=0) >= 2
    values = table[:, pairable]
    if values.size == 0 or len(np.unique(values[~np.isnan(values)])) < 2:
        return None
    domain = sorted(GRADES.values())
    return float(krippendorff.alpha(reliability_data=values, level_of_measurement="ordinal", value_domain=domain))


def unanimous_share(verdicts: list[Verdict]) -> float | None:
    """The share of pairs with two or more votes on which every vote has the same direction
    (A, B or a tie); None when no pair has two."""
    several = [v for v in verdicts if len(v.grades) >= 2]
    if not several:
        return None
    return sum(len({direction(g) for g in v.grades}) == 1 for v in several) / len(several)


def labeller_report(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per labeller: judgements made (skips included); agreement with the majority of the other
    labellers of the same pairs, the most common direction among A, B and a tie (a pair where
    the others have no single most common one, or no grade, does not count); accuracy on gold
    pairs; and self-consistency, the share of repeats whose direction (a tie too) matches their
    first judgement of the pair. Each rate comes with its count; None when the count is 0."""
    judged = active(records)
    by_item: dict[str, list[tuple[str, int]]] = defaultdict(list)
    first: dict[tuple[str, str], int | None] = {}
    for record in regular(judged):
        value = grade(record)
        first.setdefault((record["labeller"], record["item"]), value)
        if value is not None:
            by_item[record["item"]].append((record["labeller"], value))
    figures: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"majority": [], "gold": [], "repeat": []})
    for record in judged:
        who, value = record["labeller"], grade(record)
        figures.setdefault(who, {"judgements": 0})["judgements"] += 1
        if value is None:
            continue
        if record.get("gold"):
            counts[who]["gold"].append(direction(value) == record["gold"])
        elif record.get("repeat"):
            earlier = first.get((who, record["item"]))
            if earlier is not None:
                counts[who]["repeat"].append(direction(value) == direction(earlier))
        else:
            majority = _majority([g for other, g in by_item[record["item"]] if other != who])
            if majority != "split":
                counts[who]["majority"].append(direction(value) == majority)
    for who, row in figures.items():
        for name, key in (
            ("majority", "agreement_with_majority"),
            ("gold", "gold_accuracy"),
            ("repeat", "self_consistency"),
        ):
            hits = counts[who][name]
            row[key] = sum(hits) / len(hits) if hits else None
            row[f"{name}_count"] = len(hits)
    return figures


def _majority(grades: list[int]) -> str | None:
    """The most common direction among ``grades`` (``a``, ``b`` or None for a tie); ``split``
    when none is more common than every other, or there are no grades."""
    tally: dict[str | None, int] = defaultdict(int)
    for g in grades:
        tally[direction(g)] += 1
    if not tally:
        return "split"
    ranked = sorted(tally.values(), reverse=True)
    if len(ranked) > 1 and ranked[0] == ranked[1]:
        return "split"
    return max(tally, key=tally.get)


def report(records: list[dict[str, Any]], min_agreement: float = 0.5) -> dict[str, Any]:
    """Everything above in one JSON-ready dict: pairs judged, kept and dropped, alpha, the
    unanimous share and the per-labeller table."""
    verdicts = aggregate(records, min_agreement)
    return {
        "pairs_judged": len(verdicts),
        "pairs_kept": sum(v.kept for v in verdicts),
        "min_agreement": min_agreement,
        "votes_per_pair": _histogram(len(v.grades) for v in verdicts),
        "krippendorff_alpha_ordinal": krippendorff_alpha(records),
        "unanimous_share": unanimous_share(verdicts),
        "labellers": labeller_report(records),
    }


def _histogram(values) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for value in values:
        counts[str(value)] += 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
