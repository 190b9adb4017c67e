"""Held-out evaluation and its report: figures by hand against the policies' own samples.

The eval and pipeline commands themselves run in tests/test_documented_commands.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import ARITH

from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.evaluate import (
    evaluate_policy,
    majority_correct,
    pass_at_k,
    response_logprobs,
    sample_responses,
)
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.report import _smooth, latest_run, table


class LengthScorer:
    """A stand-in reward model: longer responses score higher."""

    def score(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


@pytest.fixture
def prompts():
    return PromptDataModule(**{**ARITH, "test_size": 24, "batch_size": 10})


def test_kl_and_win_rate_by_hand(prompts):
    torch.manual_seed(0)
    policy, reference = ShrayGPT(**tiny_config()), ShrayGPT(**tiny_config())
    report = evaluate_policy(policy, prompts, reference=reference, reward_model=LengthScorer(), max_new_tokens=6)
    ours = sample_responses(policy, prompts, max_new_tokens=6, seed=0)
    theirs = sample_responses(reference, prompts, max_new_tokens=6, seed=1)
    # KL: the mean over the policy's samples of log pi(y) - log pi_ref(y); log pi(y) is also what
    # generation recorded while sampling
    sampled = torch.cat([b.logprobs.sum(1) for b in ours.batches])
    assert torch.allclose(response_logprobs(policy, ours), sampled, atol=1e-4)
    expected_kl = (sampled - response_logprobs(reference, ours)).mean().item()
    assert report["kl_to_reference"] == pytest.approx(expected_kl, abs=1e-4)
    mine, other = torch.tensor([len(t) for t in ours.texts]), torch.tensor([len(t) for t in theirs.texts])
    wins = ((mine > other).float() + 0.5 * (mine == other).float()).mean().item()
    assert report["win_rate"] == pytest.approx(wins)
    assert report["success"] == 0.0 and report["mean_reward"] == -1.0  # a random model never answers
    assert report["prompts"] == 24 and len(report["samples"]) == 4
    assert report["samples"][0]["reference_response"] == theirs.texts[0]


def test_a_policy_against_itself_has_no_kl(prompts):
    torch.manual_seed(0)
    policy = ShrayGPT(**tiny_config())
    report = evaluate_policy(policy, prompts, reference=policy, max_new_tokens=6)
    assert report["kl_to_reference"] == 0.0 and report["win_rate"] is None


def test_report_helpers_by_hand(tmp_path):
    assert _smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    (tmp_path / "version_2").mkdir()
    (tmp_path / "version_10").mkdir()
    assert latest_run(tmp_path).name == "version_10"
    text = table({"SFT": {"success": 0.5, "win_rate": None}}, ("success", "win_rate"))
    assert text.splitlines()[2].split() == ["SFT", "0.500", "-"]


def test_demonstrations_split_into_left_padded_prompts_and_answers():
    from shraygpt_rl.evaluate import split_demonstrations

    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 0], [3, 4, 1, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]),
        "loss_mask": torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0]]),
    }
    ids, mask, answers = split_demonstrations(batch, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 3]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert answers == [[8, 9], [4, 1, 2]]  # the EOS (0 here) is not part of the reference text


def test_demonstration_scores_by_hand(tiny_model):
    """Perplexity is exp of the mean answer-token NLL over all batches; a policy that answers with
    the reference text scores ROUGE-L 1, one that answers nothing 0."""
    from shraygpt_rl.evaluate import DemonstrationScores
    from shraygpt_rl.losses import next_token_loss
    from shraygpt_rl.tokenizer import get_tokenizer

    enc = get_tokenizer("byte")
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, 10))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "loss_mask": (torch.arange(10) >= 6).long().expand(3, 10),
    }
    scores = DemonstrationScores(max_new_tokens=0)
    with torch.no_grad():
        logits, _, _ = tiny_model(ids)
    scores.update(tiny_model, batch, enc, logits)
    expected = math.exp(next_token_loss(logits, ids, batch["loss_mask"]).item())
    assert scores.compute()["perplexity"] == pytest.approx(expected, rel=1e-5)

    rouge = DemonstrationScores(max_new_tokens=4)
    rouge.rouge.update(["the cat sat"], ["the cat sat"])
    rouge.rouge.update(["dog"], ["the cat sat"])
    assert float(rouge.rouge.compute()["rougeL_fmeasure"]) == pytest.approx(0.5)


def test_reward_model_success_is_the_share_scored_above_zero(tiny_model):
    """Seed 003's evaluate_model: the fraction of responses the reward model scores above 0."""

    class Scorer:
        def score(self, prompts, responses):
            return torch.tensor([1.0 if i % 4 == 0 else (0.0 if i % 4 == 1 else -2.0) for i in range(len(responses))])

    data = PromptDataModule(**{**ARITH, "test_size": 12, "batch_size": 12})
    data.setup()
    report = evaluate_policy(tiny_model, data, reward_model=Scorer(), max_new_tokens=2)
    assert report["reward_model_success"] == pytest.approx(3 / 12)  # 0 is not above 0


def test_pass_at_k_by_hand_and_against_every_draw():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 4, 2) == 1.0
    for n in range(1, 8):  # the share of all k-subsets of the n samples that hold a correct one
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, draws)) / len(draws), abs=1e-12)
    assert 0 < pass_at_k(1000, 1, 500) < 1  # no factorial overflow
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 2)


def test_majority_vote_by_hand():
    assert majority_correct(["12", "13", "12", None], "12")
    assert not majority_correct(["13", "12"], "12")  # a tie goes to the answer seen first
    assert majority_correct(["12", "13"], "12")
    assert not majority_correct([None, None], "12") and not majority_correct([], "12")
    assert not majority_correct(["13", None, None, "12", "13"], "12")
