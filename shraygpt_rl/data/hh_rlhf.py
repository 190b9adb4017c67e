"""Anthropic HH-RLHF preference pairs, from the hub or from local ``.jsonl``/``.jsonl.gz`` files.

Each raw row is ``{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": "…"}``. Parsing follows
the course: split both transcripts into Human/Assistant turns; the prompt is the turns they share
(a conversation of user and assistant messages, which the DataModule's chat format renders: the
course's by default, ending with an open ``Assistant:`` turn); each response is the first
assistant reply after the shared turns.

Output columns: ``prompt`` (the messages), ``chosen_response`` and ``rejected_response``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import zlib
from pathlib import Path

import datasets

from shraygpt_rl.errors import DataError

log = logging.getLogger(__name__)

HUB_NAME = "Anthropic/hh-rlhf"
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_COLUMNS = ("prompt", "chosen_response", "rejected_response")


# datasets keys its map cache on the mapped function's own code, not on the helpers it calls, so
# the hash of this file keys it too: editing the parser invalidates cached results.
_PARSER_VERSION = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:16]


class InvalidPairError(ValueError):
    """One preference pair that cannot be parsed."""


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def parse_transcript(text: str) -> list[tuple[str, str]]:
    """Split ``\\n\\nHuman: …\\n\\nAssistant: …`` into ``[(role, content), …]`` with chat roles."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise InvalidPairError("text comes before the first Human:/Assistant: turn")
    roles = ["user" if role == "Human" else "assistant" for role in parts[1::2]]
    return [(role, content.strip()) for role, content in zip(roles, parts[2::2])]


def split_pair(chosen, rejected) -> dict:
    """Turn one raw pair into the output columns, or raise ``InvalidPairError`` saying why not."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if text is None:
            raise InvalidPairError(f"'{name}' is missing")
        if not isinstance(text, str):
            raise InvalidPairError(f"'{name}' is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InvalidPairError(f"'{name}' is empty")
    if chosen == rejected:
        raise InvalidPairError("chosen and rejected are identical")
    turns = {"chosen": parse_transcript(chosen), "rejected": parse_transcript(rejected)}
    shared = 0
    while shared < min(map(len, turns.values())) and turns["chosen"][shared] == turns["rejected"][shared]:
        shared += 1
    responses = {}
    for name, transcript in turns.items():
        rest = transcript[shared:]
        if not any(role == "assistant" for role, _ in transcript):
            raise InvalidPairError(f"the {name} transcript has no Assistant turn")
        if not rest or rest[0][0] != "assistant":
            raise InvalidPairError(f"the {name} transcript has no Assistant reply after the turns both share")
        responses[name] = rest[0][1]
    if not any(role == "user" for role, _ in turns["chosen"][:shared]):
        raise InvalidPairError("chosen and rejected share no Human turn to use as the prompt")
    if responses["chosen"] == responses["rejected"]:
        raise InvalidPairError("the chosen and rejected responses are identical")
    return {
        "prompt": [{"role": role, "content": content} for role, content in turns["chosen"][:shared]],
        "chosen_response": responses["chosen"],
        "rejected_response": responses["rejected"],
    }


# What an invalid row maps to (then dropped): the valid rows' types, so that every batch of the map agrees.
_INVALID = {"prompt": [{"role": "user", "content": ""}], "chosen_response": "", "rejected_response": ""}


def _parse_row(row: dict, parser_version: str) -> dict:
    """``datasets.map`` body; ``parser_version`` only keys the cache (see ``_PARSER_VERSION``)."""
    try:
        return {**split_pair(row.get("chosen"), row.get("rejected")), "error": ""}
    except InvalidPairError as err:
        return {**_INVALID, "error": str(err)}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_preferences(
    source: str | Path = HUB_NAME,
    split: str = "train",
    data_dir: str | None = None,
    skip_invalid: bool = False,
) -> datasets.Dataset:
    """Load HH-RLHF pairs as a ``datasets.Dataset`` with the columns above.

    Args:
        source: ``"Anthropic/hh-rlhf"`` (the hub, needs a network), a local ``.jsonl``/``.jsonl.gz``
            file, or a directory of them.
        split: The hub split (``train`` or ``test``). In a directory, files whose name starts with
            ``<split>.`` are used if there are any, else every file.
        data_dir: A subset such as ``harmless-base``: the hub's ``data_dir``, or a subfolder of a
            local directory (ignored for a file, or for a folder of that name).
        skip_invalid: Drop invalid rows (and log how many) instead of stopping at the first one.

    Raises:
        DataError: With one sentence naming the file, the line and the problem.
    """
    if is_local_source(source):
        files = _data_files(Path(source), split, data_dir)
        parts = [_load_file(f, skip_invalid) for f in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    try:
        raw = datasets.load_dataset(str(source), data_dir=data_dir, split=split)
    except Exception as err:  # offline, unknown name, unknown split, ...
        raise DataError(
            f"Could not load '{source}' from the Hugging Face hub ({type(err).__name__}); if this machine is "
            "offline, pass a local .jsonl or .jsonl.gz file or directory as the source."
        ) from err
    return _validate(raw, f"{source}[{split}]", None, skip_invalid)


def is_local_source(source: str | Path) -> bool:
    """A path (existing, or written like one) rather than a hub name such as ``org/name``."""
    text = str(source)
    if Path(text).exists() or text.endswith((".jsonl", ".jsonl.gz", ".json", ".gz")):
        return True
    return text.startswith((".", "/", "~")) or text.count("/") != 1


def _data_files(source: Path, split: str, data_dir: str | None) -> list[Path]:
    """The files to read: ``source`` itself, or its ``data_dir`` subfolder (a file is one subset
    already, and a folder named ``data_dir`` is that subset)."""
    source = source.expanduser()
    if data_dir and source.is_dir() and source.name != data_dir:
        if not (source / data_dir).is_dir():
            raise DataError(f"'{source}' has no '{data_dir}' subfolder; pass the subset's folder or set data_dir.")
        source = source / data_dir
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"No such file or directory: '{source}'.")
    files = sorted(p for p in source.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise DataError(f"'{source}' holds no .jsonl or .jsonl.gz files.")
    return [p for p in files if p.name.startswith(f"{split}.")] or files


def _load_file(path: Path, skip_invalid: bool) -> datasets.Dataset:
    try:
        raw = datasets.load_dataset("json", data_files=str(path), split="train")
        if len(raw) == 0:
            raise DataError(f"{path} holds no preference pairs: it is empty.")
        return _validate(raw, str(path), path, skip_invalid)
    except DataError:
        raise
    except Exception as err:  # malformed JSON, bytes that are not UTF-8, mixed types, a cut-off gzip: find the line
        good, bad = _scan_lines(path)
        if not good and not bad:
            raise DataError(f"{path} holds no preference pairs: it is empty.") from err
        if bad and not skip_invalid:
            line, reason = bad[0]
            raise DataError(f"{path}, line {line}: {reason}.") from err
        if bad:
            log.warning("%s: skipped %d unreadable lines (first: line %d, %s)", path, len(bad), *bad[0])
    rows = [{"chosen": _text(r, "chosen"), "rejected": _text(r, "rejected"), "line": n} for n, r in good]
    return _validate(datasets.Dataset.from_list(rows), str(path), path, skip_invalid)


def _text(row: dict, key: str):
    """A field as it is if it is a string (or absent), else its JSON text, which validation refuses."""
    value = row.get(key)
    return value if value is None or isinstance(value, str) else json.dumps(value)


def _validate(raw: datasets.Dataset, name: str, path: Path | None, skip_invalid: bool):
    for column in ("chosen", "rejected"):
        if column not in raw.column_names:
            raw = raw.add_column(column, [None] * len(raw))
    parsed = raw.map(
        _parse_row,
        fn_kwargs={"parser_version": _PARSER_VERSION},
        remove_columns=raw.column_names,
        desc=f"Parsing {Path(name).name}",
    )
    errors = parsed["error"] if len(parsed) else []
    bad = [i for i, e in enumerate(errors) if e]
    if bad and not skip_invalid:
        line = raw["line"][bad[0]] if "line" in raw.column_names else path and _line_of_row(path, bad[0])
        where = f"{path}, line {line}" if path else f"{name}, row {bad[0]}"
        raise DataError(f"{where}: {errors[bad[0]]}.")
    if len(bad) == len(errors):
        first = f" (the first: {errors[bad[0]]})" if bad else ""
        raise DataError(f"{name} holds no valid preference pairs{first}.")
    if bad:
        log.warning("%s: skipped %d invalid rows of %d (first: %s)", name, len(bad), len(errors), errors[bad[0]])
        parsed = parsed.select([i for i, e in enumerate(errors) if not e])
    return parsed.select_columns(list(_COLUMNS))


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _scan_lines(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Read ``path`` line by line: ``(line, object)`` for good lines, ``(line, reason)`` for bad ones."""
    good, bad = [], []
    number = 0
    try:
        for number, raw in enumerate(_lines(path), start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append((number, "the line is not valid UTF-8"))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                bad.append((number, f"malformed JSON ({err.msg})"))
                continue
            if not isinstance(row, dict):
                bad.append((number, f"expected a JSON object, found a {type(row).__name__}"))
                continue
            good.append((number, row))
    except (EOFError, OSError, zlib.error):  # a truncated or corrupt .gz: keep what came before
        bad.append((number + 1, "the compressed file ends early or is corrupt (a cut-off download?)"))
    return good, bad


def _lines(path: Path):
    with _open_bytes(path) as f:
        yield from f


def _line_of_row(path: Path, row: int) -> int:
    """The line number of the ``row``-th non-blank line (the JSON loader skips blank lines)."""
    seen = -1
    with _open_bytes(path) as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return number
    return row + 1
