"""GRPO (DeepSeekMath, Shao et al., 2024) with its Dr. GRPO and DAPO variants, and RLOO.

Each prompt is sampled ``num_generations`` times; a sample's advantage is its reward relative to
its group (no critic). The loss is PPO's clipped objective per token, optionally plus
``beta * k3`` KL to the reference (DeepSeekMath eq. 4) and minus ``entropy_coef`` times the
entropy (PPO's bonus; seed notebook 000 uses one, with ``ent_coef`` 0.01), aggregated by
``loss_type``:

* ``grpo``: mean over each completion's tokens, then over completions (the paper);
* ``bnpo``: mean over the tokens of each minibatch on this rank (TRL's ``bnpo``: the local
  batch's tokens);
* ``dapo``: mean over all tokens of the minibatch on all DDP ranks together (DAPO, eq. 8; TRL's
  ``num_items_in_batch``), with clip-higher ``epsilon_high`` (DAPO §3.1). On one device it is
  ``bnpo``;
* ``dr_grpo``: sum over tokens divided by ``completions * max_new_tokens``, a constant, and
  ``scale_rewards="none"`` (Liu et al., 2025: no length or std normalisation);
* ``group_token_mean``: mean over all tokens of each group (the G completions of one prompt),
  then over groups (seed notebook 000's aggregation). Minibatches and micro-batches hold whole
  groups, and the passes after the first shuffle whole groups.

Every loss type is additive over micro-batches: the loss and its gradient do not depend on
``micro_batch_size``.

The per-token objective is PPO's clip by default; ``importance_sampling_level: sequence`` clips
one ratio per completion (GSPO, Zheng et al., 2025), ``policy_loss: cispo`` clips and detaches the
importance weight instead of the update (MiniMax-M1, 2025) and ``policy_loss: sapo`` replaces the
clip with a smooth gate (Gao et al., 2025); the formulas are ``losses.policy_loss``'s. Their
clipped or gated share of tokens is ``policy/clipfrac``.

Departures from the papers, as in TRL: with one optimizer step per rollout
(``num_iterations * num_mini_batches == 1``) the "old" log-probabilities are the current ones
detached (the ratio is exactly 1 and a forward pass is saved); with more, they are computed
once before the first update, so that every later minibatch, evaluated after an update, is
clipped against the rollout policy. The KL uses the k3 estimator in the loss rather than in the
reward. RLOO (Ahmadian et al., 2024) is the same machinery with the leave-one-out baseline and
unscaled advantages.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import Tensor

from shraygpt_rl.errors import require
from shraygpt_rl.losses import (
    GRPOLossType,
    ImportanceSamplingLevel,
    PolicyLoss,
    ScaleRewards,
    aggregate_loss,
    group_advantages,
    kl_estimate,
    masked_sum,
    policy_loss,
    rloo_advantages,
)
from shraygpt_rl.stages.online import MicroStep, OnlineRLStage, Rollout, policy_metrics


class GRPOStage(OnlineRLStage):
    """Group-relative policy optimisation.

    Args:
        num_generations: Completions per prompt (the group size G).
        scale_rewards: ``group`` (DeepSeekMath), ``batch``, or ``none`` (Dr. GRPO).
        loss_type: ``grpo``, ``dr_grpo``, ``dapo``, ``bnpo`` or ``group_token_mean`` (see the
            module docstring). ``group_token_mean`` needs ``micro_batch_size`` and the minibatch
            size (``batch_size * num_generations / num_mini_batches``) to be multiples of
            ``num_generations``.
        epsilon: Lower clip range of the ratio.
        epsilon_high: Upper clip range; None means ``epsilon`` (DAPO uses 0.28). For ``cispo``, the
            importance weight's cap is ``1 + epsilon_high``.
        importance_sampling_level: ``token`` (GRPO's ratio per token) or ``sequence`` (GSPO: the
            geometric mean of a completion's token ratios, clipped per completion; the paper's
            clip range is far narrower, 3e-4 and 4e-4). ``sequence`` needs ``loss_type: grpo``,
            a mean per completion: a token sum would count a completion's one ratio once per token.
        policy_loss: ``clip`` (PPO's clipped surrogate), ``cispo`` (MiniMax-M1: the clipped
            importance weight, detached, times ``log pi``: every token keeps its gradient) or
            ``sapo`` (a smooth gate in place of the clip; see ``losses.policy_loss``).
        sapo_temperature_pos: SAPO's gate temperature for positive advantages (the paper's 1.0).
        sapo_temperature_neg: ... and for the others (1.05: negative updates decay faster).
        beta: Weight of the k3 KL to the reference; at 0 no reference model is built.
        entropy_coef: Weight of the entropy bonus, as PPO's: ``entropy_coef`` times each token's
            entropy is subtracted from its loss before aggregation; 0 turns it off (seed
            notebook 000 uses 0.01).
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
        importance_sampling_level: ImportanceSamplingLevel = "token",
        policy_loss: PolicyLoss = "clip",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        beta: float = 0.0,
        entropy_coef: float = 0.0,
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
        require(
            importance_sampling_level in ("token", "sequence") and policy_loss in ("clip", "cispo", "sapo"),
            f"importance_sampling_level must be token or sequence and policy_loss clip, cispo or sapo; got "
            f"{importance_sampling_level} and {policy_loss}.",
        )
        require(
            importance_sampling_level == "token" or loss_type == "grpo",
            f"importance_sampling_level sequence needs loss_type grpo (one mean per completion, as GSPO's objective "
            f"is); loss_type {loss_type} would count a completion's single ratio once per token.",
        )
        require(
            sapo_temperature_pos > 0 and sapo_temperature_neg > 0,
            "sapo_temperature_pos and sapo_temperature_neg must be > 0.",
        )
        require(entropy_coef >= 0, f"entropy_coef must be >= 0, got {entropy_coef}.")
        require(num_iterations >= 1, f"num_iterations must be at least 1, got {num_iterations}.")
        require(num_mini_batches >= 1, f"num_mini_batches must be at least 1, got {num_mini_batches}.")
        micro_batch_size = kwargs.get("micro_batch_size")
        require(
            loss_type != "group_token_mean" or not micro_batch_size or micro_batch_size % num_generations == 0,
            f"loss_type group_token_mean needs micro_batch_size ({micro_batch_size}) to be a multiple of "
            f"num_generations ({num_generations}).",
        )
        super().__init__(export_path=export_path, **kwargs)
        self.frozen_reference(self.policy if beta > 0 else None)

    def trainable(self):
        return self.policy

    def check_data(self, datamodule) -> None:
        super().check_data(datamodule)
        self.check_minibatches(datamodule.hparams.batch_size * self.hparams.num_generations)

    def optimizer_steps_per_rollout(self) -> int:
        return self.hparams.num_iterations * self.hparams.num_mini_batches

    def check_minibatches(self, rows: int) -> None:
        """A rollout of ``rows`` must split into ``num_mini_batches`` equal minibatches, and for
        ``group_token_mean`` into minibatches of whole groups."""
        super().check_minibatches(rows)
        hp = self.hparams
        require(
            hp.loss_type != "group_token_mean" or (rows // hp.num_mini_batches) % hp.num_generations == 0,
            f"loss_type group_token_mean needs minibatches of whole groups, but {rows} rows in num_mini_batches="
            f"{hp.num_mini_batches} are not a multiple of num_generations={hp.num_generations} each; change either.",
        )

    def minibatches(self, n_rows: int, num_mini_batches: int, shuffle: bool) -> list[Tensor]:
        """As ``OnlineRLStage.minibatches``, but for ``group_token_mean`` a shuffle moves whole
        groups (each prompt's G consecutive rows), so that no minibatch splits a group."""
        G = self.hparams.num_generations
        if not shuffle or self.hparams.loss_type != "group_token_mean":
            return super().minibatches(n_rows, num_mini_batches, shuffle)
        self.check_minibatches(n_rows)
        groups = torch.randperm(n_rows // G, device=self.device)  # (R / G,)
        order = (groups[:, None] * G + torch.arange(G, device=self.device)).flatten()  # (R,)
        return list(order.chunk(num_mini_batches))

    def advantages(self, scores: torch.Tensor) -> torch.Tensor:
        G = self.hparams.num_generations
        if self.advantage_estimator == "rloo":
            return rloo_advantages(scores, G)
        scale = self.hparams.scale_rewards
        # ``batch``: the std of the whole batch, every rank's rewards (one rank's alone under DDP).
        everyone = self.all_gather(scores).flatten() if scale == "batch" and self._trainer else None
        return group_advantages(scores, G, scale, batch_rewards=everyone)

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

        # Old log-probabilities, needed as soon as a rollout feeds more than one optimizer step
        # (every step after the first sees an updated policy), and reference log-probabilities.
        first = self.minibatches(len(rollout), hp.num_mini_batches, shuffle=False)
        one_step = hp.num_iterations * hp.num_mini_batches == 1
        old_logprobs = None if one_step else self.logprobs_under(self.policy, rollout, first)
        ref_logprobs = None if self.reference is None else self.logprobs_under(self.reference_model(), rollout, first)

        # num_iterations passes of num_mini_batches updates.
        buffer = dict(mask=mask, advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
        stats = [self.update(rollout, rows, buffer) for rows in self.passes(first, hp.num_iterations)]
        self.log_stats(stats, rollout)
        self.log_update(time.perf_counter() - start, float(rollout.attention_mask.sum()) * hp.num_iterations)

    def update(self, rollout: Rollout, rows: Tensor, buffer: dict) -> dict[str, Tensor]:
        """One optimizer step over the minibatch ``rows``; its token count is taken once, before
        its micro-batches (under DDP, ``dapo``'s is a collective)."""
        num_tokens = self.loss_tokens(buffer["mask"][rows])
        return self.policy_update(rows, lambda micro, rows: self.loss(rollout, micro, rows, buffer, num_tokens))

    def loss_tokens(self, mask: Tensor) -> Tensor:
        """The token count that normalises the ``bnpo`` and ``dapo`` losses of a minibatch whose
        tokens on this rank are ``mask`` (rows, T).

        ``bnpo``: this rank's count. ``dapo``: the count over all ranks divided by their number.
        DDP averages the ranks' gradients, so with each rank's loss ``sum_rank / global_tokens *
        world_size`` the average is the gradient of one token mean over the whole minibatch
        (DAPO eq. 8). On one device the two are the same.
        """
        tokens = mask.sum()
        if self.hparams.loss_type == "dapo":  # the mean over ranks: global_tokens / world_size
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="mean")
        return tokens

    def loss(self, rollout: Rollout, micro: Tensor, rows: Tensor, buffer: dict, num_tokens: Tensor) -> MicroStep:
        """The micro-batch ``micro``'s part of the loss of the minibatch ``rows``: the clipped
        objective per token (plus ``beta`` x k3 KL, minus ``entropy_coef`` x entropy), aggregated
        by ``loss_type`` (``num_tokens``: the minibatch's count, from ``loss_tokens``), plus its
        share of the MoE aux loss."""
        hp, mask = self.hparams, buffer["mask"][micro]
        bonus = hp.entropy_coef > 0
        logprobs, entropy, aux_loss = self.response_logprobs(self.policy, rollout, micro, entropy=bonus)  # (r, T)
        # One optimizer step per rollout: the "old" policy is the current one, detached (ratio exactly 1).
        old = logprobs.detach() if buffer["old_logprobs"] is None else buffer["old_logprobs"][micro]
        losses, ratio, clipped = policy_loss(
            logprobs,
            old,
            buffer["advantages"][micro],
            mask,
            hp.policy_loss,
            hp.importance_sampling_level,
            hp.epsilon,
            hp.epsilon_high,
            (hp.sapo_temperature_pos, hp.sapo_temperature_neg),
        )
        weights, gap = self.rollout_correction(rollout, micro, old, mask)
        if weights is not None:  # tokens sampled by an engine with other log-probabilities (vLLM)
            losses = losses * weights
        kl = None
        if buffer["ref_logprobs"] is not None:  # DeepSeekMath eq. 4: the k3 estimator, in the loss
            kl = kl_estimate(logprobs, buffer["ref_logprobs"][micro], "k3", mask)
            losses = losses + hp.beta * kl
        if bonus:  # PPO's bonus: the entropy of each token's whole next-token distribution
            losses = losses - hp.entropy_coef * entropy
        loss = aggregate_loss(
            losses,
            mask,
            hp.loss_type,
            max_length=hp.max_new_tokens,
            num_sequences=len(rows),
            num_tokens=num_tokens,
            group_size=hp.num_generations,
        )
        share = len(micro) / len(rows)
        token_metrics = policy_metrics(logprobs, old, ratio, clipped, mask)
        if gap is not None:
            token_metrics["policy/rollout_logprob_gap"] = gap
        metrics = {"policy/loss": loss.detach() / share, "moe/aux_loss": aux_loss.detach()}
        if kl is not None:  # per response, in nats, as PPO reports it
            metrics["objective/kl"] = masked_sum(kl.detach(), mask) / len(micro)
        loss = loss + self.aux_weight(self.policy) * aux_loss * share
        return MicroStep(loss, ratio, mask, metrics, token_metrics)

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
