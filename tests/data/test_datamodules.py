"""DataModules: what each batch holds, truncation, packing, deterministic splits, DDP shards."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.data.datamodules import PreferenceDataModule, SFTDataModule, truncate_pair
from shraygpt_rl.errors import ConfigError, DataError

SMALL = {"train_size": 64, "val_size": 16, "test_size": 16, "batch_size": 8}


def _text(dm, ids, mask):
    return dm.tokenizer.decode(ids[mask.bool()].tolist())


def test_truncate_pair_keeps_the_prompt_end_and_the_response_start():
    prompt, response = list(range(10)), list(range(100, 110))
    assert truncate_pair(prompt, response, max_length=30, max_prompt_length=6) == (prompt, response)
    assert truncate_pair(prompt, response, max_length=12, max_prompt_length=6) == (
        [4, 5, 6, 7, 8, 9],
        [100, 101, 102, 103, 104, 105],
    )


def test_sft_batches_mask_only_assistant_tokens():
    dm = SFTDataModule(source="arithmetic", **SMALL)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    for ids, attn, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        text = _text(dm, ids, attn)
        assert text.startswith("System: You are ShrayGPT") and "\n\nUser: What is " in text
        assert _text(dm, ids, loss).startswith(" Answer: ") and _text(dm, ids, loss).endswith("<|endoftext|>")
        assert text == _text(dm, ids, attn - loss) + _text(dm, ids, loss)
        assert attn[: int(attn.sum())].all()  # right padding


def test_sft_wrong_fraction_applies_to_training_only():
    dm = SFTDataModule(source="arithmetic", wrong_fraction=0.5, **SMALL)
    dm.setup()
    assert 0.2 < 1 - sum(dm.splits["train"]["correct"]) / 64 < 0.8
    assert all(dm.splits["val"]["correct"])


def test_packing_fills_rows_and_keeps_every_token():
    lengths = {"max_length": 128, "max_prompt_length": 100}
    plain = SFTDataModule(source="sorting", digits=1, **lengths, **SMALL)
    packed = SFTDataModule(source="sorting", digits=1, packing=True, **lengths, **SMALL)
    plain.setup(), packed.setup()
    tokens = sum(len(plain.example(r)["input_ids"]) for r in plain.splits["train"])
    lengths = [len(r["input_ids"]) for r in packed.splits["train"]]
    assert sum(lengths) == tokens and all(n == 128 for n in lengths[:-1])
    batch = packed.collate([packed.splits["train"][0]])
    assert batch["input_ids"].shape == (1, 128) and batch["loss_mask"].sum() > 0


def test_preference_batches_share_the_prompt_and_mark_it():
    dm = PreferenceDataModule(source="arithmetic", **SMALL)
    batch = next(iter(dm.val_dataloader()))
    for i in range(4):
        chosen = _text(dm, batch["chosen_input_ids"][i], batch["chosen_attention_mask"][i])
        rejected = _text(dm, batch["rejected_input_ids"][i], batch["rejected_attention_mask"][i])
        prompt_c = _text(dm, batch["chosen_input_ids"][i], batch["chosen_prompt_mask"][i])
        prompt_r = _text(dm, batch["rejected_input_ids"][i], batch["rejected_prompt_mask"][i])
        assert prompt_c == prompt_r == batch["prompt"][i]
        assert chosen.startswith(prompt_c + " Answer: ") and rejected.endswith("<|endoftext|>")
        assert chosen != rejected
    assert batch["chosen_prompt_mask"].shape == batch["chosen_input_ids"].shape


def test_preference_truncation_is_the_same_on_both_sides():
    dm = PreferenceDataModule(source="arithmetic", max_length=40, max_prompt_length=30, **SMALL)
    dm.setup()
    row = dm.splits["val"][0]
    batch = dm.collate([row])
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_input_ids"][0]
        prompt = ids[batch[f"{side}_prompt_mask"][0].bool()].tolist()
        assert prompt == row["prompt_ids"][-30:]  # the end of the prompt
        response = ids[(batch[f"{side}_attention_mask"][0] - batch[f"{side}_prompt_mask"][0]).bool()].tolist()
        assert response == row[f"{side}_response_ids"][:10]  # the start of the response
        assert len(ids) <= 40


def test_prompt_batches_are_left_padded_with_metadata():
    dm = PromptDataModule(source="sorting", digits=2, **SMALL)
    batch = next(iter(dm.test_dataloader()))
    assert batch["attention_mask"][:, -1].all()  # left padding: every row ends with a real token
    for ids, mask, prompt, meta in zip(batch["input_ids"], batch["attention_mask"], batch["prompt"], batch["metadata"]):
        assert _text(dm, ids, mask) == prompt and prompt.endswith("\n\nAssistant:")
        assert meta["task"] == "sorting" and meta["target"] == sorted(meta["numbers"])


def test_long_prompts_keep_their_end():
    dm = PromptDataModule(source="arithmetic", max_length=64, max_prompt_length=20, **SMALL)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] == 20
    assert _text(dm, batch["input_ids"][0], batch["attention_mask"][0]).endswith("\n\nAssistant:")


def test_splits_are_deterministic(hh_sample):
    kwargs = {
        "source": str(hh_sample),
        "tokenizer": "byte",
        "val_size": 50,
        "test_size": 50,
        "max_length": 2048,
        "max_prompt_length": 1024,
    }
    a, b, c = PreferenceDataModule(**kwargs), PreferenceDataModule(**kwargs), PreferenceDataModule(seed=1, **kwargs)
    for dm in (a, b, c):
        dm.setup()
    assert a.splits["val"]["prompt"] == b.splits["val"]["prompt"] != c.splits["val"]["prompt"]
    assert len(a.splits["train"]) == 1900 and len(a.splits["test"]) == 50
    assert not set(a.splits["test"]["prompt_text"]) & set(a.splits["train"]["prompt_text"])


def test_hh_rlhf_with_r50k(hh_sample, r50k_file):
    dm = PromptDataModule(source=str(hh_sample), tokenizer="r50k_base", tokenizer_path=str(r50k_file), **SMALL)
    batch = next(iter(dm.val_dataloader()))
    assert dm.tokenizer.n_vocab == 50257
    assert set(batch["metadata"][0]) == {"chosen_response", "rejected_response"}
    assert batch["prompt"][0].startswith("System: You are ShrayGPT")


def test_each_ddp_rank_gets_a_disjoint_shard():
    """Lightning swaps in a DistributedSampler; our loaders must survive that swap."""
    dm = PromptDataModule(source="arithmetic", **SMALL)
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sharded = _update_dataloader(loader, sampler)
        seen.append([q for batch in sharded for q in batch["prompt"]])
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0]) & set(seen[1])


def test_bad_lengths_are_refused():
    with pytest.raises(ConfigError, match="must be at least 1 and below max_length"):
        SFTDataModule(max_length=64, max_prompt_length=64)


def test_dataloader_batches_are_tensors_of_the_right_dtype():
    batch = next(iter(SFTDataModule(source="arithmetic", **SMALL).train_dataloader()))
    assert all(v.dtype == torch.long for v in batch.values())


@pytest.mark.parametrize("pairs", [20, 120])
def test_a_small_file_shrinks_the_held_out_splits_and_says_so(tmp_path, caplog, pairs):
    """Before: any file under 400 pairs failed in train_test_split with the default sizes."""
    path = tmp_path / "small.jsonl"
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path.write_text("\n".join(json.dumps(good) for _ in range(pairs)) + "\n")
    data = PreferenceDataModule(source=str(path), max_length=64, max_prompt_length=32)
    with caplog.at_level(logging.WARNING):
        data.setup()
    sizes = {split: len(rows) for split, rows in data.splits.items()}
    assert sizes["val"] == sizes["test"] == pairs // 4 and sizes["train"] == pairs - 2 * (pairs // 4)
    assert f"holds {pairs} examples: validating on {pairs // 4} and testing on {pairs // 4}" in caplog.text


def test_a_file_too_small_to_split_is_one_sentence(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}))
    with pytest.raises(DataError, match="holds 1 valid examples; training needs at least 4"):
        PreferenceDataModule(source=str(path)).setup()


OBSERVATIONS = "<result>.*?</result>"


@pytest.mark.parametrize("tokenizer", ["byte", "r50k_base"])
def test_tool_demonstrations_train_on_the_policys_tokens_only(tokenizer, request):
    """The tool's answer is tokenised on its own, as a rollout feeds it, and left out of the loss:
    the response is the call's tokens, the answer's, then the rest's, each encoded alone."""
    path = str(request.getfixturevalue("r50k_file")) if tokenizer == "r50k_base" else None
    dm = SFTDataModule(
        source="multiplication", digits=3, observations=OBSERVATIONS, tokenizer=tokenizer, tokenizer_path=path,
        system_prompt=None, max_length=112, max_prompt_length=48, **SMALL,
    )  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    enc = dm.tokenizer
    for ids, attn, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        start = int(loss.nonzero()[0])  # the response's first token
        response, fed = ids[start : int(attn.sum())].tolist(), (1 - loss[start : int(attn.sum())]).tolist()
        call, observation, rest = re.split(f"({OBSERVATIONS})", enc.decode(response[:-1]))
        pieces = [enc.encode_ordinary(piece) for piece in (call, observation, rest)]
        assert call.startswith(" <calc>") and call.endswith("</calc>") and rest.startswith("\nAnswer: ")
        assert response == pieces[0] + pieces[1] + pieces[2] + [enc.eot_token]
        assert fed == [0] * len(pieces[0]) + [1] * len(pieces[1]) + [0] * (len(pieces[2]) + 1)


def test_bad_observation_patterns_are_refused():
    with pytest.raises(ConfigError, match="observations is not a valid regex"):
        SFTDataModule(source="multiplication", observations="<result>(", **SMALL)
    with pytest.raises(ConfigError, match="observations must have no capture groups"):
        SFTDataModule(source="multiplication", observations="<result>(.*)</result>", **SMALL)


@pytest.mark.parametrize("system_prompt", ["default", None])
def test_the_course_format_gives_the_tokens_it_gave_before_chat_templates(system_prompt):
    """Issue 34: the course's format became a chat template; the built-in task's tokens (prompts,
    demonstrations, pairs) are still ``encode_ordinary`` of the old rendering, and EOS."""
    from shraygpt_rl.tokenizer import DEFAULT_SYSTEM_PROMPT, format_prompt, format_response

    system = DEFAULT_SYSTEM_PROMPT if system_prompt == "default" else None
    sizes = dict(train_size=32, val_size=8, test_size=8, system_prompt=system_prompt)
    for module, columns in (
        (SFTDataModule, ("response",)),
        (PreferenceDataModule, ("chosen_response", "rejected_response")),
    ):
        dm = module(**sizes)
        dm.setup()
        enc = dm.tokenizer
        for row in dm.splits["train"]:
            assert row["prompt_ids"] == enc.encode_ordinary(format_prompt(row["question"], system))
            assert row["prompt_text"] == format_prompt(row["question"], system)
            for column in columns:
                assert row[f"{column}_ids"] == enc.encode_ordinary(format_response(row[column])) + [enc.eot_token]


def test_an_edited_template_file_is_not_served_from_the_tokenisation_cache(tmp_path):
    """``datasets`` caches the tokenised split of a file source; a changed template (here, the
    same file edited) must key a new cache entry (issue 34's review: the old tokens came back)."""
    pairs = tmp_path / "hh.jsonl"
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}
    pairs.write_text("".join(json.dumps({**row, "chosen": row["chosen"] + f" {i}"}) + "\n" for i in range(12)))
    template = tmp_path / "chat.jinja"
    texts = []
    for marker in ("A", "B"):
        eos = "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        template.write_text("{% for m in messages %}" + marker + "{{ m['content'] }}" + eos + "{% endfor %}")
        dm = PreferenceDataModule(source=str(pairs), chat_template=str(template), val_size=2, test_size=2)
        dm.setup()
        texts.append(dm.splits["train"][0]["prompt_text"])
    assert texts[0].startswith("A") and texts[1].startswith("B")


def _prompt_sets(data) -> dict[str, set[str]]:
    return {split: set(rows["prompt_text"]) for split, rows in data.splits.items()}


@pytest.mark.parametrize("kind", ["trl", "judgements", "unpaired"])
def test_held_out_rows_never_share_a_prompt_with_training_rows(tmp_path, kind):
    """30 prompts with 3 pairs each, as the labelling page samples them (every pair of three
    answers): a TRL preference file, a judgement file (one labeller) and KTO's unpaired rows.
    No prompt is in two splits, and the held-out splits hold whole prompts."""
    from shraygpt_rl.data.kto import KTODataModule

    rows = []
    for p in range(30):
        for a, b in ((0, 1), (0, 2), (1, 2)):
            rows.append({"prompt": f"What is {p} + {p}?", "chosen": f"Answer {2 * p} ({a})", "rejected": f"No ({b})"})
    path = tmp_path / "rows.jsonl"
    if kind == "judgements":
        rows = [
            {"type": "judgement", "id": str(n), "item": str(n), "prompt": r["prompt"], "response_a": r["chosen"],
             "response_b": r["rejected"], "shown": "ab", "choice": "A+", "labeller": "ann"}
            for n, r in enumerate(rows)
        ]  # fmt: skip
    if kind == "unpaired":
        rows = [
            {"prompt": r["prompt"], "completion": r[c], "label": c == "chosen"}
            for r in rows
            for c in ("chosen", "rejected")
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = KTODataModule if kind == "unpaired" else PreferenceDataModule
    data = module(source=str(path), tokenizer="byte", val_size=6, test_size=6, max_length=64, max_prompt_length=32)
    data.setup()
    prompts = _prompt_sets(data)
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"] and len(set.union(*prompts.values())) == 30
    per_prompt = 6 if kind == "unpaired" else 3
    assert all(len(data.splits[s]) == per_prompt * len(prompts[s]) for s in prompts)  # whole prompts
    assert len(data.splits["val"]) >= 6 and len(data.splits["test"]) >= 6


def test_with_distinct_prompts_the_carve_is_train_test_splits():
    """Sources whose prompts never repeat (the built-in pairs, most files) keep the splits they had."""
    import datasets

    from shraygpt_rl.data.datamodules import carve

    data = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(50)], "x": list(range(50))})
    rest, held = carve(data, 10, seed=3)
    expected = data.train_test_split(test_size=10, seed=3)
    assert rest["x"] == expected["train"]["x"] and held["x"] == expected["test"]["x"]


def test_one_prompt_for_every_row_falls_back_to_rows_and_says_so(caplog):
    import datasets

    from shraygpt_rl.data.datamodules import carve

    data = datasets.Dataset.from_dict({"prompt": ["same"] * 20, "x": list(range(20))})
    with caplog.at_level(logging.WARNING):
        rest, held = carve(data, 5, seed=0)
    assert len(held) == 5 and len(rest) == 15 and "share prompts with training rows" in caplog.text


def test_the_smallest_file_keeps_training_rows_when_prompts_repeat(tmp_path):
    """Four pairs over two prompts, the least the DataModule takes: training keeps rows (before:
    the test split took one prompt, validation the other, and training was empty)."""
    rows = [{"prompt": f"p{i // 2}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]
    path = tmp_path / "four.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceDataModule(source=str(path), tokenizer="byte", max_length=64, max_prompt_length=32)
    data.setup()
    assert len(data.splits["train"]) >= 1 and sum(len(s) for s in data.splits.values()) == 4
