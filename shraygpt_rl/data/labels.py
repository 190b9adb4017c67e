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
    retracted = {r["retracts"] for r in records if r.get("type") == "retraction"}
    return {r["id"]: r for r in records if r.get("type") == "judgement" and r["id"] not in retracted}


def is_judgement_file(row: dict[str, Any]) -> bool:
    return row.get("type") in ("judgement", "retraction")


def load_judgements(path: str | Path) -> datasets.Dataset:
    """Preference pairs (``prompt``, ``chosen_response``, ``rejected_response``, ``strength``) from
    a judgement file: its active judgements that prefer one answer (no ties, skips or retractions).
    The prompt is the text the labeller saw, as the model was prompted with it."""
    pairs = [r for r in active_judgements(read_records(path)).values() if r["chosen"] is not None]
    if not pairs:
        raise DataError(f"{path} holds no judgement that prefers one answer (ties and skips are left out).")
    return datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in pairs],
            "chosen_response": [r["chosen"] for r in pairs],
            "rejected_response": [r["rejected"] for r in pairs],
            "strength": [float(r["strength"]) for r in pairs],
        }
    )


@dataclass
class LabelStore:
    """Items to label and the judgement file, shared by every labeller of one server.

    Every operation holds one lock, so concurrent labellers never get the same item at once and
    a judgement is written exactly once. An item handed to a labeller stays theirs for
    ``lease_s`` seconds after their last request, then goes back to the pool.
    """

    items: list[Item]
    out: Path
    seed: int = 0
    lease_s: float = 600.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _held: dict[str, tuple[str, float]] = field(default_factory=dict, repr=False)  # item -> (labeller, since)
    _judged: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # item -> its judgement
    _undo: dict[str, list[str]] = field(default_factory=dict, repr=False)  # labeller -> judgement ids

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.by_id = {item.id: item for item in self.items}
        for judgement in active_judgements(read_records(self.out)).values():  # resume
            self._judged[judgement["item"]] = judgement

    # -- what the page asks --------------------------------------------------------------------
    def progress(self) -> tuple[int, int]:
        """Items judged, and items in all."""
        with self._lock:
            return len(self._judged), len(self.items)

    def state(self, labeller: str) -> dict[str, Any]:
        """The labeller's current item (given them now if they hold none) and the progress."""
        with self._lock:
            item = self._assign(labeller)
            return self._state(item)

    def judge(self, labeller: str, item_id: str, choice: str, note: str = "") -> dict[str, Any]:
        """Record ``choice`` for ``item_id`` and move the labeller on to their next item."""
        if choice not in CHOICES:
            raise LabelError(f"Unknown choice '{choice}'; use one of {', '.join(CHOICES)}.", 400)
        if not isinstance(note, str) or len(note) > 10_000:
            raise LabelError("The note must be text of at most 10,000 characters.", 400)
        with self._lock:
            item = self.by_id.get(item_id)
            if item is None:
                raise LabelError(f"No item '{item_id}'.", 404)
            if item_id in self._judged:
                raise LabelError("This item is already judged.")
            holder = self._holder(item_id)
            if holder is not None and holder != labeller:
                raise LabelError("This item is being judged by someone else.")
            record = self._judgement(item, choice, note, labeller)
            self._append(record)
            self._judged[item_id] = record
            self._held.pop(item_id, None)
            self._undo.setdefault(labeller, []).append(record["id"])
            return self._state(self._assign(labeller))

    def undo(self, labeller: str) -> dict[str, Any]:
        """Retract the labeller's last judgement and give them that item again."""
        with self._lock:
            stack = self._undo.get(labeller, [])
            while stack:
                judgement_id = stack.pop()
                item_id = next((i for i, r in self._judged.items() if r["id"] == judgement_id), None)
                if item_id is None:
                    continue
                self._append(self._retraction(self._judged.pop(item_id), labeller))
                for held, (who, _) in list(self._held.items()):
                    if who == labeller:
                        del self._held[held]  # the item they were shown goes back to the pool
                self._held[item_id] = (labeller, time.monotonic())
                return self._state(self.by_id[item_id])
            raise LabelError("Nothing to undo.")

    # -- inside the lock -----------------------------------------------------------------------
    def _holder(self, item_id: str) -> str | None:
        held = self._held.get(item_id)
        if held is None or time.monotonic() - held[1] > self.lease_s:
            return None
        return held[0]

    def _assign(self, labeller: str) -> Item | None:
        now = time.monotonic()
        for item_id, (who, _) in self._held.items():
            if who == labeller and item_id not in self._judged:
                self._held[item_id] = (labeller, now)
                return self.by_id[item_id]
        for item in self.items:
            if item.id not in self._judged and self._holder(item.id) is None:
                self._held[item.id] = (labeller, now)
                return item
        return None

    def _state(self, item: Item | None) -> dict[str, Any]:
        shown = None
        if item is not None:
            a, b = self.on_screen(item)
            shown = {"id": item.id, "prompt": item.prompt, "a": a, "b": b}
        return {"item": shown, "done": len(self._judged), "total": len(self.items)}

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
