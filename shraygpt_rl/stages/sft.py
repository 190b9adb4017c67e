"""Supervised fine-tuning: next-token loss on the assistant's tokens, plus the MoE aux loss.

Its output is a plain ShrayGPT checkpoint that the course's ``ShrayGPT.load_from_checkpoint``
also reads; the course calls it ``checkpoints/shraygpt-instruct.ckpt``.
"""

from __future__ import annotations

import torch.nn.functional as F

from shraygpt_rl.losses import masked_mean
from shraygpt_rl.stages.base import StageModule


class SFTStage(StageModule):
    """SFT of ShrayGPT on demonstrations (``SFTDataModule`` batches).

    Args:
        export_path: Where the fine-tuned policy is written at the end of training.
        **kwargs: ``StageModule``'s arguments (``policy``, ``model_config``, ``optimizer``, ``lr``, …).
    """

    kind = "sft"

    def __init__(self, export_path: str | None = "checkpoints/shraygpt-instruct.ckpt", **kwargs):
        super().__init__(export_path=export_path, **kwargs)
        self.policy = self.build_policy()

    def loss(self, batch) -> tuple:
        """Mean next-token NLL over assistant tokens, and the MoE aux loss."""
        input_ids = batch["input_ids"]
        logits, _, aux_loss = self.policy(input_ids, attention_mask=batch["attention_mask"])
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
        return masked_mean(nll, batch["loss_mask"][:, 1:].flatten().float()), aux_loss

    def training_step(self, batch, batch_idx):
        nll, aux_loss = self.loss(batch)
        self.log("train/loss", nll, on_step=True, prog_bar=True)
        self.log_moe(self.policy, aux_loss)
        return self.finite_or_skip(nll + self.aux_weight(self.policy) * aux_loss)

    def validation_step(self, batch, batch_idx):
        nll, aux_loss = self.loss(batch)
        self.log("val/loss", nll, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log_moe(self.policy, aux_loss, prefix="val/")
