"""Instruction data and plain prompts, besides HH-RLHF and the built-in tasks.

* **Instructions** (SFT demonstrations): Dolly-15k (``databricks/databricks-dolly-15k`` from the
  hub, or a local JSONL with its columns ``instruction``, ``context``, ``response``,
  ``category``), formatted as seed 004 does: ``User: {instruction}\\n\\nAssistant: {response}``,
  with the ``context`` put into the user turn after the instruction when there is one. Any local
  JSONL with ``prompt``/``completion`` works too (the prompt used as it is).
* **Prompts** for the online stages: ``stories`` (built-in story openings, seed 001's task), a
  text file of one prompt per line, or a JSONL with a ``prompt`` field. Plain prompts are used as
  they are, without the chat format: the model continues the text.
* **Unpaired** examples for KTO: a JSONL (or ``.json`` list) of ``prompt``, ``completion`` and a
  boolean ``label`` (``data/unpaired.py``).

Bad input gets one sentence naming the file and line, unless ``skip_invalid`` drops those rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from shraygpt_rl.data.hh_rlhf import _scan_lines
from shraygpt_rl.data.labels import is_judgement_file
from shraygpt_rl.errors import DataError
from shraygpt_rl.tokenizer import format_prompt

log = logging.getLogger(__name__)

DOLLY = "databricks/databricks-dolly-15k"
STORIES = "stories"
# Openings in the style of TinyStories, for seed 001's animal-stories task.
STORY_OPENINGS = (
    "Once upon a time",
    "Once upon a time, in a big forest,",
    "One day, a little girl named Lily",
    "There was once a small house near the river.",
    "Tom and his mom went to the park.",
    "In a quiet village, there lived",
    "It was a sunny day and",
    "Ben had a red ball.",
    "Once upon a time, there was a tiny",
    "Mia looked out of the window and saw",
    "The wind was blowing hard when",
    "Long ago, on a farm,",
    "A little boy named Sam",
    "Under the big tree, there was",
    "Every morning, Anna walked to",
    "The sky was dark and the rain fell.",
    "Once there was a happy",
    "In the garden behind the house,",
    "Max found a box in the attic.",
    "It was the first day of spring, and",
    "Near the sea, a family",
    "Sara wanted to play, but",
    "One night, the moon was very bright.",
    "At the zoo, the children",
)


def instruction_prompt(instruction: str, context: str | None = None, system_prompt: str | None = None) -> str:
    """Seed 004's user turn: the instruction, then the context after a blank line when there is one."""
    user = instruction.strip()
    if context and context.strip():
        user += "\n\n" + context.strip()
    return format_prompt(user, system_prompt)


def kind_of(source: str) -> str:
    """``instructions``, ``prompts``, ``preferences``, ``labels`` (the labelling page's judgement
    file, preference pairs too) or ``unpaired`` (KTO's labelled completions): what a (non-task)
    source holds."""
    if source == STORIES:
        return "prompts"
    if source == DOLLY:
        return "instructions"
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        return "prompts"
    if path.is_file():
        for _, row in _first_row(path):
            if is_judgement_file(row):
                return "labels"
            if "label" in row and "completion" in row:
                return "unpaired"
            if "instruction" in row or "completion" in row:
                return "instructions"
            if "prompt" in row and "chosen" not in row:
                return "prompts"
    return "preferences"


def _first_row(path: Path) -> list[tuple[int, dict]]:
    """The first readable row of a JSONL file, or of a ``.json`` file holding a list of rows."""
    if path.suffix != ".json":
        return _scan_lines(path)[0][:1]
    try:
        return _json_rows(path)[0][:1]
    except DataError:
        return []


def load_instructions(source: str, skip_invalid: bool = False, system_prompt: str | None = None) -> datasets.Dataset:
    """Demonstrations with columns ``prompt`` and ``response`` (and Dolly's ``category``)."""
    if source == DOLLY and not Path(source).exists():
        try:
            raw = datasets.load_dataset(DOLLY, split="train")
        except Exception as err:
            raise DataError(
                f"Could not load '{DOLLY}' from the Hugging Face hub ({type(err).__name__}); if this machine is "
                "offline, pass a local .jsonl with its columns (instruction, context, response, category)."
            ) from err
        rows = list(enumerate(raw, start=1))
    else:
        rows = _rows(Path(source).expanduser(), skip_invalid)
    out, bad = [], []
    for line, row in rows:
        try:
            out.append(_demonstration(row, system_prompt))
        except ValueError as err:
            bad.append((line, str(err)))
    return _finish(out, bad, source, skip_invalid, "demonstrations")


def _demonstration(row: dict, system_prompt: str | None) -> dict:
    if "instruction" in row:
        instruction, response = _field(row, "instruction"), _field(row, "response")
        context = row.get("context") or ""
        if not isinstance(context, str):
            raise ValueError("'context' must be a string")
        prompt = instruction_prompt(instruction, context, system_prompt)
        return {"prompt": prompt, "response": response, "category": str(row.get("category") or "")}
    return {"prompt": _field(row, "prompt", strip=False), "response": _field(row, "completion"), "category": ""}


def load_prompts(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """Prompts (column ``prompt``) used as they are: the built-in story openings, a text file of
    one prompt per line, or a JSONL with a ``prompt`` field (other fields become metadata)."""
    if source == STORIES:
        return datasets.Dataset.from_dict({"prompt": list(STORY_OPENINGS)})
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"No such file: '{path}'.")
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        return _finish([{"prompt": line} for line in lines if line], [], source, skip_invalid, "prompts")
    out, bad = [], []
    for line, row in _rows(path, skip_invalid):
        try:
            out.append({**row, "prompt": _field(row, "prompt", strip=False)})
        except ValueError as err:
            bad.append((line, str(err)))
    return _finish(out, bad, source, skip_invalid, "prompts")


def _rows(path: Path, skip_invalid: bool) -> list[tuple[int, dict]]:
    """``(line, row)`` of a JSONL file, or ``(place in the list, row)`` of a ``.json`` list."""
    if not path.is_file():
        raise DataError(f"No such file: '{path}'.")
    good, bad = _json_rows(path) if path.suffix == ".json" else _scan_lines(path)
    if bad and not skip_invalid:
        raise DataError(f"{path}, line {bad[0][0]}: {bad[0][1]}.")
    if bad:
        log.warning("%s: skipped %d unreadable lines (first: line %d, %s)", path, len(bad), *bad[0])
    return good


def _json_rows(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """``_scan_lines`` for a ``.json`` file holding one list of rows, numbered from 1 by place."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a JSON file ({type(err).__name__}).") from err
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a JSON list of rows, not a {type(rows).__name__}.")
    good, bad = [], []
    for n, row in enumerate(rows, start=1):
        if isinstance(row, dict):
            good.append((n, row))
        else:
            bad.append((n, f"expected a JSON object, found a {type(row).__name__}"))
    return good, bad


def _field(row: dict, key: str, strip: bool = True) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is missing or not a non-empty string")
    return value.strip() if strip else value


def _finish(rows: list[dict], bad: list, source: str, skip_invalid: bool, what: str) -> datasets.Dataset:
    if bad and not skip_invalid:
        raise DataError(f"{source}, line {bad[0][0]}: {bad[0][1]}.")
    if bad:
        log.warning("%s: skipped %d invalid rows (first: line %d, %s)", source, len(bad), *bad[0])
    if not rows:
        raise DataError(f"{source} holds no {what}.")
    return datasets.Dataset.from_list(rows)
