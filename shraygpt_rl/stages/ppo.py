"""PPO with a learned critic, the InstructGPT recipe (Ouyang et al., 2022) as laid out in
"The N implementation details of RLHF with PPO" (Huang et al., 2024).

One step: sample one response per prompt, score it, and give every response token the reward
``-kl_coef * KL_t`` against the frozen reference, plus the score at the last token (Ziegler et
al., 2019, eq. 2). GAE turns rewards and the critic's values into advantages, which are whitened.
Then ``num_ppo_epochs`` passes of ``num_mini_batches`` minibatches minimise the clipped policy
loss plus ``vf_coef`` times the clipped value loss (Schulman et al., 2017, eq. 7 and 9), plus,
with ``ptx_coef > 0``, PPO-ptx's next-token loss on demonstrations (InstructGPT eq. 2).
``CriticStage`` holds what TRPO shares with PPO: the critic, the per-token rewards and GAE.

Departures from the papers: the policy and the critic share one optimizer (their parameters are
disjoint, as with TRL's policy-and-value wrapper); dropout is off; the first epoch visits the
minibatches unshuffled, so that the first minibatch is evaluated exactly as the rollout's
log-probabilities were and the importance ratio starts at 1; ``target_kl`` stops the remaining
minibatches as soon as one exceeds it (Spinning Up stops at 1.5x the target).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from shraygpt_rl.checkpoint import stamp, stamped
from shraygpt_rl.errors import ConfigError, require
from shraygpt_rl.lora import LoRASpec, share_frozen
from shraygpt_rl.losses import (
    AdaptiveKLController,
    KLEstimator,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_sum,
    next_token_loss,
    whiten,
)
from shraygpt_rl.policy import with_lora
from shraygpt_rl.reward_model import RewardModel
from shraygpt_rl.stages.base import disable_dropout
from shraygpt_rl.stages.online import MicroStep, OnlineRLStage, Rollout, policy_metrics, split_ptx


class CriticStage(OnlineRLStage):
    """What PPO and TRPO share: one sampled response per prompt, a critic, the per-token KL
    penalty in the reward, GAE and whitened advantages, and the adaptive KL coefficient.

    Args:
        critic_init: Start the critic from the ``reward_model`` checkpoint or from the ``policy``;
            None: the reward model when one is given, else the policy.
        kl_coef: Weight of the per-token KL penalty in the reward (the start value when adaptive).
        kl_estimator: ``k1`` (the InstructGPT reward), ``k2``, ``k3`` (always >= 0) or ``abs``.
        adaptive_kl: Adapt ``kl_coef`` to keep the KL near ``kl_target`` (Ziegler et al., 2019).
        kl_target: Target KL per response, in nats, for the adaptive controller.
        kl_horizon: Horizon of the adaptive controller, in samples.
        gamma: Discount of GAE.
        lam: GAE's lambda.
        cliprange_value: Clip range of the value change.
        num_mini_batches: Optimizer steps per pass over a rollout.
        missing_eos_penalty: Subtracted from the score of responses cut off at ``max_new_tokens``.
        reward_clip: Clip scores to ``[-reward_clip, reward_clip]``; None for no clipping.
        whiten_rewards: Whiten the per-token rewards (keeping their mean) before GAE.
        critic_warmup: Rollouts at the start on which only the critic learns (verl has the same
            idea, counted in steps); the adaptive KL coefficient holds still meanwhile. A fresh
            critic, or one started from the reward model (which has seen whole responses only),
            is far from the returns on prefixes at first: its advantages are large noise that
            moves the policy, and moves tokens that did not decide the reward, before the critic
            has learned anything. PPO's critic learns at the full ``lr`` meanwhile, and its
            schedule (``warmup_steps``, then the cosine) starts at the first policy update, after
            ``critic_warmup x num_ppo_epochs x num_mini_batches`` steps; TRPO's critic follows
            its schedule from the first step.
        **kwargs: ``OnlineRLStage``'s arguments.
    """

    def __init__(
        self,
        critic_init: Literal["reward_model", "policy"] | None = None,
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange_value: float = 0.2,
        num_mini_batches: int = 1,
        missing_eos_penalty: float | None = None,
        reward_clip: float | None = None,
        whiten_rewards: bool = False,
        critic_warmup: int = 0,
        **kwargs,
    ):
        require(
            kl_coef >= 0 and kl_target > 0 and kl_horizon >= 1, "kl_coef must be >= 0, kl_target and kl_horizon > 0."
        )
        require(0 <= gamma <= 1 and 0 <= lam <= 1, f"gamma and lam must be in [0, 1], got {gamma} and {lam}.")
        require(cliprange_value > 0, f"cliprange_value must be > 0, got {cliprange_value}.")
        require(num_mini_batches >= 1, f"num_mini_batches must be at least 1, got {num_mini_batches}.")
        require(reward_clip is None or reward_clip > 0, f"reward_clip must be > 0 (or null), got {reward_clip}.")
        require(critic_warmup >= 0, f"critic_warmup must be >= 0, got {critic_warmup}.")
        super().__init__(**kwargs)
        self.critic = self.build_critic(critic_init)
        self.frozen_reference(self.policy if kl_coef > 0 or adaptive_kl else None)
        self.kl_ctl = AdaptiveKLController(kl_coef, kl_target, kl_horizon)

    @property
    def warming_up(self) -> bool:
        """Whether this rollout trains the critic alone (one of the first ``critic_warmup``)."""
        return 0 < self.rollouts <= self.hparams.critic_warmup

    def build_critic(self, critic_init) -> RewardModel:
        """The critic: a scalar head on the reward model's trunk or on the policy's. With LoRA it
        has its own adapters (seed 001's critic), and a policy-initialised critic shares the
        policy's frozen base weights instead of copying them."""
        reward_model, spec = self.hparams.reward_model, LoRASpec.parse(self.hparams.lora)
        if critic_init == "reward_model" and not reward_model:
            raise ConfigError("critic_init='reward_model' needs --model.reward_model (a reward-model checkpoint).")
        if reward_model and critic_init != "policy":
            critic = RewardModel.load_from_checkpoint(reward_model)
            if critic.trunk.config["vocab_size"] != self.policy.config["vocab_size"]:
                raise ConfigError("The reward model's vocabulary differs from the policy's; it cannot be the critic.")
            if spec and not getattr(critic.trunk, "lora", None):  # a LoRA reward model brings its own
                with_lora(critic.trunk, spec)
        else:
            critic = RewardModel(share_frozen(self.policy) if spec else copy.deepcopy(self.policy))
        return disable_dropout(critic)

    def check_data(self, datamodule) -> None:
        super().check_data(datamodule)
        self.check_minibatches(datamodule.hparams.batch_size)

    def critic_values(self, rollout: Rollout, rows: Tensor) -> tuple[Tensor, Tensor]:
        """V(s_t) (r, T): the critic's value at the position before each response token."""
        T = rollout.response_mask.size(1)
        values, aux_loss = self.critic.values(rollout.sequences[rows], rollout.attention_mask[rows])
        return values[:, -T - 1 : -1], aux_loss

    # -- one rollout -----------------------------------------------------------------------------
    def score(self, rollout: Rollout) -> tuple[list[Tensor], dict[str, Tensor]]:
        """The first pass's minibatches, and the buffer: old log-probabilities, values,
        advantages (GAE, whitened) and returns, plus ``scores`` and the per-token ``kl``."""
        hp = self.hparams

        # Old log-probabilities, reference log-probabilities and values, in the first pass's micro-batches.
        first = self.minibatches(len(rollout), hp.num_mini_batches, shuffle=False)
        logprobs = self.logprobs_under(self.policy, rollout, first)
        ref_logprobs = (
            logprobs if self.reference is None else self.logprobs_under(self.reference_model(), rollout, first)
        )
        values = self.rowwise(lambda rows: self.critic_values(rollout, rows)[0], rollout, first)

        # Per-token rewards, GAE and whitened advantages.
        mask = rollout.response_mask
        rewards, scores, kl = self.token_rewards(rollout, logprobs, ref_logprobs)
        advantages, returns = gae(rewards, values, mask, hp.gamma, hp.lam)
        advantages = whiten(advantages, mask)
        buffer = dict(logprobs=logprobs, values=values, advantages=advantages, returns=returns, scores=scores, kl=kl)
        return first, buffer

    def value_loss(self, rollout: Rollout, micro: Tensor, buffer: dict[str, Tensor]):
        """Per-token clipped value losses (r, T) of ``micro``, which were clipped, and the
        critic's MoE aux loss."""
        values, aux_critic = self.critic_values(rollout, micro)  # (r, T)
        hp = self.hparams
        old, returns = buffer["values"][micro], buffer["returns"][micro]
        vf_losses, vf_clipped = clipped_value_loss(values, old, returns, hp.cliprange_value)
        return vf_losses, vf_clipped, aux_critic

    def end_of_rollout(self, rollout: Rollout, buffer: dict[str, Tensor], mean: dict[str, Tensor]) -> None:
        """Update the adaptive KL coefficient and add the KL, reward and value figures to ``mean``."""
        mask = rollout.response_mask
        sequence_kl = masked_sum(buffer["kl"], mask, dim=1)  # (R,) KL of each response, in nats
        if self.hparams.adaptive_kl and not self.warming_up:  # the policy is the reference while it warms up
            # Every rank must hold the same coefficient: the KL over all ranks' responses (each has
            # as many), and the rollout's samples over all ranks, as Ziegler et al.'s batch.
            kl = self.trainer.strategy.reduce(sequence_kl.mean(), reduce_op="mean")
            self.kl_ctl.update(float(kl), len(rollout) * self.trainer.world_size)
        scores = buffer["scores"]
        mean["objective/kl"] = sequence_kl.mean()
        mean["objective/kl_coef"] = torch.tensor(self.kl_ctl.value)
        mean["objective/scores"] = scores.mean()
        mean["objective/rlhf_reward"] = scores.mean() - self.kl_ctl.value * sequence_kl.mean()
        mean["value/explained_variance"] = explained_variance(buffer["values"], buffer["returns"], mask)

    def token_rewards(self, rollout: Rollout, logprobs: Tensor, ref_logprobs: Tensor):
        """Per-token rewards (R, T): ``-kl_coef * KL_t``, plus the score on the last token."""
        hp, mask = self.hparams, rollout.response_mask
        scores = rollout.scores.clone()
        if hp.missing_eos_penalty:
            scores[rollout.truncated] -= hp.missing_eos_penalty
        if hp.reward_clip is not None:
            scores = scores.clamp(-hp.reward_clip, hp.reward_clip)
        kl = kl_estimate(logprobs, ref_logprobs, hp.kl_estimator, mask)  # (R, T), 0 off the mask
        rewards = -self.kl_ctl.value * kl
        columns = torch.arange(mask.size(1), device=mask.device)
        last = (mask.bool() * columns).amax(1)  # (R,) each response's last policy token (observations sit between)
        rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
        if hp.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        return rewards, scores, kl

    # -- the adaptive KL coefficient travels with the checkpoint --------------------------------
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        stamp(checkpoint, kl_coef=self.kl_ctl.value)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.kl_ctl.value = stamped(checkpoint).get("kl_coef", self.kl_ctl.value)


class PPOStage(CriticStage):
    """PPO against reward functions and/or a reward model, with a critic.

    Args:
        cliprange: Clip range of the policy ratio.
        vf_coef: Weight of the value loss.
        entropy_coef: Weight of the entropy bonus; 0 turns it off.
        num_ppo_epochs: Passes over each rollout batch.
        target_kl: Stop the step's remaining updates once a minibatch's approximate KL to the
            rollout policy exceeds this; None never stops early.
        ptx_coef: Weight of PPO-ptx's pretraining term (InstructGPT eq. 2): each update adds
            ``ptx_coef`` times the next-token loss on a batch of demonstrations, from the
            DataModule's ``ptx_source``; 0 turns it off.
        export_path: Where the trained policy is written at the end.
        **kwargs: ``CriticStage``'s arguments.
    """

    kind = "ppo"
    supports_ptx = True

    def __init__(
        self,
        cliprange: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        num_ppo_epochs: int = 4,
        target_kl: float | None = None,
        ptx_coef: float = 0.0,
        export_path: str | None = "checkpoints/shraygpt-ppo.ckpt",
        **kwargs,
    ):
        require(cliprange > 0, f"cliprange must be > 0, got {cliprange}.")
        require(vf_coef >= 0 and entropy_coef >= 0, "vf_coef and entropy_coef must be >= 0.")
        require(num_ppo_epochs >= 1, f"num_ppo_epochs must be at least 1, got {num_ppo_epochs}.")
        require(target_kl is None or target_kl > 0, f"target_kl must be > 0 (or null), got {target_kl}.")
        require(ptx_coef >= 0, f"ptx_coef must be >= 0, got {ptx_coef}.")
        super().__init__(export_path=export_path, **kwargs)

    def optimizer_steps_per_rollout(self) -> int:
        return self.hparams.num_ppo_epochs * self.hparams.num_mini_batches  # fewer when target_kl stops early

    def trainable(self):
        return nn.ModuleList([self.policy, self.critic])

    def schedule_offset(self) -> int:
        return self.hparams.critic_warmup * self.optimizer_steps_per_rollout()  # no early stop: the KL is 0

    def check_data(self, datamodule) -> None:
        super().check_data(datamodule)
        has_ptx = bool(getattr(datamodule.hparams, "ptx_source", None))
        if self.hparams.ptx_coef > 0 and not has_ptx:
            raise ConfigError("ptx_coef > 0 needs demonstrations: set --data.ptx_source (an SFT source).")

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        batch, ptx = split_ptx(batch)
        rollout = self.rollout(batch)
        self.log_rollout(rollout)
        start = time.perf_counter()
        first, buffer = self.score(rollout)
        pretraining = self.ptx_loss(ptx) if hp.ptx_coef > 0 and ptx is not None and not self.warming_up else None

        # num_ppo_epochs passes of num_mini_batches updates, stopped early at target_kl.
        stats, early_stop = [], False
        for rows in self.passes(first, hp.num_ppo_epochs):
            step = self.policy_update(rows, lambda micro, rows: self.loss(rollout, micro, rows, buffer), pretraining)
            stats.append(step)
            # every rank stops when one does: each update's backward passes are all-reduces
            early_stop = hp.target_kl is not None and self.trainer.strategy.reduce_boolean_decision(
                float(stats[-1]["policy/approxkl"]) > hp.target_kl, all=False
            )
            if early_stop:
                break

        mean = self.mean_of_updates(stats)
        self.end_of_rollout(rollout, buffer, mean)
        mean["policy/updates"] = torch.tensor(float(len(stats)))
        mean["policy/early_stopped"] = torch.tensor(float(early_stop))
        mean["policy/critic_warmup"] = torch.tensor(float(self.warming_up))
        self.log_step(mean)
        self.log_update(time.perf_counter() - start, float(rollout.attention_mask.sum()) * len(stats) / len(first))

    def optimizer_step(self, finite: bool = True) -> None:
        """While the critic warms up, the policy's gradients (zeros: its loss terms were
        weighted by 0, so that every parameter still takes part in DDP's all-reduce) are
        dropped before the step, so that AdamW neither decays nor moves it."""
        if self.warming_up:
            for param in self.policy.parameters():
                param.grad = None
        super().optimizer_step(finite)

    def ptx_loss(self, ptx: dict) -> Callable[[], dict[str, Tensor]]:
        """The pretraining term of each update: ``ptx_coef`` x the next-token loss on ``ptx``."""

        def term() -> dict[str, Tensor]:
            logits, _, _ = self.policy(ptx["input_ids"], attention_mask=ptx["attention_mask"])
            loss = next_token_loss(logits, ptx["input_ids"], ptx["loss_mask"])
            return {"loss": self.hparams.ptx_coef * loss, "objective/ptx_loss": loss.detach()}

        return term

    def loss(self, rollout: Rollout, micro: Tensor, rows: Tensor, buffer: dict[str, Tensor]) -> MicroStep:
        """The micro-batch ``micro``'s part of the loss of the minibatch ``rows``.

        Clipped policy loss + ``vf_coef`` x clipped value loss − ``entropy_coef`` x entropy,
        summed over the micro-batch's tokens and divided by the minibatch's token count (a token
        mean over the whole minibatch), plus its share of the policy's and critic's MoE aux losses.
        While the critic warms up, the policy's terms weigh 0.
        """
        hp, mask = self.hparams, rollout.response_mask[micro]
        warming_up = self.warming_up
        policy_weight = 0.0 if warming_up else 1.0
        bonus = hp.entropy_coef > 0
        logprobs, entropy, aux_policy = self.response_logprobs(self.policy, rollout, micro, entropy=bonus)
        vf_losses, vf_clipped, aux_critic = self.value_loss(rollout, micro, buffer)
        old = buffer["logprobs"][micro]
        pg_losses, ratio, pg_clipped = clipped_policy_loss(
            logprobs, old, buffer["advantages"][micro], hp.cliprange, mask=mask
        )
        weights, gap = self.rollout_correction(rollout, micro, old, mask)
        if weights is not None:  # tokens sampled by an engine with other log-probabilities (vLLM)
            pg_losses = pg_losses * weights
        policy_term = pg_losses - (hp.entropy_coef * entropy if bonus else 0.0)
        if warming_up:  # in the graph for DDP, but a non-finite term must not drop the critic's update
            policy_term = policy_term.nan_to_num(0.0, 0.0, 0.0)
        per_token = policy_weight * policy_term + hp.vf_coef * vf_losses
        minibatch_tokens = rollout.response_mask[rows].sum()
        share = len(micro) / len(rows)
        aux = (
            policy_weight * self.aux_weight(self.policy) * aux_policy + self.aux_weight(self.critic.trunk) * aux_critic
        )
        token_metrics = policy_metrics(logprobs, old, ratio, pg_clipped, mask)
        token_metrics["policy/loss"] = masked_mean(pg_losses.detach(), mask)
        if gap is not None:
            token_metrics["policy/rollout_logprob_gap"] = gap
        token_metrics["value/loss"] = masked_mean(vf_losses.detach(), mask)
        token_metrics["value/clipfrac"] = masked_mean(vf_clipped, mask)
        metrics = {"moe/aux_loss": aux_policy.detach()}
        loss = masked_sum(per_token, mask) / minibatch_tokens + aux * share
        return MicroStep(loss, ratio, mask, metrics, token_metrics)
