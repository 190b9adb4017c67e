"""GRPO (DeepSeekMath, Shao et al., 2024) with its Dr. GRPO and DAPO variants, and RLOO.

Each prompt is sampled ``num_generations`` times; a sample's advantage is its reward relative to
its group (no critic). The loss is PPO's clipped objective per token, optionally plus
``beta * k3`` KL to the reference (DeepSeekMath eq. 4), aggregated by ``loss_type``:

* ``grpo``: mean over each completion's tokens, then over completions (the paper);
* ``bnpo``: mean over the tokens of each micro-batch;
* ``dapo``: mean over all tokens of the minibatch (DAPO, eq. 8), with clip-higher
  ``epsilon_high`` (DAPO §3.1);
* ``dr_grpo``: sum over tokens divided by ``completions * max_new_tokens``, a constant, and
  ``scale_rewards="none"`` (Liu et al., 2025: no length or std normalisation).

Departures from the papers, as in TRL: with ``num_iterations=1`` the "old" log-probabilities are
the current ones detached (the ratio is exactly 1 and a forward pass is saved), and the KL uses
the k3 estimator in the loss rather than in the reward. RLOO (Ahmadian et al., 2024) is the same
machinery with the leave-one-out baseline and unscaled advantages.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import Tensor

from shraygpt_rl.errors import require
from shraygpt_rl.losses import (
    GRPOLossType,
    ScaleRewards,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    kl_estimate,
    masked_sum,
    rloo_advantages,
)
from shraygpt_rl.stages.online import MicroStep, OnlineRLStage, Rollout, policy_metrics


class GRPOStage(OnlineRLStage):
    """Group-relative policy optimisation.

    Args:
        num_generations: Completions per prompt (the group size G).
        scale_rewards: ``group`` (DeepSeekMath), ``batch``, or ``none`` (Dr. GRPO).
        loss_type: ``grpo``, ``dr_grpo``, ``dapo`` or ``bnpo`` (see the module docstring).
        epsilon: Lower clip range of the ratio.
        epsilon_high: Upper clip range; None means ``epsilon`` (DAPO uses 0.28).
        beta: Weight of the k3 KL to the reference; at 0 no reference model is built.
        num_iterations: Optimisation passes over each rollout batch.
        num_mini_batches: Optimizer steps per pass.
        mask_truncated_completions: Leave completions that never reached EOS out of the loss.
        export_path: Where the trained policy is written at the end.
        **kwargs: ``OnlineRLStage``'s arguments.
    """

    kind = "grpo"
    advantage_estimator: Literal["group", "rloo"] = "group"

    def __init__(
        self,
        num_generations: int = 8,
        scale_rewards: ScaleRewards = "group",
        loss_type: GRPOLossType = "dapo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        num_mini_batches: int = 1,
        mask_truncated_completions: bool = False,
        export_path: str | None = "checkpoints/shraygpt-grpo.ckpt",
        **kwargs,
    ):
        require(
            num_generations >= 2, f"num_generations must be at least 2 for a group baseline, got {num_generations}."
        )
        require(epsilon > 0 and (epsilon_high is None or epsilon_high > 0), "epsilon and epsilon_high must be > 0.")
        require(beta >= 0, f"beta must be >= 0, got {beta}.")
        require(num_iterations >= 1, f"num_iterations must be at least 1, got {num_iterations}.")
        require(num_mini_batches >= 1, f"num_mini_batches must be at least 1, got {num_mini_batches}.")
        super().__init__(export_path=export_path, **kwargs)
        self.frozen_reference(self.policy if beta > 0 else None)

    def trainable(self):
        return self.policy

    def check_data(self, datamodule) -> None:
        super().check_data(datamodule)
        self.check_minibatches(datamodule.hparams.batch_size * self.hparams.num_generations)

    def advantages(self, scores: torch.Tensor) -> torch.Tensor:
        G = self.hparams.num_generations
        if self.advantage_estimator == "rloo":
            return rloo_advantages(scores, G)
        return group_advantages(scores, G, self.hparams.scale_rewards)

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        rollout = self.rollout(batch, repeats=hp.num_generations)
        self.log_rollout(rollout)
        start = time.perf_counter()

        # One advantage per completion, from its group; the tokens that count.
        advantages = self.advantages(rollout.scores)[:, None]  # (R, 1)
        mask = rollout.response_mask.clone()
        if hp.mask_truncated_completions:
            mask[rollout.truncated] = 0

        # Old log-probabilities (only needed with several passes) and reference log-probabilities.
        first = self.minibatches(len(rollout), hp.num_mini_batches, shuffle=False)
        old_logprobs = self.logprobs_under(self.policy, rollout, first) if hp.num_iterations > 1 else None
        ref_logprobs = None if self.reference is None else self.logprobs_under(self.reference_model(), rollout, first)

        # num_iterations passes of num_mini_batches updates.
        buffer = dict(mask=mask, advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
        stats = [
            self.policy_update(rows, lambda micro, rows: self.loss(rollout, micro, rows, buffer))
            for rows in self.passes(first, hp.num_iterations)
        ]
        self.log_stats(stats, rollout)
        self.log_update(time.perf_counter() - start, float(rollout.attention_mask.sum()) * hp.num_iterations)

    def loss(self, rollout: Rollout, micro: Tensor, rows: Tensor, buffer: dict) -> MicroStep:
        """The micro-batch ``micro``'s part of the loss of the minibatch ``rows``: the clipped
        objective per token (plus ``beta`` x k3 KL), aggregated by ``loss_type``, plus its share
        of the MoE aux loss."""
        hp, mask = self.hparams, buffer["mask"][micro]
        logprobs, _, aux_loss = self.response_logprobs(self.policy, rollout, micro)  # (r, T)
        # One pass: the "old" policy is the current one, detached (the ratio is exactly 1).
        old = logprobs.detach() if buffer["old_logprobs"] is None else buffer["old_logprobs"][micro]
        losses, ratio, clipped = clipped_policy_loss(
            logprobs, old, buffer["advantages"][micro], hp.epsilon, hp.epsilon_high
        )
        kl = None
        if buffer["ref_logprobs"] is not None:  # DeepSeekMath eq. 4: the k3 estimator, in the loss
            kl = kl_estimate(logprobs, buffer["ref_logprobs"][micro], "k3")
            losses = losses + hp.beta * kl
        minibatch_tokens = None if hp.loss_type == "bnpo" else buffer["mask"][rows].sum()
        loss = aggregate_loss(
            losses,
            mask,
            hp.loss_type,
            max_length=hp.max_new_tokens,
            num_sequences=len(rows),
            num_tokens=minibatch_tokens,
        )
        share = len(micro) / len(rows)
        metrics = policy_metrics(logprobs, old, ratio, clipped, mask)
        metrics["policy/loss"] = loss.detach() / share
        metrics["moe/aux_loss"] = aux_loss.detach()
        if kl is not None:  # per response, in nats, as PPO reports it
            metrics["objective/kl"] = masked_sum(kl.detach(), mask) / len(micro)
        return MicroStep(loss + self.aux_weight(self.policy) * aux_loss * share, ratio, mask, metrics)

    def log_stats(self, stats: list[dict], rollout: Rollout) -> None:
        mean = self.mean_of_updates(stats)
        grouped = rollout.scores.view(-1, self.hparams.num_generations)
        mean["reward/frac_reward_zero_std"] = (grouped.std(dim=1) < 1e-6).float().mean()
        mean["objective/scores"] = rollout.scores.mean()
        mean["objective/rlhf_reward"] = rollout.scores.mean() - self.hparams.beta * mean.get("objective/kl", 0.0)
        self.log_step(mean)


class RLOOStage(GRPOStage):
    """REINFORCE leave-one-out (Ahmadian et al., 2024): GRPO's machinery with each completion's
    baseline the mean reward of the other completions of its prompt, and no std scaling."""

    kind = "rloo"
    advantage_estimator = "rloo"

    def __init__(
        self, export_path: str | None = "checkpoints/shraygpt-rloo.ckpt", loss_type: GRPOLossType = "grpo", **kwargs
    ):
        super().__init__(export_path=export_path, loss_type=loss_type, **kwargs)
