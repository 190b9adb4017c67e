"""Held-out evaluation and its report: figures by hand against the policies' own samples.

The eval and pipeline commands themselves run in tests/test_documented_commands.py."""

from __future__ import annotations

import pytest
import torch
from conftest import ARITH

from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.evaluate import evaluate_policy, response_logprobs, sample_responses
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
