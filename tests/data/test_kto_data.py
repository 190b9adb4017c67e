"""KTODataModule: pairs split in two, unpaired files read as they are, bad rows, judgement files,
and the mismatched pairs of KTO's KL estimate."""

from __future__ import annotations

import json

import pytest
import torch

from shraygpt_rl.data import KTODataModule
from shraygpt_rl.data.sources import describe
from shraygpt_rl.data.tasks import make_task
from shraygpt_rl.errors import DataError

SMALL = {"train_size": 16, "val_size": 8, "test_size": 8, "batch_size": 8, "system_prompt": None}


def _text(dm, ids, mask):
    return dm.tokenizer.decode(ids[mask.bool()].tolist())


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _examples(n: int) -> list[dict]:
    return [
        {"prompt": f"User: question {i}?\n\nAssistant:", "completion": f"answer {i}", "label": i % 3 != 0}
        for i in range(n)
    ]


def test_task_pairs_become_a_desirable_and_an_undesirable_example_each():
    dm = KTODataModule(source="arithmetic", **SMALL)
    dm.setup()
    pairs = make_task("arithmetic", seed=0, num_train=16, num_val=8, num_test=8)
    for split, size in (("train", 16), ("val", 8)):
        rows, expected = dm.splits[split], pairs.preferences(split)
        assert len(rows) == 2 * size
        assert list(rows["label"]) == [True, False] * size  # interleaved: every batch holds both
        assert list(rows["prompt"]) == [p for p in expected["prompt"] for _ in range(2)]
        completions = [c for pair in zip(expected["chosen_response"], expected["rejected_response"]) for c in pair]
        assert list(rows["completion"]) == completions


def test_an_unpaired_file_is_read_as_it_is(tmp_path):
    rows = _examples(12)
    source = _write_jsonl(tmp_path / "kto.jsonl", rows)
    assert describe(source) == ("unpaired", "trl")
    dm = KTODataModule(source=source, **{**SMALL, "val_size": 2, "test_size": 2})
    dm.setup()
    read = [r for split in ("train", "val", "test") for r in dm.splits[split]]
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in read) == sorted(
        (r["prompt"], r["completion"], r["label"]) for r in rows
    )
    batch = next(iter(dm.plain_dataloader("train")))
    for i, row in enumerate(dm.splits["train"].select(range(len(batch["label"])))):
        assert batch["label"][i].item() == row["label"]
        assert _text(dm, batch["input_ids"][i], batch["response_mask"][i]) == f" {row['completion']}<|endoftext|>"


def test_a_json_list_is_read_too(tmp_path):
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(_examples(8)))
    dm = KTODataModule(source=str(path), **{**SMALL, "val_size": 1, "test_size": 1})
    dm.setup()
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 8


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"prompt": "Hi", "completion": "Hello", "label": "yes"}, "line 3: 'label' is not true/false."),
        ({"prompt": "Hi", "completion": "Hello", "label": 1}, "line 3: 'label' is not true/false."),
        ({"prompt": "Hi", "label": True, "completion": ""}, "line 3: 'completion' is missing or not a non-empty"),
        ({"completion": "Hello", "label": False}, "line 3: a row with the columns completion, label fits none of TRL"),
    ],
)
def test_a_bad_row_is_one_sentence_naming_the_file_and_line(tmp_path, bad, says):
    rows = _examples(8)
    rows[2] = bad
    source = _write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError) as refused:
        KTODataModule(source=source, **SMALL).setup()
    message = str(refused.value)
    assert message.startswith(source) and says in message and message.count(". ") <= 1, message
    dm = KTODataModule(source=source, skip_invalid=True, **{**SMALL, "val_size": 1, "test_size": 1})
    dm.setup()  # skip_invalid drops the row instead
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 7


def test_a_judgement_file_converts_chosen_desirable_rejected_undesirable(tmp_path):
    """The labelling page's format (``data/labels.py``): ties, skips and retracted judgements
    are left out; every other judgement gives two examples."""
    judgements = []
    for i in range(6):
        tie = i == 5
        judgements.append(
            {
                "type": "judgement",
                "id": f"j{i}",
                "item": f"item{i}",
                "prompt": f"User: q{i}?\n\nAssistant:",
                "response_a": f"good {i}",
                "response_b": f"bad {i}",
                "shown": "ab",
                "choice": "=" if tie else "A+",
                "chosen": None if tie else f"good {i}",
                "rejected": None if tie else f"bad {i}",
                "strength": 0 if tie else 1,
                "note": "",
                "labeller": "me",
                "timestamp": "2024-01-01T00:00:00.000+00:00",
            }
        )
    judgements.append({"type": "retraction", "id": "r", "retracts": "j4", "item": "item4", "labeller": "me"})
    source = _write_jsonl(tmp_path / "prefs.jsonl", judgements)
    dm = KTODataModule(source=source, **{**SMALL, "val_size": 1, "test_size": 1})
    dm.setup()
    rows = [r for split in ("train", "val", "test") for r in dm.splits[split]]
    assert len(rows) == 8  # 4 pairs: j0-j3
    for row in rows:
        assert row["completion"].startswith("good" if row["label"] else "bad")
        assert row["completion"].split()[1] == row["prompt"].split("q")[1].split("?")[0]


def test_the_mismatched_pairs_are_each_prompt_with_another_rows_completion():
    dm = KTODataModule(source="arithmetic", **SMALL)
    dm.setup()
    train = dm.splits["train"]
    partner = list(train["partner"])
    assert sorted(partner) == list(range(len(train)))  # every completion used once
    assert all(p != i for i, p in enumerate(partner))
    batch = next(iter(dm.plain_dataloader("train")))
    for i in range(batch["label"].numel()):
        other = train[partner[i]]
        prompt = _text(dm, batch["kl_input_ids"][i], batch["kl_attention_mask"][i] - batch["kl_response_mask"][i])
        assert prompt == train[i]["prompt_text"]
        assert batch["kl_input_ids"][i][batch["kl_response_mask"][i].bool()].tolist() == other["completion_ids"]
        # The batched tensors are the row's own prompt and partner's completion, padded.
        naive = train[i]["prompt_ids"] + other["completion_ids"]
        assert batch["kl_input_ids"][i, : len(naive)].tolist() == naive
        assert batch["kl_attention_mask"][i].sum().item() == len(naive)
    again = KTODataModule(source="arithmetic", **SMALL)
    again.setup()
    assert list(again.splits["train"]["partner"]) == partner  # fixed by the seed: a cache stays valid
    assert list(dm.splits["val"]["partner"]) != partner[: len(dm.splits["val"])]


def test_other_stages_refuse_an_unpaired_file(tmp_path):
    from shraygpt_rl.data import SFTDataModule

    source = _write_jsonl(tmp_path / "kto.jsonl", _examples(8))
    with pytest.raises(DataError, match="holds unpaired preference rows .unpaired., but this stage needs preferen"):
        SFTDataModule(source=source, **SMALL).setup()


def test_labels_are_a_bool_tensor_and_indices_address_the_split():
    dm = KTODataModule(source="arithmetic", **SMALL)
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.bool and batch["label"].shape == (8,)
    train = dm.splits["train"]
    assert [train[int(i)]["label"] for i in batch["index"]] == batch["label"].tolist()
