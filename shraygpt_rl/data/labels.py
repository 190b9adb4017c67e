"""Human preference labels: the judgement file the labelling page writes, and its store.

A person sees a prompt and two answers, A and B, and picks one of seed 004's five grades (``A++``
A is significantly better, ``A+`` slightly, ``=`` about the same, ``B+``, ``B++``) or ``skip``.
Each judgement is one JSON line, appended and fsynced at once, so a crash loses nothing:

``{"type": "judgement", "id", "item", "prompt", "response_a", "response_b", "shown", "choice",
"chosen", "rejected", "strength", "note", "labeller", "timestamp"}``

``shown`` is the order on screen (``ab``: A was ``response_a``; ``ba``: A was ``response_b``);
``chosen``/``rejected`` are the preferred and the other answer's text (null for ties and skips)
and ``strength`` is 2 for "significantly", 1 for "slightly", 0 otherwise. Undo appends
``{"type": "retraction", "id", "retracts": <judgement id>, "item", "labeller", "timestamp"}``
rather than rewriting the file. ``load_judgements`` turns a file into preference pairs for
``PreferenceDataModule`` (``--data.source prefs.jsonl``), leaving out ties, skips and
retracted judgements.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import datasets

from shraygpt_rl.data.agreement import GRADES, active, aggregate
from shraygpt_rl.errors import DataError

CHOICES = {"A++": ("A", 2), "A+": ("A", 1), "=": (None, 0), "B+": ("B", 1), "B++": ("B", 2), "skip": (None, 0)}


class LabelError(ValueError):
    """A request the store refuses; ``status`` is the HTTP code the page gets with the sentence."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Item:
    """A prompt and two answers to compare; ``id`` is a hash of the three texts."""

    prompt: str
    response_a: str
    response_b: str

    @property
    def id(self) -> str:
        text = json.dumps([self.prompt, self.response_a, self.response_b])
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def read_items(path: str | Path) -> list[Item]:
    """Pairs to label from a JSONL of ``prompt``, ``response_a``, ``response_b``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"No pairs file at '{path}'.")
    items = []
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {n}: not JSON ({err.msg}).") from err
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in Item.__annotations__):
            raise DataError(f"{path}, line {n}: needs the strings prompt, response_a and response_b.")
        items.append(Item(row["prompt"], row["response_a"], row["response_b"]))
    if not items:
        raise DataError(f"{path} holds no pairs: it is empty.")
    return items


def write_items(path: str | Path, items: list[Item]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"prompt": item.prompt, "response_a": item.response_a, "response_b": item.response_b}))
            f.write("\n")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a judgement file, in order; a cut-off last line (a crash mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = _lines(path)
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):
                break  # the line a crash cut off
            raise DataError(f"{path}, line {n}: not a judgement record ({err.msg}).") from err
    return records


def active_judgements(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The judgements not retracted, by id, in file order."""
    return {r["id"]: r for r in active(records)}


def is_judgement_file(row: dict[str, Any]) -> bool:
    return row.get("type") in ("judgement", "retraction")


def load_judgements(path: str | Path, min_agreement: float = 0.5) -> datasets.Dataset:
    """Preference pairs (``prompt``, ``chosen_response``, ``rejected_response``, ``strength``) from
    a judgement file: one per pair its labellers' verdict keeps (``agreement.aggregate``: the
    majority direction, the mean grade as strength; gold and repeat judgements left out). With
    one judgement per pair, each judgement that prefers an answer, its grade (2 or 1) the
    strength. The prompt is the text the labeller saw, as the model was prompted with it."""
    verdicts = [v for v in aggregate(read_records(path), min_agreement) if v.kept]
    if not verdicts:
        raise DataError(
            f"{path} holds no pair its labellers prefer one answer of (ties, splits and skips are left out)."
        )
    return datasets.Dataset.from_dict(
        {
            "prompt": [v.prompt for v in verdicts],
            "chosen_response": [v.chosen for v in verdicts],
            "rejected_response": [v.rejected for v in verdicts],
            "strength": [float(v.strength) for v in verdicts],
        }
    )


def read_gold(path: str | Path) -> dict[Item, str]:
    """Gold pairs, whose better answer is known: a JSONL of ``prompt``, ``response_a``,
    ``response_b`` and ``better`` (``a`` or ``b``)."""
    gold = {}
    for n, (item, row) in enumerate(zip(read_items(path), _rows(Path(path))), start=1):
        better = row.get("better")
        if better not in ("a", "b"):
            raise DataError(f"{path}, pair {n}: 'better' must be 'a' or 'b', got {better!r}.")
        gold[item] = better
    return gold


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(path) if line.strip()]


@dataclass
class LabelStore:
    """Items to label and the judgement file, shared by every labeller of one server.

    Each item is served until ``judgements_per_pair`` different labellers have judged it: never
    twice to the same labeller, and never to more people at once than the judgements it still
    needs. An item handed to a labeller stays theirs for ``lease_s`` seconds after their last
    request, then goes back to the pool. Between regular items a labeller is sometimes shown a
    gold item (``gold``: item -> its better answer, ``a`` or ``b``; at ``gold_rate``) or one of
    their own judged items again (a repeat, at ``repeat_rate``): quality control, recorded with
    ``gold`` or ``repeat`` and left out of the verdicts. Which one comes next is seeded by the
    labeller's name and count, so a reload shows the same item. Every operation holds one lock.
    """

    items: list[Item]
    out: Path
    seed: int = 0
    lease_s: float = 600.0
    judgements_per_pair: int = 1
    gold: dict[Item, str] = field(default_factory=dict)
    gold_rate: float = 0.0
    repeat_rate: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _held: dict[str, tuple[str, float, str]] = field(
        default_factory=dict, repr=False
    )  # labeller -> (item, since, kind)
    _active: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # judgement id -> record
    _undo: dict[str, list[str]] = field(default_factory=dict, repr=False)  # labeller -> judgement ids

    def __post_init__(self) -> None:
        if self.judgements_per_pair < 1:
            raise DataError(f"--judgements_per_pair must be at least 1, got {self.judgements_per_pair}.")
        if not (0 <= self.gold_rate < 1 and 0 <= self.repeat_rate < 1 and self.gold_rate + self.repeat_rate < 1):
            raise DataError("--gold_rate and --repeat_rate must be shares in [0, 1) that add up to less than 1.")
        self.out = Path(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.by_id = {item.id: item for item in self.items}
        self.gold_ids = {item.id: better for item, better in self.gold.items()}
        if overlap := set(self.gold_ids) & set(self.by_id):
            raise DataError(f"{len(overlap)} gold pair(s) are also pairs to label; a gold pair must be one of its own.")
        self.by_id.update({item.id: item for item in self.gold})
        self._active = {r["id"]: r for r in active(read_records(self.out))}  # resume

    # -- what the page asks --------------------------------------------------------------------
    def progress(self) -> tuple[int, int]:
        """Judgements of regular items made (at most ``judgements_per_pair`` each), and needed."""
        with self._lock:
            return self._done(), len(self.items) * self.judgements_per_pair

    def state(self, labeller: str) -> dict[str, Any]:
        """The labeller's current item (given them now if they hold none) and the progress."""
        with self._lock:
            return self._state(labeller, self._assign(labeller))

    def judge(
        self, labeller: str, item_id: str, choice: str, note: str = "", criteria: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Record ``choice`` (and the optional per-criterion ``criteria`` grades) for ``item_id``
        and move the labeller on to their next item."""
        if not isinstance(choice, str) or choice not in CHOICES:
            raise LabelError(f"Unknown choice '{choice}'; use one of {', '.join(CHOICES)}.", 400)
        if not isinstance(note, str) or len(note) > 10_000:
            raise LabelError("The note must be text of at most 10,000 characters.", 400)
        criteria = criteria or {}
        if not isinstance(criteria, dict) or any(
            not isinstance(k, str) or len(k) > 200 or not isinstance(v, str) or v not in GRADES
            for k, v in criteria.items()
        ):
            raise LabelError(f"Criteria must map each criterion's name to one of {', '.join(GRADES)}.", 400)
        with self._lock:
            item = self.by_id.get(item_id)
            if item is None:
                raise LabelError(f"No item '{item_id}'.", 404)
            kind = self._kind_for(labeller, item_id)
            record = self._judgement(item, choice, note, labeller)
            record["criteria"] = criteria
            if kind == "gold":
                record["gold"] = self.gold_ids[item_id]
            elif kind == "repeat":
                record["repeat"] = True
            self._append(record)
            self._active[record["id"]] = record
            self._held.pop(labeller, None)
            self._undo.setdefault(labeller, []).append(record["id"])
            return self._state(labeller, self._assign(labeller))

    def undo(self, labeller: str) -> dict[str, Any]:
        """Retract the labeller's last judgement and give them that item again."""
        with self._lock:
            stack = self._undo.get(labeller, [])
            while stack:
                judgement = self._active.pop(stack.pop(), None)
                if judgement is None:
                    continue
                self._append(self._retraction(judgement, labeller))
                kind = "gold" if judgement.get("gold") else "repeat" if judgement.get("repeat") else "pair"
                self._held[labeller] = (judgement["item"], time.monotonic(), kind)
                return self._state(labeller, self.by_id[judgement["item"]])
            raise LabelError("Nothing to undo.")

    def records(self) -> list[dict[str, Any]]:
        """The judgement file's records (for the agreement report)."""
        with self._lock:
            return read_records(self.out)

    # -- inside the lock -----------------------------------------------------------------------
    def _votes(self) -> dict[str, list[str]]:
        """Each regular item's labellers so far (active judgements, not gold or repeats)."""
        votes: dict[str, list[str]] = {}
        for record in self._active.values():
            if not record.get("gold") and not record.get("repeat"):
                votes.setdefault(record["item"], []).append(record["labeller"])
        return votes

    def _done(self) -> int:
        k = self.judgements_per_pair
        return sum(min(k, len(who)) for item, who in self._votes().items() if item in self.by_id)

    def _holders(self, item_id: str, besides: str) -> int:
        """Labellers other than ``besides`` holding ``item_id`` as a regular item, lease unexpired."""
        now = time.monotonic()
        return sum(
            held == item_id and kind == "pair" and who != besides and now - since <= self.lease_s
            for who, (held, since, kind) in self._held.items()
        )

    def _open(self, item_id: str, labeller: str, votes: dict[str, list[str]]) -> bool:
        """Whether ``labeller`` may take ``item_id`` as a regular item now."""
        who = votes.get(item_id, [])
        return labeller not in who and len(who) + self._holders(item_id, labeller) < self.judgements_per_pair

    def _kind_for(self, labeller: str, item_id: str) -> str:
        """``pair``, ``gold`` or ``repeat``: what judging ``item_id`` now is for ``labeller``, or a
        LabelError saying why they may not."""
        held = self._held.get(labeller)
        if held is not None and held[0] == item_id and held[2] != "pair":
            return held[2]
        if item_id in self.gold_ids:
            raise LabelError("This gold pair is not yours to judge now.")
        votes = self._votes()
        if len(votes.get(item_id, [])) >= self.judgements_per_pair:
            raise LabelError("This item is already judged.")
        if labeller in votes.get(item_id, []):
            raise LabelError("You have judged this pair already.")
        if not self._open(item_id, labeller, votes):
            raise LabelError("This item is being judged by someone else.")
        return "pair"

    def _assign(self, labeller: str) -> Item | None:
        now = time.monotonic()
        votes = self._votes()
        held = self._held.get(labeller)
        if held is not None:
            item_id, _, kind = held
            if kind != "pair" or self._open(item_id, labeller, votes):
                self._held[labeller] = (item_id, now, kind)
                return self.by_id[item_id]
        regular = next((item for item in self.items if self._open(item.id, labeller, votes)), None)
        if regular is None:
            self._held.pop(labeller, None)
            return None  # nothing left for this labeller: no quality-control items alone either
        item, kind = self._check_item(labeller) or (regular, "pair")
        self._held[labeller] = (item.id, now, kind)
        return item

    def _check_item(self, labeller: str) -> tuple[Item, str] | None:
        """A gold or repeat item to show ``labeller`` next, drawn by their name and count; or None."""
        mine = [r for r in self._active.values() if r["labeller"] == labeller]
        draw = random.Random(f"{self.seed}:{labeller}:{len(mine)}").random()
        if draw < self.gold_rate:
            seen = {r["item"] for r in mine if r.get("gold")}
            unseen = [item for item in self.gold if item.id not in seen]
            return (
                (random.Random(f"{self.seed}:{labeller}:gold:{len(seen)}").choice(unseen), "gold") if unseen else None
            )
        if draw < self.gold_rate + self.repeat_rate:
            repeated = {r["item"] for r in mine if r.get("repeat")}
            judged = list(dict.fromkeys(r["item"] for r in mine if not r.get("gold") and not r.get("repeat")))
            candidates = [i for i in judged if i not in repeated and i in self.by_id]  # the pairs may have changed
            if candidates:
                pick = random.Random(f"{self.seed}:{labeller}:repeat:{len(repeated)}").choice(candidates)
                return self.by_id[pick], "repeat"
        return None

    def _state(self, labeller: str, item: Item | None) -> dict[str, Any]:
        shown = None
        if item is not None:
            a, b = self.on_screen(item)
            shown = {"id": item.id, "prompt": item.prompt, "a": a, "b": b}
        mine = sum(r["labeller"] == labeller for r in self._active.values())
        total = len(self.items) * self.judgements_per_pair
        return {"item": shown, "done": self._done(), "total": total, "mine": mine, "labeller": labeller}

    def order(self, item: Item) -> str:
        """``ab`` or ``ba``: which answer the page shows as A, random per item and fixed by ``seed``."""
        return "ab" if random.Random(f"{self.seed}:{item.id}").random() < 0.5 else "ba"

    def on_screen(self, item: Item) -> tuple[str, str]:
        """The answers shown as A and B."""
        return (item.response_a, item.response_b) if self.order(item) == "ab" else (item.response_b, item.response_a)

    def _judgement(self, item: Item, choice: str, note: str, labeller: str) -> dict[str, Any]:
        shown = self.order(item)
        a, b = self.on_screen(item)
        side, strength = CHOICES[choice]
        chosen, rejected = {"A": (a, b), "B": (b, a), None: (None, None)}[side]
        return {
            "type": "judgement",
            "id": uuid.uuid4().hex,
            "item": item.id,
            "prompt": item.prompt,
            "response_a": item.response_a,
            "response_b": item.response_b,
            "shown": shown,
            "choice": choice,
            "chosen": chosen,
            "rejected": rejected,
            "strength": strength,
            "note": note,
            "labeller": labeller,
            "timestamp": _now(),
        }

    def _retraction(self, judgement: dict[str, Any], labeller: str) -> dict[str, Any]:
        return {
            "type": "retraction",
            "id": uuid.uuid4().hex,
            "retracts": judgement["id"],
            "item": judgement["item"],
            "labeller": labeller,
            "timestamp": _now(),
        }

    def _append(self, record: dict[str, Any]) -> None:
        """One line, flushed and fsynced before the page is answered."""
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _lines(path: Path) -> list[str]:
    """The file's lines, cut at newlines only: ``str.splitlines`` also cuts at U+2028, U+0085 and
    other separators, which model output may hold inside a JSON string."""
    text = path.read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
