"""Online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback").

Each step samples ``num_generations`` responses per prompt from the current policy (one batched
rollout, as GRPO's), scores them with the stage's reward functions (a verifier, a rule reward, a
learned reward model: the same ``rewards`` list as PPO's and GRPO's), and turns each prompt's
best and worst response into a preference pair. A prompt whose responses all score the same
gives no preference: it is skipped, and counted in ``objective/tie_fraction`` and
``objective/ties_skipped``. The pairs then take one DPO step (``losses.dpo_loss``) against the
reference, which is the starting policy as in DPO (with LoRA, the policy with its adapters off).

The sequence log-probabilities are the summed log-probabilities of each response's tokens up to
and including EOS (``response_mask``), at the sampling temperature, as TRL's OnlineDPOTrainer
computes them; IPO uses their mean.

Departures from the paper: with ``num_generations`` above 2 the pair is the best and the worst of
the samples (the "best-vs-worst" rule of Xu et al., 2023, and of TRL's ``num_generations``); the
paper samples two. The judge here is any reward function rather than an LLM prompted to compare
(AI feedback); a learned reward model takes that role.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from shraygpt_rl.checkpoint import stamp, stamped
from shraygpt_rl.errors import require
from shraygpt_rl.losses import DPOLossType, dpo_loss, masked_mean, masked_sum
from shraygpt_rl.stages.checks import check_dpo_options
from shraygpt_rl.stages.online import OnlineRLStage, Rollout


class OnlineDPOStage(OnlineRLStage):
    """DPO on pairs the policy samples and the rewards judge, one optimizer step per rollout.

    Args:
        num_generations: Responses sampled per prompt; the best and the worst form its pair.
        beta: Strength of the implicit KL constraint to the reference (DPO's beta).
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` or ``robust`` (``losses.dpo_loss``).
        label_smoothing: Assumed rate of flipped preferences (cDPO, robust DPO): a noisy judge.
        rpo_alpha: Weight of the chosen responses' mean token NLL added to the loss (RPO: Pang et
            al., 2024, "Iterative Reasoning Preference Optimization", eq. 2); 0 for plain DPO.
        export_path: Where the trained policy is written at the end.
        **kwargs: ``OnlineRLStage``'s arguments (``rewards``, ``max_new_tokens``, ``temperature``,
            ``micro_batch_size`` in rows, that is twice the pairs, …).
    """

    kind = "online_dpo"

    def __init__(
        self,
        num_generations: int = 2,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float = 0.0,
        export_path: str | None = "checkpoints/shraygpt-online-dpo.ckpt",
        **kwargs,
    ):
        require(num_generations >= 2, f"num_generations must be at least 2 to form a pair, got {num_generations}.")
        check_dpo_options(beta, loss_type, label_smoothing)
        require(rpo_alpha >= 0, f"rpo_alpha must be >= 0, got {rpo_alpha}.")
        super().__init__(export_path=export_path, **kwargs)
        self.frozen_reference(self.policy)
        self.ties_skipped = 0  # prompts whose samples all scored the same, over the whole run

    def trainable(self):
        return self.policy

    # -- pairs ---------------------------------------------------------------------------------
    def best_and_worst(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each prompt's best and worst row (B,) each, and the tie mask (B,). ``scores`` (R,)
        holds each prompt's ``num_generations`` rows in a row; among equal scores the first
        sampled wins (and loses), so a tie's best and worst are one row."""
        G = self.hparams.num_generations
        grouped = scores.view(-1, G)  # (B, G)
        start = torch.arange(grouped.size(0), device=scores.device) * G
        ties = grouped.max(dim=1).values == grouped.min(dim=1).values  # (B,)
        return start + grouped.argmax(dim=1), start + grouped.argmin(dim=1), ties

    def pairs(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The rows of each prompt's best and worst response, for the prompts that are not ties,
        and the tie mask (B,)."""
        best, worst, ties = self.best_and_worst(scores)
        return best[~ties], worst[~ties], ties

    def sequence_logps(self, model, rollout: Rollout, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each response's log-probability (r,) under ``model`` (IPO: per token), the per-token
        log-probabilities (r, T) and the aux loss."""
        logprobs, _, aux_loss = self.response_logprobs(model, rollout, rows)  # (r, T)
        mask = rollout.response_mask[rows]
        if self.hparams.loss_type == "ipo":
            return masked_mean(logprobs, mask, dim=1), logprobs, aux_loss
        return masked_sum(logprobs, mask, dim=1), logprobs, aux_loss

    # -- one step ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        rollout = self.rollout(batch, repeats=hp.num_generations)
        self.log_rollout(rollout)
        start = time.perf_counter()
        chosen, rejected, ties = self.best_and_worst(rollout.scores)
        self.ties_skipped += int(ties.sum())
        stats = self.update(rollout, chosen, rejected, (~ties).float())
        stats["objective/tie_fraction"] = ties.float().mean()
        stats["objective/ties_skipped"] = torch.tensor(float(self.ties_skipped))
        stats["objective/scores"] = rollout.scores.mean()
        if not ties.all():
            stats["objective/scores_margin"] = (rollout.scores[chosen] - rollout.scores[rejected])[~ties].mean()
        self.log_step(stats)
        paired = torch.cat([chosen[~ties], rejected[~ties]])
        self.log_update(time.perf_counter() - start, float(rollout.attention_mask[paired].sum()))

    def update(self, rollout: Rollout, chosen: Tensor, rejected: Tensor, weights: Tensor) -> dict[str, Tensor]:
        """One optimizer step on every prompt's pair ``(chosen[i], rejected[i])``, weighted by
        ``weights[i]`` (0 for a tie), accumulated over micro-batches of ``micro_batch_size // 2``
        pairs: the gradient is that of the mean loss over the pairs that count, whatever the
        micro-batch size.

        Under DDP each backward is a gradient all-reduce, so every rank must run as many: the
        micro-batches are cut from all of a rank's prompts, ties included at weight 0, never from
        its non-tie pairs alone (whose number differs between ranks). The loss is divided by the
        pairs counted over all ranks (times the ranks, which DDP's average divides back out), so
        the gradient is that of the mean over every rank's pairs. No pair on any rank: no
        backward anywhere, and the step changes nothing.
        """
        hp, B = self.hparams, len(chosen)
        total = float(self.trainer.strategy.reduce(weights.sum(), reduce_op="sum"))  # pairs on every rank
        stats: dict[str, Tensor] = {"moe/aux_loss": torch.zeros((), device=self.device)}
        if total == 0:
            self.optimizer_step()
            return stats
        scale = self.trainer.world_size / total
        size = max(1, (hp.micro_batch_size or 2 * B) // 2)
        finite = True
        for i in range(0, B, size):
            part = slice(i, i + size)
            loss, metrics = self.pair_loss(
                rollout, chosen[part], rejected[part], weights[part], scale, len(weights[part]) / B
            )
            finite = finite and bool(torch.isfinite(loss))
            self.manual_backward(loss)
            for key, value in metrics.items():
                stats[key] = stats.get(key, 0.0) + value
        self.optimizer_step(finite)
        local = float(weights.sum())  # the pair metrics are sums over this rank's pairs: their means
        return {k: v if k == "moe/aux_loss" else v / local for k, v in stats.items() if local or k == "moe/aux_loss"}

    def pair_loss(
        self, rollout: Rollout, chosen: Tensor, rejected: Tensor, weights: Tensor, scale: float, share: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``scale`` times the weighted sum of the pairs' DPO losses (RPO's NLL included), plus
        ``share`` of the MoE aux loss; and the pairs' metrics, summed with their weights (the aux
        loss's, times ``share``). Policy and reference see the two halves in one forward each."""
        hp, p = self.hparams, len(chosen)
        rows = torch.cat([chosen, rejected])  # (2p,)
        logps, logprobs, aux_loss = self.sequence_logps(self.policy, rollout, rows)  # (2p,), (2p, T)
        with torch.no_grad():
            ref_logps, ref_logprobs, _ = self.sequence_logps(self.reference_model(), rollout, rows)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:p], logps[p:], ref_logps[:p], ref_logps[p:], hp.beta, hp.loss_type, hp.label_smoothing
        )
        mask = rollout.response_mask[rows]
        per_pair = losses
        metrics = {"policy/loss": losses.detach()}
        if hp.rpo_alpha:  # RPO: the chosen responses' NLL per token
            nll = -masked_mean(logprobs[:p], mask[:p], dim=1)  # (p,)
            per_pair = per_pair + hp.rpo_alpha * nll
            metrics["policy/nll_loss"] = nll.detach()
        kl = masked_sum(logprobs.detach() - ref_logprobs, mask, dim=1)  # (2p,) k1 estimate per response
        entropy = masked_sum(-logprobs.detach(), mask, dim=1)  # (2p,)
        metrics |= {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": logps[:p].detach(),
            "logps/rejected": logps[p:].detach(),
            "objective/kl": (kl[:p] + kl[p:]) / 2,  # KL(policy || reference) per response, over paired samples
            # -E[log pi] per token of the pair's two responses
            "objective/entropy": (entropy[:p] + entropy[p:]) / mask.view(2, p, -1).sum((0, 2)).clamp(min=1),
        }
        metrics = {k: (weights * v).sum() for k, v in metrics.items()}
        metrics["moe/aux_loss"] = share * aux_loss.detach()
        loss = scale * (weights * per_pair).sum() + share * self.aux_weight(self.policy) * aux_loss
        return loss, metrics

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        stamp(checkpoint, ties_skipped=self.ties_skipped)

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ties_skipped = stamped(checkpoint).get("ties_skipped", 0)
