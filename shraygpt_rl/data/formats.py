"""TRL's dataset types, detected from the columns as TRL detects them, and turned into the rows
the DataModules read. Their tokens come from ``data/chat.py``; this module says what a row means.

=====================  ====================================================  =====================
type                   columns (standard: text; conversational: messages)   stages
=====================  ====================================================  =====================
language modelling     ``text``, or ``messages``                             SFT
prompt-only            ``prompt``                                            online stages
prompt-completion      ``prompt``, ``completion``                            SFT, online stages
preference             ``prompt``, ``chosen``, ``rejected``; or ``chosen``  reward model, DPO and
                       and ``rejected`` alone (the prompt implicit: their    its family, KTO (each
                       shared beginning)                                     pair split in two),
                                                                             online stages
unpaired preference    ``prompt``, ``completion``, ``label``                 KTO, online stages
=====================  ====================================================  =====================

A row is conversational when one of these columns holds a list of ``{"role", "content"}``
messages (TRL's ``is_conversational``). A conversational completion, chosen or rejected is one
assistant message; its content is the reply. Every other column rides along as metadata, which
the online stages hand to reward functions (an ``answer`` or ``solution`` column, say), as TRL
passes them. Local ``.jsonl``, ``.json`` and ``.parquet`` files and hub datasets (through
``datasets``) are read; a row that fits no type stops with one sentence naming its columns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from shraygpt_rl.data.hh_rlhf import _scan_lines
from shraygpt_rl.errors import DataError

log = logging.getLogger(__name__)

LANGUAGE_MODELLING, PROMPT_ONLY, PROMPT_COMPLETION = "language modelling", "prompt-only", "prompt-completion"
PREFERENCE, UNPAIRED = "preference", "unpaired preference"
TYPES = {
    LANGUAGE_MODELLING: "text or messages",
    PROMPT_ONLY: "prompt",
    PROMPT_COMPLETION: "prompt and completion",
    PREFERENCE: "prompt, chosen and rejected (or chosen and rejected alone)",
    UNPAIRED: "prompt, completion and label",
}
# What each kind of DataModule source takes (``ChatDataModule.kinds``), by TRL type.
KIND_OF_TYPE = {
    LANGUAGE_MODELLING: "instructions",
    PROMPT_COMPLETION: "instructions",
    PROMPT_ONLY: "prompts",
    PREFERENCE: "preferences",
    UNPAIRED: "unpaired",
}
_MESSAGE_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages")
_ROLES = ("system", "user", "assistant", "tool")


def dataset_type(row: dict[str, Any]) -> str:
    """The TRL type of a row, from its columns; one sentence naming them when it fits none."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return PREFERENCE
    if {"prompt", "completion", "label"} <= keys:
        return UNPAIRED
    if {"prompt", "completion"} <= keys:
        return PROMPT_COMPLETION
    if "prompt" in keys:
        return PROMPT_ONLY
    if "text" in keys or "messages" in keys:
        return LANGUAGE_MODELLING
    expected = "; ".join(f"{name} ({columns})" for name, columns in TYPES.items())
    raise DataError(f"a row with the columns {', '.join(sorted(keys)) or 'none'} fits none of TRL's types: {expected}")


def is_conversational(row: dict[str, Any]) -> bool:
    """Whether a message column of ``row`` holds a list of role/content messages (TRL's rule)."""
    for key in _MESSAGE_COLUMNS:
        value = row.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return "role" in value[0] and "content" in value[0]
    return False


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_rows(
    source: str, split: str = "train", skip_invalid: bool = False, subset: str | None = None
) -> list[tuple[int, dict]]:
    """``(line or row number, row)`` of a local ``.jsonl``/``.json``/``.parquet`` file, or of a
    hub dataset's ``split`` (``subset``: the dataset's configuration, such as GSM8K's ``main``)."""
    path = Path(source).expanduser()
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"No such file: '{path}'.")
        return list(enumerate(datasets.load_dataset("parquet", data_files=str(path), split="train"), start=1))
    if path.exists() or path.suffix in (".jsonl", ".json"):
        return read_rows(path, skip_invalid)

    try:
        data = datasets.load_dataset(source, subset, split=split)
    except Exception as err:  # offline, unknown name, unknown split
        raise DataError(
            f"Could not load '{source}' from the Hugging Face hub ({type(err).__name__}); if this machine is offline, "
            "pass a local .jsonl, .json or .parquet file."
        ) from err
    return list(enumerate(data, start=1))


def read_rows(path: Path, skip_invalid: bool) -> list[tuple[int, dict]]:
    """``(line, row)`` of a JSONL file, or ``(place in the list, row)`` of a ``.json`` list (a
    ``.json`` file of JSON lines is read as lines, as ``datasets`` reads it)."""
    if not path.is_file():
        raise DataError(f"No such file: '{path}'.")
    good, bad = _json_or_lines(path) if path.suffix == ".json" else _scan_lines(path)
    report_bad(bad, path, skip_invalid, "unreadable lines")
    return good


def report_bad(bad: list[tuple[int, str]], source, skip_invalid: bool, what: str = "invalid rows") -> None:
    """``(line, reason)`` of a source's bad rows: the first as one sentence, unless
    ``skip_invalid``, which logs how many are dropped instead."""
    if bad and not skip_invalid:
        raise DataError(f"{source}, line {bad[0][0]}: {bad[0][1]}.")
    if bad:
        log.warning("%s: skipped %d %s (first: line %d, %s)", source, len(bad), what, *bad[0])


def _json_or_lines(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    try:
        return json_rows(path)
    except DataError:
        lines = _scan_lines(path)
        if lines[0]:  # JSON lines after all
            return lines
        raise


def json_rows(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
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


def convert(rows: list[tuple[int, dict]], kind: str, source: str, skip_invalid: bool) -> datasets.Dataset:
    """Rows of one TRL type as the rows of ``kind`` (``instructions``, ``preferences``,
    ``unpaired`` or ``prompts``: see ``to_row``); bad rows stop with one sentence naming the source
    and line, unless ``skip_invalid`` drops them."""
    out, bad = [], []
    for line, row in rows:
        try:
            out.append(to_row(row, kind))
        except (DataError, ValueError) as err:
            bad.append((line, str(err)))
    report_bad(bad, source, skip_invalid)
    if not out:
        raise DataError(f"{source} holds no usable rows.")
    if len({_shape(r) for r in out}) > 1:
        raise DataError(f"{source} mixes rows of different types, or standard rows with conversational ones.")
    columns = list(dict.fromkeys(k for r in out for k in r))  # a metadata column some rows lack: None there
    try:
        return datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in out])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{source} has a column whose values are of different types ({err}).") from None


def _shape(row: dict) -> tuple:
    """What a row is: its type's columns, and whether its prompt (or messages) is a conversation."""
    if "prompt" not in row:  # language modelling
        return ("messages",) if "messages" in row else ("text",), is_conversational(row)
    core = tuple(k for k in ("response", "chosen_response", "completion", "label") if k in row)
    return core, is_conversational(row)


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------
def to_row(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """One TRL row as ``kind`` reads it:

    * ``instructions`` (SFT): ``prompt`` and ``response``; or, for language modelling, ``text``
      (standard) or ``messages`` (conversational);
    * ``preferences``: ``prompt``, ``chosen_response``, ``rejected_response``;
    * ``unpaired``: ``prompt``, ``completion``, ``label``; a preference pair gives two such rows
      (``unpaired.unpair`` splits them);
    * ``prompts``: ``prompt``.

    A prompt is text or a list of messages; a reply is text. Other columns are kept (metadata).
    """
    kind_type = dataset_type(row)
    extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "chosen", "rejected", "label")}
    if kind_type == PREFERENCE:
        prompt, chosen, rejected = _pair(row)
        if kind == "preferences":
            return {**extra, "prompt": prompt, "chosen_response": chosen, "rejected_response": rejected}
        if kind == "instructions":  # SFT on the chosen replies
            return {**extra, "prompt": prompt, "response": chosen}
        if kind == "prompts":
            return {**extra, "prompt": prompt}
        return {**extra, "prompt": prompt, "chosen_response": chosen, "rejected_response": rejected}
    if kind_type == LANGUAGE_MODELLING:
        if kind != "instructions":
            raise DataError(
                f"a language-modelling row (text or messages) has no prompt for the {kind} this stage needs"
            )
        if "messages" in row:
            return {
                **{k: v for k, v in extra.items() if k != "text"},
                "messages": _messages(row["messages"], "messages"),
            }
        return {**extra, "text": _text(row["text"], "text")}
    prompt = _prompt(row["prompt"])
    if kind == "prompts":
        return {**extra, "prompt": prompt}
    if kind_type == PROMPT_ONLY:
        raise DataError(f"a prompt-only row has no completion for the {kind} this stage needs")
    completion = _reply(row["completion"], "completion")
    if kind == "instructions":
        return {**extra, "prompt": prompt, "response": completion}
    if kind_type != UNPAIRED:
        raise DataError(f"a prompt-completion row has no label or rejected reply for the {kind} this stage needs")
    if not isinstance(row["label"], bool):  # 0/1 or "yes" would silently mean something else
        raise DataError("'label' is not true/false")
    if kind == "unpaired":
        return {**extra, "prompt": prompt, "completion": completion, "label": row["label"]}
    raise DataError(f"an unpaired row (prompt, completion, label) is not a pair for the {kind} this stage needs")


def _pair(row: dict) -> tuple[Any, str, str]:
    """A preference row's prompt and its two replies; an implicit prompt is the conversations'
    shared messages, or the texts' shared beginning (cut at a space, as TRL's ``extract_prompt``)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        return _prompt(row["prompt"]), _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if not shared:
            raise DataError("chosen and rejected share no messages to use as the prompt")
        return chosen[:shared], _reply(chosen[shared:], "chosen"), _reply(rejected[shared:], "rejected")
    chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
    cut = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    while cut and not chosen[cut - 1].isspace():
        cut -= 1  # back to a word boundary, so that the replies start with whole words
    prompt = chosen[:cut].rstrip()  # the space before the replies is theirs (" " + reply), as in TRL
    if not prompt.strip():
        raise DataError("chosen and rejected share no beginning to use as the prompt")
    return prompt, chosen[cut:], rejected[cut:]


def _prompt(value) -> str | list[dict[str, str]]:
    return _messages(value, "prompt") if isinstance(value, list) else _text(value, "prompt")


def _reply(value, name: str) -> str:
    """A completion's text: a string, or the content of one assistant message."""
    if isinstance(value, str):
        return _text(value, name)
    messages = _messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"'{name}' must be one assistant message, found {len(messages)} messages")
    return messages[0]["content"]


def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"'{name}' is missing or not a non-empty string")
    return value


def _messages(value, name: str) -> list[dict[str, str]]:
    """A list of ``{"role", "content"}`` messages, roles among system, user, assistant and tool."""
    if not isinstance(value, list) or not value:
        raise DataError(f"'{name}' must be text or a non-empty list of messages")
    out = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"'{name}' holds a message without text content")
        if message.get("role") not in _ROLES:
            raise DataError(f"'{name}' holds a message of role {message.get('role')!r}; use {', '.join(_ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    return out
