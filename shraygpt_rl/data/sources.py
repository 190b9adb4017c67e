"""What a source holds, and the sources in formats of their own: Dolly, plain prompts.

* **Instructions** (SFT demonstrations): Dolly-15k (``databricks/databricks-dolly-15k`` from the
  hub, or a local JSONL with its columns ``instruction``, ``context``, ``response``,
  ``category``), as seed 004 formats it: a user turn of the instruction, with the ``context``
  after it when there is one (``User: {instruction}\\n\\nAssistant: {response}`` in the course's
  format), and the response.
* **Prompts** for the online stages: ``stories`` (built-in story openings, seed 001's task) or a
  text file of one prompt per line. Plain prompts are used as they are, without the chat format:
  the model continues the text.
* Everything else in TRL's formats (``text``, ``messages``, ``prompt``/``completion``, preference
  and unpaired rows, local or from the hub): ``data/formats.py``. HH-RLHF: ``data/hh_rlhf.py``.

Bad input gets one sentence naming the file and line, unless ``skip_invalid`` drops those rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import datasets

from shraygpt_rl.data.formats import (
    KIND_OF_TYPE,
    convert,
    dataset_type,
    json_rows,
    load_rows,
    read_rows,
    report_bad,
)
from shraygpt_rl.data.hh_rlhf import HUB_NAME, _scan_lines, load_preferences
from shraygpt_rl.data.labels import is_judgement_file, load_judgements
from shraygpt_rl.errors import DataError

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


def instruction_prompt(instruction: str, context: str | None = None) -> list[dict[str, str]]:
    """Seed 004's user turn: the instruction, then the context after a blank line when there is one."""
    user = instruction.strip()
    if context and context.strip():
        user += "\n\n" + context.strip()
    return [{"role": "user", "content": user}]


def open_source(
    source: str,
    reads: str,
    skip_invalid: bool = False,
    data_dir: str | None = None,
    columns: dict[str, str] | None = None,
    subset: str | None = None,
) -> tuple[str, str | None, Callable[..., datasets.Dataset]]:
    """What a (non-task) source holds and how to read it: ``(kind, TRL type or None, load)``,
    ``load(split="train")`` giving its rows as a DataModule that ``reads`` them takes them
    (``formats.to_row``'s kinds). The kind is known before anything is converted, so that a
    DataModule refuses a source it cannot use in one sentence first."""
    kind, reader = describe(source, columns)
    if reader == "labels":  # the labelling page's judgements: preference pairs with a strength
        return "preferences", None, lambda split="train": load_judgements(source)
    if reader == "hh":
        return kind, None, functools.partial(load_preferences, source, data_dir=data_dir, skip_invalid=skip_invalid)
    if reader == "dolly":
        return kind, None, lambda split="train": load_instructions(source, skip_invalid)
    if reader == "text":
        return kind, None, lambda split="train": load_prompts(source, skip_invalid)
    rows = load_rows(source, skip_invalid=skip_invalid, subset=subset)
    rows = [(line, {(columns or {}).get(k, k): v for k, v in row.items()}) for line, row in rows]
    if not rows:
        raise DataError(f"{source} holds no rows.")
    try:
        trl_type = dataset_type(rows[0][1])
    except DataError as err:
        raise DataError(f"{source}, line {rows[0][0]}: {err}.") from None
    return KIND_OF_TYPE[trl_type], trl_type, lambda split="train": convert(rows, reads, source, skip_invalid)


def describe(source: str, columns: dict[str, str] | None = None) -> tuple[str | None, str]:
    """``(kind, reader)`` of a (non-task) source. The kind is what it holds: ``instructions``,
    ``prompts``, ``preferences``, ``labels`` (the labelling page's judgements, preference pairs
    too) or ``unpaired`` (KTO's labelled completions); None for a hub dataset in TRL's formats,
    known once read. The reader is ``hh`` (HH-RLHF), ``dolly``, ``text`` (story openings, a
    ``.txt`` of prompts), ``labels`` or ``trl`` (``data/formats.py``). ``columns`` renames the
    first row's columns before it is read (``--data.columns``: an ``instruction`` column renamed
    is not Dolly's)."""
    if source == STORIES:
        return "prompts", "text"
    if source == DOLLY:
        return "instructions", "dolly"
    if source == HUB_NAME:
        return "preferences", "hh"
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        return "prompts", "text"
    if path.is_dir() or path.name.endswith(".gz"):
        return "preferences", "hh"
    if not path.is_file():
        if path.suffix in (".jsonl", ".json", ".parquet") or source.count("/") != 1:
            return "preferences", "hh"  # a missing local file: the HH reader names it
        return None, "trl"  # a hub dataset, read through datasets
    if path.suffix == ".parquet":
        return None, "trl"
    for _, row in _first_row(path):
        row = {(columns or {}).get(k, k): v for k, v in row.items()}
        if is_judgement_file(row):
            return "labels", "labels"
        if "instruction" in row:
            return "instructions", "dolly"
        if "prompt" not in row and any(_is_transcript(row.get(k)) for k in ("chosen", "rejected")):
            return "preferences", "hh"
        try:
            return KIND_OF_TYPE[dataset_type(row)], "trl"
        except DataError:
            return None, "trl"  # known once --data.columns has renamed the columns (``open_source``)
    return "preferences", "hh"  # no readable row: the HH reader says why


def _is_transcript(value) -> bool:
    """HH-RLHF's text: ``\\n\\nHuman: …\\n\\nAssistant: …``."""
    return isinstance(value, str) and value.lstrip().startswith(("Human:", "Assistant:"))


def _first_row(path: Path) -> list[tuple[int, dict]]:
    """The first readable row of a JSONL file, or of a ``.json`` file holding a list of rows (or
    JSON lines: ``datasets`` reads those too)."""
    if path.suffix == ".json":
        try:
            return json_rows(path)[0][:1]
        except DataError:
            pass
    return _scan_lines(path)[0][:1]


def load_instructions(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """Dolly's demonstrations: ``prompt`` (a user turn), ``response`` and ``category``."""
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
        rows = read_rows(Path(source).expanduser(), skip_invalid)
    out, bad = [], []
    for line, row in rows:
        try:
            out.append(_demonstration(row))
        except ValueError as err:
            bad.append((line, str(err)))
    return _finish(out, bad, source, skip_invalid, "demonstrations")


def _demonstration(row: dict) -> dict:
    instruction, response = _field(row, "instruction"), _field(row, "response")
    context = row.get("context") or ""
    if not isinstance(context, str):
        raise ValueError("'context' must be a string")
    return {
        "prompt": instruction_prompt(instruction, context),
        "response": response,
        "category": str(row.get("category") or ""),
    }


def load_prompts(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """Prompts (column ``prompt``) used as they are: the built-in story openings, or a text file
    of one prompt per line."""
    if source == STORIES:
        return datasets.Dataset.from_dict({"prompt": list(STORY_OPENINGS)})
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"No such file: '{path}'.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return _finish([{"prompt": line} for line in lines if line], [], source, skip_invalid, "prompts")


def _field(row: dict, key: str, strip: bool = True) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is missing or not a non-empty string")
    return value.strip() if strip else value


def _finish(rows: list[dict], bad: list, source: str, skip_invalid: bool, what: str) -> datasets.Dataset:
    report_bad(bad, source, skip_invalid)
    if not rows:
        raise DataError(f"{source} holds no {what}.")
    return datasets.Dataset.from_list(rows)
