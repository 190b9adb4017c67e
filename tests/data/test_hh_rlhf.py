"""HH-RLHF loading and parsing: the shared sample, local files and directories, the hub wiring,
and every kind of bad input."""

from __future__ import annotations

import gzip
import json
import logging

import datasets
import pytest

from shraygpt_rl.data import hh_rlhf
from shraygpt_rl.data.chat import COURSE_TEMPLATE, ChatFormat
from shraygpt_rl.data.hh_rlhf import DataError, is_local_source, load_preferences, split_pair
from shraygpt_rl.tokenizer import DEFAULT_SYSTEM_PROMPT, byte_encoding

SYSTEM = "System: You are ShrayGPT, a helpful and concise AI assistant."
CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple."
REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: No."


def course(prompt, system_prompt=DEFAULT_SYSTEM_PROMPT) -> str:
    """A prompt as the course's format renders it (the DataModules' default for ShrayGPT)."""
    return ChatFormat(byte_encoding(), COURSE_TEMPLATE, "course", system_prompt).render(
        prompt, add_generation_prompt=True
    )


def _write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r).encode() for r in rows] + list(raw_lines)
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_split_pair_uses_the_shared_turns_as_the_prompt():
    row = split_pair(CHOSEN, REJECTED)
    assert row["prompt"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a fruit."},
    ]
    assert course(row["prompt"]) == (
        f"{SYSTEM}\n\nUser: Hi there\n\nAssistant: Hello! How can I help?\n\nUser: Name a fruit.\n\nAssistant:"
    )
    assert row["chosen_response"] == "An apple." and row["rejected_response"] == "No."


def test_response_is_the_first_reply_after_the_shared_turns():
    longer = REJECTED + "\n\nHuman: Why not?\n\nAssistant: Because."
    assert split_pair(CHOSEN, longer)["rejected_response"] == "No."


def test_without_a_system_prompt():
    assert course(split_pair(CHOSEN, REJECTED)["prompt"], system_prompt=None).startswith("User: Hi there")


@pytest.mark.parametrize(
    "chosen,rejected,reason",
    [
        (None, REJECTED, "'chosen' is missing"),
        (CHOSEN, None, "'rejected' is missing"),
        ("", REJECTED, "'chosen' is empty"),
        (CHOSEN, "   ", "'rejected' is empty"),
        (CHOSEN, CHOSEN, "identical"),
        ("\n\nHuman: Hi", "\n\nHuman: Hello", "no Assistant turn"),
        (CHOSEN, 42, "is a int, not a string"),
        ("preamble\n\nHuman: a\n\nAssistant: b", REJECTED, "text comes before the first"),
    ],
)
def test_invalid_pairs_say_why(chosen, rejected, reason):
    with pytest.raises(hh_rlhf.InvalidPairError, match=reason):
        split_pair(chosen, rejected)


def test_the_shared_sample_parses_completely(hh_sample):
    data = load_preferences(hh_sample)
    assert len(data) == 2000
    assert data.column_names == ["prompt", "chosen_response", "rejected_response"]
    first = data[0]
    assert course(first["prompt"]) == (
        f"{SYSTEM}\n\nUser: Should I go swimming in my local lake? The sign says no swimming but I think it should "
        "be fine.\n\nAssistant:"
    )
    assert first["rejected_response"].startswith("Let me see if I can help you think through this.")
    assert all(p[-1]["role"] == "user" for p in data["prompt"])
    # HH-RLHF prefers declining to answer in a few harmless pairs: an empty reply is kept.
    assert sum(r == "" for r in data["chosen_response"]) == 4


def test_local_directory_picks_the_split_and_subset(tmp_path):
    subset = tmp_path / "harmless-base"
    subset.mkdir()
    _write_jsonl(subset / "train.jsonl.gz", [{"chosen": CHOSEN, "rejected": REJECTED}] * 3)
    _write_jsonl(subset / "test.jsonl.gz", [{"chosen": CHOSEN, "rejected": REJECTED}])
    assert len(load_preferences(tmp_path, split="train", data_dir="harmless-base")) == 3
    assert len(load_preferences(tmp_path, split="test", data_dir="harmless-base")) == 1
    assert len(load_preferences(subset / "train.jsonl.gz")) == 3
    # The configs name the subset; pointing at its folder or at one file works with them as they are.
    assert len(load_preferences(subset, split="train", data_dir="harmless-base")) == 3
    assert len(load_preferences(subset / "test.jsonl.gz", split="train", data_dir="harmless-base")) == 1
    with pytest.raises(DataError, match="has no 'helpful-base' subfolder"):
        load_preferences(tmp_path, data_dir="helpful-base")


def test_hub_name_is_passed_to_datasets(monkeypatch, tmp_path):
    calls = []
    local = _write_jsonl(tmp_path / "x.jsonl", [{"chosen": CHOSEN, "rejected": REJECTED}])

    def fake_load_dataset(name, data_dir=None, split=None, **kwargs):
        calls.append((name, data_dir, split))
        return datasets.Dataset.from_json(str(local))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_preferences("Anthropic/hh-rlhf", split="test", data_dir="harmless-base")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test")]
    assert data[0]["chosen_response"] == "An apple."


def test_hub_unreachable_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="pass a local .jsonl or .jsonl.gz file"):
        load_preferences("Anthropic/hh-rlhf")


@pytest.mark.parametrize(
    "source,local", [("Anthropic/hh-rlhf", False), ("data/hh.jsonl", True), ("./hh", True), ("hh", True)]
)
def test_sources_are_told_apart(source, local):
    assert is_local_source(source) == local


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(DataError, match="No such file or directory"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no .jsonl"):
        load_preferences(tmp_path)


GOOD = {"chosen": CHOSEN, "rejected": REJECTED}
BAD_CASES = [
    ("malformed", [], [b'{"chosen": "x",'], "line 3: malformed JSON"),
    ("not-utf8", [], [b'{"chosen": "\xff\xfe", "rejected": "x"}'], "line 3: the line is not valid UTF-8"),
    ("missing", [{"chosen": CHOSEN}], [], "line 3: 'rejected' is missing"),
    ("empty", [{"chosen": "", "rejected": REJECTED}], [], "line 3: 'chosen' is empty"),
    ("no-assistant", [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}], [], "line 3: the chosen"),
    ("identical", [{"chosen": CHOSEN, "rejected": CHOSEN}], [], "line 3: chosen and rejected are identical"),
    ("not-object", [], [b"[1, 2]"], "line 3: expected a JSON object"),
]


@pytest.mark.parametrize("name,rows,raw,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_and_line(tmp_path, name, rows, raw, message):
    path = _write_jsonl(tmp_path / f"{name}.jsonl", [GOOD, GOOD, *rows], raw)
    with pytest.raises(DataError) as err:
        load_preferences(path)
    text = str(err.value)
    assert str(path) in text and message in text and "\n" not in text


@pytest.mark.parametrize("name,rows,raw,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_skip_invalid_drops_and_counts(tmp_path, caplog, name, rows, raw, message):
    path = _write_jsonl(tmp_path / f"{name}.jsonl.gz", [GOOD, GOOD, *rows, GOOD], raw)
    with caplog.at_level(logging.WARNING):
        data = load_preferences(path, skip_invalid=True)
    assert len(data) == 3
    assert "skipped 1" in caplog.text


def test_blank_lines_do_not_shift_reported_line_numbers(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n\n" + json.dumps({"chosen": CHOSEN}) + "\n")
    with pytest.raises(DataError, match="line 4: 'rejected' is missing"):
        load_preferences(path)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz", "blank.jsonl"])
def test_an_empty_file_is_one_sentence(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"\n\n" if name.startswith("blank") else b"")
    with pytest.raises(DataError, match=r"holds no preference pairs: it is empty\.$"):
        load_preferences(path)


def test_a_truncated_gzip_names_the_line_where_it_ends(tmp_path):
    whole = gzip.compress(b"\n".join(json.dumps(GOOD).encode() for _ in range(400)) + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])  # a download cut off half-way
    with pytest.raises(DataError, match=r"cut.jsonl.gz, line \d+: the compressed file ends early or is corrupt"):
        load_preferences(path)
    kept = load_preferences(path, skip_invalid=True)  # keeps every complete line before the cut
    assert 0 < len(kept) < 400


def test_skip_invalid_with_nothing_valid_is_one_sentence(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"chosen": CHOSEN, "rejected": CHOSEN}] * 3)
    with pytest.raises(DataError, match=r"holds no valid preference pairs \(the first: chosen and rejected are"):
        load_preferences(path, skip_invalid=True)
