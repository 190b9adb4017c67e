"""Online stages with tools (multi-turn rollouts): the loss, the KL and the advantages see the
policy's tokens only, the ratio starts at exactly 1, the turn metrics are logged, on ShrayGPT and
on a Hugging Face model with LoRA; bad environments are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import ARITH, Echo, GradRecorder, SpreadReward, fit_online, frequent_byte, record_rollouts

from shraygpt_rl.environments import Environment
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.generation import generate
from shraygpt_rl.losses import aggregate_loss, clipped_policy_loss, gae
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.policy import load_policy
from shraygpt_rl.stages.grpo import GRPOStage, RLOOStage
from shraygpt_rl.stages.online_dpo import OnlineDPOStage
from shraygpt_rl.stages.ppo import PPOStage
from shraygpt_rl.stages.trpo import TRPOStage

PROMPTS = dict(ARITH, batch_size=4, train_size=64)
OBSERVATION = "[ok]"
SAMPLING = dict(max_new_tokens=24, num_generations=4)


def echo(stop: str) -> Echo:
    return Echo(stop, OBSERVATION)


def common_byte(policy) -> str:
    """The printable byte ``policy`` samples most often after the task's prompts."""
    torch.manual_seed(0)
    ids = torch.randint(97, 123, (64, 12))
    return frequent_byte(generate(policy.eval(), ids, 24).responses)


@pytest.fixture(scope="module")
def stop(random_policy) -> str:
    return common_byte(ShrayGPT.load_from_checkpoint(random_policy))


def fed_tokens(rollout) -> torch.Tensor:
    """(R, T) the observation tokens: attended, not the policy's."""
    return rollout.attention_mask[:, rollout.prompt_length :].bool() & ~rollout.response_mask.bool()


def test_grpo_trains_on_the_policys_tokens_only(random_policy, stop, monkeypatch):
    """The step's gradient is the clipped loss over the policy's tokens, computed by hand; with
    the observation tokens counted (a leak), it would differ."""
    grads = GradRecorder()
    stage = GRPOStage(
        policy=random_policy, rewards=[SpreadReward()], environment=echo(stop), optimizer="adamw", lr=0.0,
        aux_loss_weight=0.0, max_grad_norm=None, export_path=None, log_samples_every=0, **SAMPLING,
    )  # fmt: skip
    rollouts = record_rollouts(stage, monkeypatch)
    metrics = fit_online(stage, 1, PROMPTS, [grads])
    rollout = rollouts[0]
    fed = fed_tokens(rollout)
    assert fed.sum() >= 2 * len(OBSERVATION) and metrics["rollout/tool_calls"] > 0
    assert metrics["policy/ratio_at_start"] == 1.0
    assert metrics["rollout/turns"] == pytest.approx(1 + metrics["rollout/tool_calls"])
    for row in range(len(rollout)):  # the unmasked runs are the observations, whole
        text = bytes(rollout.sequences[row, rollout.prompt_length :][fed[row]].tolist()).decode()
        assert text == OBSERVATION * int(rollout.turns["tool_calls"][row])

    def gradient(mask: torch.Tensor) -> list[torch.Tensor]:
        stage.policy.zero_grad()
        rows = torch.arange(len(rollout))
        logprobs = stage.response_logprobs(stage.policy, rollout, rows)[0]
        losses, _, _ = clipped_policy_loss(logprobs, logprobs.detach(), stage.advantages(rollout.scores)[:, None], 0.2)
        aggregate_loss(losses, mask, "dapo").backward()
        return [p.grad.clone() for p in stage.policy.parameters()]

    own = gradient(rollout.response_mask)
    leaked = gradient(rollout.attention_mask[:, rollout.prompt_length :].float())
    recorded = [grads.grads[0][f"policy.{name}"] for name, _ in stage.policy.named_parameters()]
    assert all(torch.allclose(r, g, atol=1e-6, rtol=1e-4) for r, g in zip(recorded, own))
    assert not all(torch.allclose(r, g, atol=1e-6, rtol=1e-4) for r, g in zip(recorded, leaked))


def test_ppo_scores_the_last_policy_token_and_skips_observations(random_policy, stop, monkeypatch):
    stage = PPOStage(
        policy=random_policy, rewards=[SpreadReward()], environment=echo(stop), optimizer="adamw", lr=1e-4,
        export_path=None, log_samples_every=0, max_new_tokens=24, num_mini_batches=1,
    )  # fmt: skip
    rollouts = record_rollouts(stage, monkeypatch)
    metrics = fit_online(stage, 1, dict(PROMPTS, batch_size=8), [])
    assert metrics["policy/ratio_at_start"] == 1.0 and metrics["rollout/tool_calls"] > 0
    rollout = rollouts[0]
    fed, mask = fed_tokens(rollout), rollout.response_mask
    assert fed.any()
    zeros = torch.zeros_like(mask)
    rewards, scores, _ = stage.token_rewards(rollout, zeros, zeros)
    columns = torch.arange(mask.size(1))
    last = (mask.bool() * columns).amax(1)
    assert torch.equal(rewards.nonzero()[:, 1], last[rewards.nonzero()[:, 0]])  # only the last policy token
    values = torch.randn_like(mask)
    advantages, _ = gae(rewards, values, mask, 1.0, 0.95)
    assert (advantages[fed] == 0).all()
    row = int(fed.any(1).nonzero()[0])  # a row with an observation: its first action sees the score
    first = int(mask[row].nonzero()[0])
    acted = mask[row].bool()
    expected = gae(rewards[row, acted][None], values[row, acted][None], torch.ones(1, int(acted.sum())), 1.0, 0.95)[0]
    assert advantages[row, first] == pytest.approx(float(expected[0, 0]), abs=1e-5)


@pytest.mark.parametrize("stage_class", [RLOOStage, TRPOStage, OnlineDPOStage])
def test_the_other_online_stages_take_turns(random_policy, stop, stage_class, monkeypatch):
    """RLOO, TRPO and Online DPO share the rollout: they train with tools and log the turns
    (their losses read ``response_mask``, which GRPO's and PPO's tests above check)."""
    stage = stage_class(
        policy=random_policy, rewards=[SpreadReward()], environment=echo(stop), max_new_tokens=24,
        export_path=None, log_samples_every=0,
        **({"num_generations": 4} if stage_class is not TRPOStage else {}),
    )  # fmt: skip
    rollouts = record_rollouts(stage, monkeypatch)
    trpo = stage_class is TRPOStage  # one sample per prompt, and its critic's steps count: 16 prompts, 1 rollout
    metrics = fit_online(stage, 8 if trpo else 2, dict(PROMPTS, batch_size=16) if trpo else PROMPTS, [])
    assert any(fed_tokens(r).any() for r in rollouts)
    assert metrics["rollout/turns"] == pytest.approx(1 + metrics["rollout/tool_calls"])


def test_a_lora_hugging_face_policy_takes_turns(tiny_hf, monkeypatch):
    from shraygpt_rl.lora import LoRASpec

    folder = str(tiny_hf("gpt_neo"))
    stop = common_byte(load_policy(folder))
    stage = GRPOStage(
        policy=folder, lora=LoRASpec(r=4, alpha=8, dropout=0.0), rewards=[SpreadReward()], environment=echo(stop),
        optimizer="adamw", lr=1e-3, export_path=None, log_samples_every=0, **SAMPLING,
    )  # fmt: skip
    rollouts = record_rollouts(stage, monkeypatch)
    metrics = fit_online(stage, 2, PROMPTS, [])
    assert metrics["policy/ratio_at_start"] == 1.0
    assert any(fed_tokens(r).any() for r in rollouts) and "rollout/max_turns" in metrics


def test_bad_environments_and_turns_are_refused(random_policy):
    class Silent(Environment):
        pass

    with pytest.raises(ConfigError, match="Environment 'silent' has no stop string"):
        GRPOStage(policy=random_policy, environment=Silent(), export_path=None)
    with pytest.raises(ConfigError, match="max_turns must be at least 1, got 0"):
        GRPOStage(policy=random_policy, environment=Echo(), max_turns=0, export_path=None)
