"""GRPO and RLOO stages: on-policy ratio, accumulation, reference handling, options, learning."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import (
    ARITH,
    LEARNING_SEED,
    GradRecorder,
    OtherRank,
    SpreadReward,
    fit_online,
    learned,
    record_rollouts,
    tiny_trainer,
)

from shraygpt_rl.bench import ROOT, demo_data
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.engines import StaticEngine
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.losses import aggregate_loss, clipped_policy_loss, policy_loss
from shraygpt_rl.runner import config_section
from shraygpt_rl.stages import online
from shraygpt_rl.stages.grpo import GRPOStage, RLOOStage

PROMPTS = dict(ARITH, batch_size=4, train_size=64)


def _stage(policy: str, **kwargs) -> GRPOStage:
    defaults = dict(
        policy=policy,
        rewards=[SpreadReward()],
        num_generations=4,
        max_new_tokens=8,
        optimizer="adamw",
        lr=1e-3,
        export_path=None,
        log_samples_every=0,
    )
    return GRPOStage(**{**defaults, **kwargs})


def _fit(stage, max_steps: int, callbacks=()) -> dict[str, float]:
    return fit_online(stage, max_steps, PROMPTS, callbacks)


class StateRecorder(L.Callback):
    """A copy of the policy's state just before each optimizer step."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.states.append({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})


def test_ratio_is_one_at_the_start_of_every_rollout(random_policy):
    """Two passes of two minibatches of two micro-batches each: the ratio starts at exactly 1
    and moves once the policy has been updated."""
    stage = _stage(random_policy, num_iterations=2, num_mini_batches=2, micro_batch_size=4)
    metrics = _fit(stage, max_steps=4)  # one rollout: 2 passes x 2 minibatches
    assert abs(metrics["policy/ratio_at_start"] - 1) < 1e-4
    assert abs(metrics["policy/ratio"] - 1) > 1e-4  # the later minibatches saw an updated policy
    assert metrics["policy/approxkl"] > 0


def test_later_minibatches_are_clipped_against_the_rollout_policy(random_policy, monkeypatch):
    """One pass of two minibatches: the second is evaluated after the first update, so its "old"
    log-probabilities must be the rollout policy's (not its own, detached: a ratio of exactly 1
    and no clipping). Its gradient is checked against the clipped loss computed by hand."""
    grads, states = GradRecorder(), StateRecorder()
    stage = _stage(random_policy, num_mini_batches=2, lr=1e-2, aux_loss_weight=0.0, max_grad_norm=None)
    rollouts = record_rollouts(stage, monkeypatch)
    metrics = _fit(stage, max_steps=2, callbacks=[grads, states])  # one rollout, two updates
    assert metrics["policy/approxkl"] > 0  # the second minibatch's ratio moved off 1

    rollout, rows = rollouts[0], torch.arange(8, 16)  # the first pass is unshuffled: rows 8-15
    stage.policy.load_state_dict(states.states[0])  # the rollout policy
    with torch.no_grad():
        old = stage.response_logprobs(stage.policy, rollout, rows)[0]  # (8, T)
    stage.policy.load_state_dict(states.states[1])  # after the first update
    stage.policy.zero_grad()
    logprobs = stage.response_logprobs(stage.policy, rollout, rows)[0]
    advantages = stage.advantages(rollout.scores)[rows, None]  # (8, 1)
    losses, _, clipped = clipped_policy_loss(logprobs, old, advantages, 0.2)
    aggregate_loss(losses, rollout.response_mask[rows], "dapo").backward()
    assert clipped.sum() > 0  # the check covers the clipped branch too
    for name, param in stage.policy.named_parameters():
        assert torch.allclose(grads.grads[1][f"policy.{name}"], param.grad, atol=1e-6, rtol=1e-4), name


# One loss type per normaliser: per sequence, a constant, the minibatch's tokens (bnpo's count is
# dapo's on one device; test_dapo_normalises_by_the_tokens_of_all_ranks tells them apart), per group.
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "group_token_mean"])
def test_four_accumulated_micro_batches_equal_one_batch(random_policy, loss_type):
    """16 rows as one micro-batch or four accumulated: the same loss and the same gradient, for
    every normaliser (the token count is taken once per minibatch, not per micro-batch), and the
    same token means logged (the responses' lengths differ, so a mean of per-micro-batch means
    weighted by rows would not be)."""
    grads, losses, entropies = [], [], []
    for micro_batch_size in (32, 4):
        recorder = GradRecorder()
        stage = _stage(
            random_policy,
            loss_type=loss_type,
            micro_batch_size=micro_batch_size,
            lr=0.0,
            aux_loss_weight=0.0,
            max_grad_norm=None,
        )
        metrics = _fit(stage, max_steps=1, callbacks=[recorder])
        losses.append(metrics["policy/loss"])
        entropies.append(metrics["objective/entropy"])
        grads.append(recorder.grads[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    assert entropies[1] == pytest.approx(entropies[0], rel=1e-5)
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for name, whole in grads[0].items():
        assert torch.allclose(grads[1][name], whole, atol=1e-6, rtol=1e-4), name


def test_dapo_normalises_by_the_tokens_of_all_ranks(random_policy):
    """Under DDP, dapo divides each rank's token sum by the mean token count over the ranks
    (global tokens / world size), bnpo by this rank's count. A stand-in strategy plays a second
    rank with 30 tokens beside this one's 20."""

    mask = torch.ones(4, 5)  # (rows, T): 20 tokens on this rank
    for loss_type, expected in (("dapo", 25.0), ("bnpo", 20.0)):
        stage = _stage(random_policy, loss_type=loss_type)
        stage.trainer = SimpleNamespace(strategy=OtherRank(30.0))
        assert float(stage.loss_tokens(mask)) == expected


def test_batch_scaled_rewards_use_the_std_of_every_rank(random_policy, monkeypatch):
    """``scale_rewards: batch`` divides by the std of the whole batch: under DDP, every rank's
    rewards. A stand-in ``all_gather`` plays a second rank whose rewards are all 10."""
    stage = _stage(random_policy, scale_rewards="batch", num_generations=2)
    stage.trainer = SimpleNamespace(world_size=2)
    mine = torch.tensor([1.0, 0.0, 0.0, 0.0])  # two prompts of two samples
    monkeypatch.setattr(stage, "all_gather", lambda t: torch.stack([t, torch.full_like(t, 10.0)]))
    everyone = torch.cat([mine, torch.full_like(mine, 10.0)])
    assert stage.advantages(mine).tolist() == pytest.approx(
        [0.5 / (everyone.std().item() + 1e-4), -0.5 / (everyone.std().item() + 1e-4), 0, 0]
    )


def test_entropy_bonus_adds_the_gradient_of_the_entropy(random_policy, monkeypatch):
    """On the same rollout, entropy_coef > 0 changes the gradient by exactly that of
    -entropy_coef x the token mean of the entropy, computed by hand."""
    grads, rollouts = {}, {}
    for coef in (0.0, 0.5):
        recorder = GradRecorder()
        stage = _stage(random_policy, entropy_coef=coef, lr=0.0, aux_loss_weight=0.0, max_grad_norm=None)
        rollouts[coef] = record_rollouts(stage, monkeypatch)
        _fit(stage, max_steps=1, callbacks=[recorder])
        grads[coef] = recorder.grads[0]
    rollout = rollouts[0.5][0]
    assert torch.equal(rollouts[0.0][0].sequences, rollout.sequences)  # seeded: the same samples

    stage.policy.zero_grad()  # lr 0: the policy is still the rollout policy
    entropy = stage.response_logprobs(stage.policy, rollout, torch.arange(len(rollout)), entropy=True)[1]  # (R, T)
    (-0.5 * aggregate_loss(entropy, rollout.response_mask, "dapo")).backward()
    assert any(param.grad.abs().max() > 0 for param in stage.policy.parameters())
    for name, param in stage.policy.named_parameters():
        difference = grads[0.5][f"policy.{name}"] - grads[0.0][f"policy.{name}"]
        assert torch.allclose(difference, param.grad, atol=1e-6, rtol=1e-4), name


def test_group_token_mean_keeps_groups_whole(random_policy):
    """Later passes shuffle whole groups, so every minibatch and micro-batch holds whole groups
    (aggregate_loss refuses any other): two passes of two minibatches train."""
    options = dict(loss_type="group_token_mean", num_iterations=2, num_mini_batches=2, micro_batch_size=4)
    stage = _stage(random_policy, **options)
    orders = set()
    for _ in range(10):
        rows = torch.cat(stage.minibatches(16, 2, shuffle=True)).view(-1, 4)  # (groups, G)
        assert (rows % 4 == torch.arange(4)).all() and (rows // 4 == rows[:, :1] // 4).all()
        orders.add(tuple(rows[:, 0].tolist()))
    assert len(orders) > 1  # shuffled
    metrics = _fit(stage, max_steps=4)
    assert abs(metrics["policy/ratio_at_start"] - 1) < 1e-4 and metrics["policy/approxkl"] > 0


def test_reference_model_only_when_beta_is_positive(random_policy):
    assert _stage(random_policy, beta=0.0).reference is None
    stage = _stage(random_policy, beta=0.1, num_iterations=2)
    assert stage.reference is not None and "reference" not in dict(stage.named_children())
    metrics = _fit(stage, max_steps=3)
    assert 0 < metrics["objective/kl"] < 10  # k3 >= 0, and finite
    assert metrics["objective/rlhf_reward"] < metrics["reward/mean"] + 1e-6


def test_truncated_completions_can_be_left_out(random_policy, monkeypatch):
    """Every completion marked truncated: with masking the loss has nothing to learn from."""
    grads = {}
    for masked in (False, True):
        recorder = GradRecorder()
        stage = _stage(random_policy, mask_truncated_completions=masked, aux_loss_weight=0.0, lr=0.0)
        rollout = stage.rollout

        def all_truncated(*args, rollout=rollout, **kwargs):
            out = rollout(*args, **kwargs)
            out.truncated[:] = True
            return out

        monkeypatch.setattr(stage, "rollout", all_truncated)
        metrics = _fit(stage, max_steps=1, callbacks=[recorder])
        assert metrics["completions/truncated_fraction"] == 1.0
        grads[masked] = max(g.abs().max() for g in recorder.grads[0].values())
    assert grads[False] > 0 and grads[True] == 0


def test_groups_without_signal_are_counted(random_policy):
    stage = _stage(random_policy, rewards=[SpreadReward(constant=True)], lr=0.0)
    metrics = _fit(stage, max_steps=1)
    assert metrics["reward/frac_reward_zero_std"] == 1.0


def test_bad_options_are_refused(random_policy):
    with pytest.raises(ValueError, match="num_generations"):
        _stage(random_policy, num_generations=1)
    with pytest.raises(ValueError, match="num_mini_batches"):
        _fit(_stage(random_policy, num_mini_batches=3), max_steps=1)
    with pytest.raises(ValueError, match="temperature"):
        _stage(random_policy, temperature=0.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        _stage(random_policy, entropy_coef=-0.01)
    with pytest.raises(ValueError, match="micro_batch_size"):
        _stage(random_policy, loss_type="group_token_mean", micro_batch_size=6)
    with pytest.raises(ValueError, match="whole groups"):  # 16 rows in 8 minibatches of 2, with G = 4
        _fit(_stage(random_policy, loss_type="group_token_mean", num_mini_batches=8), max_steps=1)


def test_rloo_baseline_is_the_other_samples_mean(random_policy):
    stage = RLOOStage(policy=random_policy, num_generations=4, export_path=None)
    scores = torch.tensor([1.0, 0.0, 0.0, -1.0, 2.0, 2.0, 2.0, 2.0])
    expected = torch.tensor([4 / 3, 0.0, 0.0, -4 / 3, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(stage.advantages(scores), expected)


# The learning tests' rollouts and thresholds, with each stage's demo config (configs/rloo.yaml),
# its cosine schedule over these rollouts. Gains in the probability of the right answer on the 200
# held-out prompts (``held_out_success``) from each seed's 600-step SFT policy (train.py, one
# thread) at 1 / 2 torch threads: RLOO seed 0 +0.119 / +0.121, seed 1 +0.104 / +0.094, seed 2
# +0.091 / +0.092, seed 3 +0.102 / +0.114, seed 4 +0.060 / +0.059; the least less about a third.
# (At 24 rollouts RLOO fell on seed 3, -0.016: the 20 warm-up steps take most of a short run.)
# GRPO's learning check, with configs/grpo.yaml (DAPO, clip-higher), is the conversational one in
# test_every_format.py: the same stage and settings through TRL's conversational rows. On the
# built-in rows it gained +0.068 to +0.123 over the same seeds and threads.
RLOO_GAIN, RLOO_ROLLOUTS = 0.04, 80


def test_rloo_raises_held_out_success(sft_policy, sft_success, held_out_success):
    """From the noisy SFT policy, 80 rollouts of 16 prompts x 8 (of the 800 configs/rloo.yaml
    takes) raise the probability of the right answer on 200 held-out prompts."""
    config = ROOT / "configs" / "rloo.yaml"
    options = config_section(config, "model")
    options.pop("rewards")  # the YAML's class_path entry: the stage's default, the task verifier
    stage = RLOOStage(**{**options, "policy": sft_policy, "export_path": None, "log_samples_every": 0})
    L.seed_everything(LEARNING_SEED)
    rollouts = demo_data(PromptDataModule, batch_size=16)
    tiny_trainer(RLOO_ROLLOUTS, limit_val_batches=0).fit(stage, datamodule=rollouts)
    after = held_out_success(stage.policy)
    learned(stage.kind, sft_success, after)
    assert after >= sft_success + RLOO_GAIN, (sft_success, after)


def test_the_static_and_eager_engines_take_the_same_step(tiny_hf):
    """The stage never learns which exact engine sampled: on a Hugging Face policy the same
    rollouts give the same gradients, and the rollout/trainer log-probability gap stays at float
    rounding (ShrayGPT's engines: tests/stages/test_online.py)."""
    policy = str(tiny_hf("gpt_neo"))
    grads = {}
    for engine in ("eager", "static"):
        recorder = GradRecorder()
        stage = _stage(policy, rollout_engine=engine, aux_loss_weight=0.0)
        metrics = _fit(stage, max_steps=1, callbacks=[recorder])
        assert metrics["policy/rollout_logprob_gap"] < 1e-5
        grads[engine] = recorder.grads[0]
    for name, grad in grads["eager"].items():
        assert torch.allclose(grads["static"][name], grad, atol=1e-6), name


class Understated(StaticEngine):
    """An inexact engine: the static engine's tokens, with log-probabilities log 4 too low."""

    exact = False

    def generate(self, *args, **kwargs):
        out = super().generate(*args, **kwargs)
        out.logprobs = out.logprobs - math.log(4.0) * out.response_mask
        return out


def test_an_inexact_engines_tokens_get_truncated_importance_weights(random_policy):
    """One on-policy step (ratio 1): each token's weight min(pi_train / pi_rollout, cap) = min(4,
    1.5) scales the policy-gradient loss, so every gradient is 1.5 times the exact engine's."""
    grads = []
    for engine in (StaticEngine(), Understated()):
        recorder = GradRecorder()
        stage = _stage(random_policy, aux_loss_weight=0.0, max_grad_norm=None, rollout_correction_cap=1.5)
        stage.engine = engine
        metrics = _fit(stage, max_steps=1, callbacks=[recorder])
        grads.append(recorder.grads[0])
    assert abs(metrics["policy/rollout_logprob_gap"] - math.log(4.0)) < 1e-4
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], 1.5 * grad, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("truncation", [dict(top_k=5), dict(top_p=0.9)])
def test_an_inexact_engine_refuses_top_k_and_top_p(random_policy, monkeypatch, truncation):
    """vLLM's log-probabilities are of the truncated distribution: its importance weights against
    the untruncated training forward would be the kept mass, not a correction."""
    monkeypatch.setattr(online, "make_engine", lambda name: Understated())
    with pytest.raises(ConfigError, match="leave top_k and top_p unset with it"):
        _stage(random_policy, **truncation)
    _stage(random_policy, top_p=1.0)  # no truncation


def test_every_objective_takes_the_policy_gradient_step_on_policy(random_policy):
    """One optimizer step per rollout: the ratio is exactly 1, where PPO's clip, GSPO's sequence
    ratio, CISPO and SAPO all give the policy gradient: the same gradients, to float rounding."""
    grads = []
    variants = [
        dict(),
        dict(importance_sampling_level="sequence"),
        dict(policy_loss="cispo"),
        dict(policy_loss="sapo"),
    ]
    for variant in variants:
        recorder = GradRecorder()
        stage = _stage(random_policy, loss_type="grpo", aux_loss_weight=0.0, max_grad_norm=None, **variant)
        metrics = _fit(stage, max_steps=1, callbacks=[recorder])
        assert metrics["policy/ratio_at_start"] == pytest.approx(1.0, abs=1e-6) and metrics["policy/clipfrac"] == 0
        grads.append(recorder.grads[0])
    for other in grads[1:]:
        for name, grad in grads[0].items():
            assert torch.allclose(other[name], grad, atol=1e-6, rtol=1e-4), name


def test_a_sequence_ratio_needs_one_mean_per_completion(random_policy):
    with pytest.raises(ConfigError, match="importance_sampling_level sequence needs loss_type grpo"):
        _stage(random_policy, importance_sampling_level="sequence", loss_type="dapo")
    with pytest.raises(ConfigError, match="sapo_temperature_pos and sapo_temperature_neg must be > 0"):
        _stage(random_policy, policy_loss="sapo", sapo_temperature_neg=0.0)


# The newer objectives off-policy: configs/grpo.yaml's settings with two minibatches per rollout
# (the second update is off-policy, where the objectives differ), 80 rollouts. Thresholds: the
# smallest gain over seeds 0-2 at 1 and 2 threads, less a third (docs/benchmarks.md): GSPO
# +0.110 to +0.157, CISPO +0.129 to +0.166, SAPO +0.117 to +0.158.
FAMILY = {
    "gspo": dict(importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4),
    "cispo": dict(policy_loss="cispo"),
    "sapo": dict(policy_loss="sapo", loss_type="grpo"),
}
FAMILY_GAIN = {"gspo": 0.07, "cispo": 0.085, "sapo": 0.075}
FAMILY_ROLLOUTS = 80


@pytest.mark.parametrize("objective", FAMILY)
def test_the_newer_objectives_raise_held_out_success(sft_policy, sft_success, held_out_success, objective):
    """GSPO (its paper's clip range), CISPO and SAPO from the noisy SFT policy: 80 rollouts of 16
    prompts x 8, two updates each, raise the probability of the right answer on 200 held-out prompts."""
    options = config_section(ROOT / "configs" / "grpo.yaml", "model")
    options.pop("rewards")  # the YAML's class_path entry: the stage's default, the task verifier
    overrides = dict(policy=sft_policy, export_path=None, log_samples_every=0, num_mini_batches=2)
    stage = GRPOStage(**{**options, **overrides, **FAMILY[objective]})
    L.seed_everything(LEARNING_SEED)
    rollouts = demo_data(PromptDataModule, batch_size=16)
    tiny_trainer(2 * FAMILY_ROLLOUTS, limit_val_batches=0).fit(stage, datamodule=rollouts)
    after = held_out_success(stage.policy)
    learned(f"grpo-{objective}", sft_success, after)
    assert after >= sft_success + FAMILY_GAIN[objective], (sft_success, after)


def test_the_stage_hands_its_objective_settings_to_the_loss(random_policy, monkeypatch):
    """What the slow learning checks alone would not show: each setting reaches ``policy_loss``
    in its place (SAPO's two temperatures, the two clip ranges, the level and the kind)."""
    from shraygpt_rl.stages import grpo

    calls = []

    def recording(*args, **kwargs):
        calls.append(args[4:])
        return policy_loss(*args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", recording)
    settings = dict(
        policy_loss="sapo", epsilon=0.1, epsilon_high=0.3, sapo_temperature_pos=0.7, sapo_temperature_neg=1.3
    )
    _fit(_stage(random_policy, **settings), max_steps=1)
    assert calls[0] == ("sapo", "token", 0.1, 0.3, (0.7, 1.3))
    with pytest.raises(ConfigError, match="importance_sampling_level must be token or sequence"):
        _stage(random_policy, importance_sampling_level="tokens")
