"""Instruction data (Dolly, prompt/completion) and plain prompts (stories, text, JSONL); what a
source holds (``describe``)."""

from __future__ import annotations

import json

import pytest

from shraygpt_rl.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from shraygpt_rl.data.sources import STORY_OPENINGS, describe, load_instructions, load_prompts
from shraygpt_rl.errors import DataError

DOLLY_ROWS = [
    {"instruction": "Name a fish.", "context": "", "response": "Salmon.", "category": "open_qa"},
    {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Cats nap.", "category": "summarization"},
    {"instruction": " Why? ", "context": None, "response": " Because. ", "category": "brainstorming"},
    {"instruction": "Count.", "context": "  ", "response": "1 2 3", "category": "open_qa"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dolly_records_are_formatted_as_seed_004(tmp_path):
    data = load_instructions(str(write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)))
    users = ["Name a fish.", "Summarise.\n\nCats sleep a lot.", "Why?", "Count."]
    assert [p[0]["content"] for p in data["prompt"]] == users
    assert {p[0]["role"] for p in data["prompt"]} == {"user"}
    assert data["response"] == ["Salmon.", "Cats nap.", "Because.", "1 2 3"]
    assert data["category"][1] == "summarization"
    # The demonstration the model trains on: "User: {instruction}\n\nAssistant: {response}".
    module = SFTDataModule(source=str(tmp_path / "dolly.jsonl"), system_prompt=None, val_size=1, test_size=1)
    module.setup()
    enc = module.tokenizer
    texts = {enc.decode(module.example(row)["input_ids"][:-1]) for split in module.splits.values() for row in split}
    assert "User: Summarise.\n\nCats sleep a lot.\n\nAssistant: Cats nap." in texts


def test_prompt_completion_and_plain_prompts(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}] * 8)
    assert describe(str(pc)) == ("instructions", "trl")
    sft = SFTDataModule(source=str(pc), val_size=1, test_size=1)
    sft.setup()
    assert sft.tokenizer.decode(sft.example(sft.splits["train"][0])["input_ids"]) == "Q: 1+1?\nA: 2<|endoftext|>"
    text = tmp_path / "openings.txt"
    text.write_text("Once upon a time\n\n  A dog ran  \n")
    assert describe(str(text)) == ("prompts", "text")
    assert load_prompts(str(text))["prompt"] == ["Once upon a time", "A dog ran"]
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "topic": "greeting"}] * 8)
    assert describe(str(jsonl)) == ("prompts", "trl")
    prompts = PromptDataModule(source=str(jsonl), val_size=1, test_size=1)
    batch = next(iter(prompts.train_dataloader()))
    assert batch["prompt"][0] == "Hi" and batch["metadata"][0] == {"topic": "greeting"}
    assert describe("stories") == ("prompts", "text") and load_prompts("stories")["prompt"] == list(STORY_OPENINGS)
    assert describe("databricks/databricks-dolly-15k") == ("instructions", "dolly")
    assert describe("Anthropic/hh-rlhf") == ("preferences", "hh") and describe("org/any-dataset") == (None, "trl")


def test_bad_rows_name_the_file_and_line(tmp_path):
    rows = [*DOLLY_ROWS[:2], {"instruction": "No answer", "response": ""}, DOLLY_ROWS[3]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: 'response' is missing or not a non-empty string\.$"):
        load_instructions(str(path))
    assert len(load_instructions(str(path), skip_invalid=True)) == 3
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"line 5: malformed JSON"):
        load_instructions(str(path))
    with pytest.raises(DataError, match="holds no prompts"):
        (tmp_path / "empty.txt").write_text("\n  \n")
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="No such file"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_each_datamodule_takes_the_sources_it_can_use(tmp_path):
    dolly = str(write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS * 3))
    prompts = PromptDataModule(source=dolly, system_prompt=None, val_size=2, test_size=2)
    batch = next(iter(prompts.train_dataloader()))
    assert batch["prompt"][0].startswith("User: ") and {"response", "category"} <= set(batch["metadata"][0])
    stories = PromptDataModule(source="stories", val_size=4, test_size=4, batch_size=64)
    assert sorted(next(iter(stories.train_dataloader()))["prompt"]) == sorted(stories.splits["train"]["prompt"])
    with pytest.raises(DataError, match="holds prompts, but this stage needs preferences or instructions"):
        SFTDataModule(source="stories").setup()
    with pytest.raises(DataError, match="holds instructions, but this stage needs preferences"):
        PreferenceDataModule(source=dolly).setup()
