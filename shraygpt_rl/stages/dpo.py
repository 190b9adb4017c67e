"""Direct preference optimisation, its IPO, hinge and robust variants, and the reference-free
SimPO and ORPO.

The loss is a function of ``log pi(y|x) - log pi_ref(y|x)`` for the chosen and rejected
responses (see ``losses.dpo_loss``). The reference is either a frozen copy of the starting policy,
or, with ``precompute_ref_logprobs`` (the default), its log-probabilities computed in one pass
before training and kept with the checkpoint, so no second model sits in memory while training.
With LoRA the reference is the policy with its adapters off, which costs no memory: its
log-probabilities are computed batch by batch, so step 1 does not wait for a pass over the data.
Log-probabilities come from the LM head on response positions only
(``generation.sequence_logprobs``): a long prompt's positions never reach the vocabulary.

SimPO (``losses.simpo_loss``) and ORPO (``losses.orpo_loss``) use length-averaged
log-probabilities of the policy alone: these stages keep no reference and precompute nothing.

Departures from the papers, as in TRL: IPO uses length-averaged log-probabilities, and
``label_smoothing`` turns the sigmoid loss into conservative DPO. ORPO's SFT term is the mean over
pairs of each chosen response's mean token NLL (the paper averages over tokens, then examples).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from shraygpt_rl.data import stack_pairs
from shraygpt_rl.errors import require
from shraygpt_rl.generation import sequence_logprobs
from shraygpt_rl.losses import DPOLossType, dpo_loss, orpo_loss, simpo_loss
from shraygpt_rl.stages.base import CachedReferenceStage, disable_dropout
from shraygpt_rl.stages.checks import check_dpo_options

REFERENCE_FREE = ("simpo", "orpo")


class DPOStage(CachedReferenceStage):
    """DPO on preference pairs (``PreferenceDataModule`` batches).

    Args:
        beta: Strength of the implicit KL constraint to the reference; SimPO's reward scale
            (its paper uses 2 to 2.5) and ORPO's weight lambda of the odds-ratio term (0.1).
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` or ``robust``; ``simpo`` or ``orpo``
            keep no reference.
        label_smoothing: Assumed rate of flipped preference labels (cDPO, robust DPO).
        simpo_gamma: SimPO's target reward margin gamma.
        precompute_ref_logprobs: Compute the reference log-probabilities once before training
            instead of keeping a frozen reference model; with LoRA the adapters-off reference is
            used batch by batch instead (it costs no memory).
        export_path: Where the aligned policy is written at the end of training.
        **kwargs: ``StageModule``'s arguments (``policy`` is the SFT checkpoint to start from).
    """

    kind = "dpo"

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: DPOLossType | Literal["simpo", "orpo"] = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 1.0,
        precompute_ref_logprobs: bool = True,
        export_path: str | None = "checkpoints/shraygpt-dpo.ckpt",
        **kwargs,
    ):
        check_dpo_options(beta, loss_type, label_smoothing)
        require(simpo_gamma >= 0, f"simpo_gamma must be >= 0, got {simpo_gamma}.")
        super().__init__(export_path=export_path, **kwargs)
        self.policy = disable_dropout(self.build_policy())
        if not self.reference_free:
            self.keep_reference(not precompute_ref_logprobs)
        self.ref_logps: dict[str, Tensor] = {}  # split -> (num_pairs, 2), filled before training

    @property
    def reference_free(self) -> bool:
        return self.hparams.loss_type in REFERENCE_FREE

    def trainable(self):
        return self.policy

    # -- reference log-probabilities ----------------------------------------------------------
    def logps(self, model, batch) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen and rejected sequence log-probabilities (B,) under ``model``, and the aux loss."""
        B = batch["chosen_input_ids"].size(0)
        ids, attention, response = stack_pairs(batch)
        average = self.hparams.loss_type in ("ipo", *REFERENCE_FREE)
        logps, aux_loss = sequence_logprobs(model, ids, attention, response, average=average)
        return logps[:B], logps[B:], aux_loss

    def reference_columns(self, model, batch) -> Tensor:
        chosen, rejected, _ = self.logps(model, batch)
        return torch.stack([chosen, rejected], dim=1)  # (B, 2)

    def needs_reference_pass(self) -> bool:
        return super().needs_reference_pass() and not self.reference_free

    def reference_logps(self, batch, split: str) -> tuple[Tensor, Tensor]:
        cached = self.cached_reference(batch, split)  # (B, 2)
        return cached[:, 0], cached[:, 1]

    # -- steps ---------------------------------------------------------------------------------
    def step(self, batch, split: str):
        chosen, rejected, aux_loss = self.logps(self.policy, batch)
        losses, chosen_rewards, rejected_rewards = self.losses(chosen, rejected, batch, split)
        train = split == "train"
        prefix = "" if train else f"{split}/"
        self.log(f"{split}/loss", losses.mean(), on_step=train, on_epoch=not train, batch_size=chosen.numel())
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        if self.hparams.loss_type == "orpo":  # the odds-ratio term's argument (TRL's log_odds_ratio)
            metrics["objective/log_odds_ratio"] = orpo_loss(chosen.detach(), rejected.detach())[1].mean()
        self.log_dict(
            {prefix + k: v for k, v in metrics.items()}, on_step=train, on_epoch=not train, batch_size=chosen.numel()
        )
        self.log_moe(self.policy, aux_loss, prefix=prefix)
        return losses.mean() + self.aux_weight(self.policy) * aux_loss

    def losses(self, chosen: Tensor, rejected: Tensor, batch, split: str) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair losses and the chosen and rejected rewards (B,) of ``loss_type``."""
        beta, loss_type = self.hparams.beta, self.hparams.loss_type
        if loss_type == "simpo":
            return simpo_loss(chosen, rejected, beta, self.hparams.simpo_gamma)
        if loss_type == "orpo":  # rewards as SimPO's: beta times the mean log-probability
            return orpo_loss(chosen, rejected, beta)[0], beta * chosen.detach(), beta * rejected.detach()
        ref_chosen, ref_rejected = self.reference_logps(batch, split)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, self.hparams.label_smoothing)
