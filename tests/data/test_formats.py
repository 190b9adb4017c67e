"""TRL's dataset types (``data/formats.py``): detection from the columns, standard and
conversational rows, implicit prompts, the rows each DataModule reads, and bad rows."""

from __future__ import annotations

import json

import pytest

from shraygpt_rl.data.formats import (
    LANGUAGE_MODELLING,
    PREFERENCE,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    UNPAIRED,
    convert,
    dataset_type,
    is_conversational,
    load_rows,
    to_row,
)
from shraygpt_rl.errors import DataError


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


ROWS = {  # TRL's documentation examples, standard then conversational
    LANGUAGE_MODELLING: (
        {"text": "The sky is blue."},
        {"messages": user("Which color is the sky?") + assistant("Blue.")},
    ),
    PROMPT_ONLY: ({"prompt": "The sky is"}, {"prompt": user("Which color is the sky?")}),
    PROMPT_COMPLETION: (
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": user("Which color is the sky?"), "completion": assistant("It is blue.")},
    ),
    PREFERENCE: (
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": user("Which color is the sky?"), "chosen": assistant("Blue."), "rejected": assistant("Green.")},
    ),
    UNPAIRED: (
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": user("Which color is the sky?"), "completion": assistant("Green."), "label": False},
    ),
}


@pytest.mark.parametrize("kind", list(ROWS))
def test_each_type_is_detected_from_its_columns(kind):
    standard, conversational = ROWS[kind]
    assert dataset_type(standard) == dataset_type(conversational) == kind
    assert not is_conversational(standard) and is_conversational(conversational)
    assert dataset_type({**standard, "answer": "42"}) == kind  # other columns are metadata


def test_implicit_prompts():
    conversational = {
        "chosen": user("Which color is the sky?") + assistant("Blue."),
        "rejected": user("Which color is the sky?") + assistant("Green."),
    }
    assert dataset_type(conversational) == PREFERENCE
    assert to_row(conversational, "preferences") == {
        "prompt": user("Which color is the sky?"),
        "chosen_response": "Blue.",
        "rejected_response": "Green.",
    }
    standard = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert to_row(standard, "preferences") == {
        "prompt": "The sky is",
        "chosen_response": "blue.",
        "rejected_response": "green.",
    }  # cut at a word boundary, the space the replies' (" " + reply), as TRL's extract_prompt
    with pytest.raises(DataError, match="share no beginning"):
        to_row({"chosen": "Yes.", "rejected": "No."}, "preferences")


def test_the_rows_each_datamodule_reads():
    standard, conversational = ROWS[PREFERENCE]
    assert to_row(standard, "instructions") == {"prompt": "The sky is", "response": " blue."}  # SFT on the chosen
    assert to_row(conversational, "prompts") == {"prompt": user("Which color is the sky?")}
    assert to_row({**ROWS[PROMPT_COMPLETION][1], "answer": "blue"}, "prompts")["answer"] == "blue"  # metadata
    assert to_row(ROWS[UNPAIRED][1], "unpaired") == {
        "prompt": user("Which color is the sky?"),
        "completion": "Green.",
        "label": False,
    }
    assert to_row(ROWS[LANGUAGE_MODELLING][1], "instructions") == ROWS[LANGUAGE_MODELLING][1]


@pytest.mark.parametrize(
    ("row", "kind", "says"),
    [
        ({"question": "?"}, "prompts", "a row with the columns question fits none of TRL's types: language modelling"),
        ({"text": "x"}, "prompts", "a language-modelling row (text or messages) has no prompt for the prompts"),
        ({"prompt": "x"}, "instructions", "a prompt-only row has no completion for the instructions"),
        ({"prompt": "x", "completion": "y"}, "preferences", "a prompt-completion row has no label or rejected reply"),
        ({"prompt": "x", "completion": "y", "label": 1}, "unpaired", "'label' is not true/false"),
        (
            {"prompt": user("x"), "completion": user("y") + assistant("z")},
            "instructions",
            "'completion' must be one assistant",
        ),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "prompts", "'prompt' holds a message of role 'robot'"),
        ({"prompt": [{"role": "user"}]}, "prompts", "'prompt' holds a message without text content"),
        ({"prompt": ""}, "prompts", "'prompt' is missing or not a non-empty string"),
    ],
)
def test_a_row_that_does_not_fit_is_one_sentence(row, kind, says):
    with pytest.raises(DataError) as refused:
        to_row(row, kind)
    assert str(refused.value).startswith(says) and ". " not in str(refused.value)


def test_files_name_the_line_and_mixed_files_are_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [ROWS[PROMPT_COMPLETION][0]] * 3 + [{"prompt": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"data.jsonl, line 4: a prompt-only row has no completion"):
        convert(load_rows(str(path)), "instructions", str(path), skip_invalid=False)
    assert len(convert(load_rows(str(path)), "instructions", str(path), skip_invalid=True)) == 3
    mixed = [ROWS[PROMPT_ONLY][0], ROWS[PROMPT_ONLY][1]]
    with pytest.raises(DataError, match="mixes rows of different types, or standard rows with conversational ones"):
        convert(list(enumerate(mixed, 1)), "prompts", "mixed", skip_invalid=False)


def test_parquet_and_json_files(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    rows = [ROWS[PREFERENCE][1]] * 4
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    for name in ("pairs.parquet", "pairs.json"):
        data = convert(load_rows(str(tmp_path / name)), "preferences", name, skip_invalid=False)
        assert data[0] == {
            "prompt": user("Which color is the sky?"),
            "chosen_response": "Blue.",
            "rejected_response": "Green.",
        }
    # Offline, as without a network but without the hub client's 23 s of retries first.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="Could not load 'org/not-here' from the Hugging Face hub"):
        load_rows("org/not-here")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_review_mends_in_reading_rows(tmp_path):
    """Issue 34's review: a ``text`` metadata column is not the row; optional and mixed-type
    metadata; ``--data.columns`` before Dolly's columns are recognised; a ``.json`` file of JSON
    lines; PPO-ptx's demonstrations do not take the prompts' hub configuration."""
    from shraygpt_rl.data import PromptDataModule, SFTDataModule

    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "text": "SOURCE"} for i in range(12)]
    sft = SFTDataModule(source=_jsonl(tmp_path / "meta.jsonl", rows), val_size=2, test_size=2)
    sft.setup()
    example = sft.example(sft.splits["train"][0])
    trained = sft.tokenizer.decode([t for t, m in zip(example["input_ids"], example["loss_mask"]) if m])
    assert trained.startswith(" A") and "SOURCE" not in sft.tokenizer.decode(example["input_ids"])
    rows = [{"prompt": f"Q{i}?", **({"answer": i} if i % 2 else {})} for i in range(12)]
    prompts = PromptDataModule(source=_jsonl(tmp_path / "optional.jsonl", rows), val_size=2, test_size=2)
    prompts.setup()
    assert {r["answer"] for r in prompts.splits["train"]} - {None}  # a column some rows lack: None there
    rows = [{"prompt": f"Q{i}?", "answer": i if i % 2 else str(i)} for i in range(12)]
    mixed = PromptDataModule(source=_jsonl(tmp_path / "mixed.jsonl", rows), val_size=2, test_size=2)
    with pytest.raises(DataError, match="has a column whose values are of different types"):
        mixed.setup()
    alpaca = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(12)]
    renamed = SFTDataModule(
        source=_jsonl(tmp_path / "alpaca.jsonl", alpaca), columns={"instruction": "prompt", "output": "completion"},
        val_size=2, test_size=2,
    )  # fmt: skip
    renamed.setup()
    assert renamed.splits["train"][0]["response"] in {str(i) for i in range(12)}
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps({"prompt": f"Q{i}?"}) + "\n" for i in range(12)))
    assert len(PromptDataModule(source=str(lines), val_size=2, test_size=2).train_dataloader().dataset) == 8
    ptx = PromptDataModule(source=str(lines), subset="main", columns={"q": "prompt"}, ptx_source="arithmetic")
    ptx.setup()
    assert ptx.ptx.hparams.subset is None and ptx.ptx.hparams.columns is None
