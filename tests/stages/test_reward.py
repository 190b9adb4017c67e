"""Reward stage: Bradley–Terry training, scoring text, exports that PPO and the reward slot read."""

from __future__ import annotations

import pytest
import torch
from conftest import ARITH, tiny_trainer

from shraygpt_rl.checkpoint import CheckpointError
from shraygpt_rl.data import PreferenceDataModule
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.reward_model import RewardModel, last_token_index
from shraygpt_rl.rewards import LearnedReward
from shraygpt_rl.stages.reward import RewardStage


def test_last_token_index_for_both_paddings():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_reward_model_drops_the_lm_head_and_scores_per_row():
    model = RewardModel(ShrayGPT(**tiny_config())).eval()
    assert not any(name.startswith("trunk.head") for name in model.state_dict())
    ids = torch.randint(0, 257, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        scores, _ = model(ids, mask)
        alone, _ = model(ids[1:2, :7], mask[1:2, :7])
    assert scores.shape == (3,) and torch.allclose(scores[1], alone[0], atol=1e-5)


def test_score_on_text_equals_the_batched_forward(tmp_path):
    data = PreferenceDataModule(**ARITH)
    batch = next(iter(data.val_dataloader()))
    stage = RewardStage(export_path=None)
    stage.model.eval()
    with torch.no_grad():
        chosen, rejected, _ = stage.rewards(batch)
    texts = [
        data.tokenizer.decode(ids[(a - p).bool()].tolist()).removesuffix("<|endoftext|>").strip()
        for ids, a, p in zip(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_prompt_mask"])
    ]
    scored = stage.model.score(batch["prompt"], texts, batch_size=7)
    assert torch.allclose(scored, chosen, atol=1e-5)
    slot = LearnedReward(scorer=stage.model)
    assert torch.allclose(slot(batch["prompt"], texts, [{}] * len(texts)), chosen, atol=1e-5)


SORTING = {**ARITH, "source": "sorting", "digits": 1, "val_size": 128, "test_size": 128}


@pytest.mark.slow
def test_reward_model_learns_held_out_preferences_and_exports(tmp_path):
    """Sorted against shuffled lists: held-out pairwise accuracy from chance to >= 0.85."""
    export = tmp_path / "rm.ckpt"
    stage = RewardStage(export_path=str(export), lr=1e-3, muon_lr=1e-2)
    data = PreferenceDataModule(**SORTING)
    trainer = tiny_trainer(60, limit_val_batches=0, limit_test_batches=4)
    before = trainer.test(stage, datamodule=data, verbose=False)[0]["test/accuracy"]
    trainer.fit(stage, datamodule=data)
    after = trainer.test(stage, datamodule=data, verbose=False)[0]
    assert before < 0.7 and after["test/accuracy"] >= 0.85
    assert {"test/margin", "test/reward_mean", "test/reward_std"} <= set(after)
    loaded = RewardModel.load_from_checkpoint(export).eval()
    assert loaded.tokenizer == "byte" and loaded.pooling == "last"
    batch = next(iter(data.val_dataloader()))
    stage.model.eval()
    with torch.no_grad():
        expected, _, _ = stage.rewards(batch)
        stage.model = loaded
        got, _, _ = stage.rewards(batch)
    assert torch.allclose(expected, got, atol=1e-6)
    by_path = LearnedReward(checkpoint=str(export))
    texts = ["Answer: 1, 2, 3, 4"] * 2
    assert torch.allclose(by_path(["p", "q"], texts, [{}, {}]), loaded.score(["p", "q"], texts))


def test_frozen_trunk_trains_only_the_head():
    stage = RewardStage(export_path=None, freeze_trunk=True, optimizer="adamw", lr=1e-2)
    trunk = {k: v.clone() for k, v in stage.model.trunk.state_dict().items()}
    head = stage.model.value_head.weight.clone()
    tiny_trainer(3, limit_val_batches=0).fit(stage, datamodule=PreferenceDataModule(train_size=64, **ARITH))
    assert all(torch.equal(trunk[k], v) for k, v in stage.model.trunk.state_dict().items())
    assert not torch.equal(head, stage.model.value_head.weight)


def test_mean_pooling_needs_and_uses_the_response():
    model = RewardModel(ShrayGPT(**tiny_config()), pooling="mean").eval()
    ids, mask = torch.randint(0, 257, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    response = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]] * 2)
    with torch.no_grad():
        values, _ = model.values(ids, mask)
        scores, _ = model(ids, mask, response)
    assert torch.allclose(scores, values[:, 4:].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="pooling='mean' needs the response mask"):
        model(ids, mask)


def test_policy_checkpoints_are_not_reward_models(tmp_path):
    ShrayGPT(**tiny_config()).save_checkpoint(tmp_path / "policy.ckpt")
    with pytest.raises(CheckpointError, match="is not a reward-model checkpoint"):
        RewardModel.load_from_checkpoint(tmp_path / "policy.ckpt")


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_the_reward_model_scores_replies_as_its_pairs_were_tokenised(tiny_hf, tmp_path, conversational):
    """``score`` tokenises a reply as training did: in the ChatML template for conversational
    pairs, as standard text (" " + reply, EOS) for standard ones, whatever the tokenizer's
    template (issue 34's review: it took the template's form for both)."""
    import json

    folder = str(tiny_hf("llama", template="chatml"))
    rows = []
    for i in range(12):
        prompt = [{"role": "user", "content": f"Q{i}?"}] if conversational else f"Q{i}?"
        reply = (lambda t: [{"role": "assistant", "content": t}]) if conversational else (lambda t: t)
        rows.append({"prompt": prompt, "chosen": reply(f"yes {i}"), "rejected": reply(f"no {i}")})
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceDataModule(source=str(source), tokenizer="hf", tokenizer_path=folder, val_size=2, test_size=2)
    stage = RewardStage(policy=folder, export_path=None)
    tiny_trainer(1, limit_val_batches=0).fit(stage, datamodule=data)
    row = data.splits["train"][0]
    assert stage.model.reply_ids(data.tokenizer.encoding, row["chosen_response"]) == row["chosen_response_ids"]
