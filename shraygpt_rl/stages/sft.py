"""Supervised fine-tuning: next-token loss on the assistant's tokens, plus the MoE aux loss.

Its output is a plain ShrayGPT checkpoint that the course's ``ShrayGPT.load_from_checkpoint``
also reads; the course calls it ``checkpoints/shraygpt-instruct.ckpt``.
"""

from __future__ import annotations

from shraygpt_rl.errors import require
from shraygpt_rl.evaluate import DemonstrationScores
from shraygpt_rl.losses import next_token_loss
from shraygpt_rl.stages.base import StageModule


class SFTStage(StageModule):
    """SFT of ShrayGPT on demonstrations (``SFTDataModule`` batches).

    Validation reports, besides ``val/loss``, seed 004's SFT figures on the held-out
    demonstrations: ``val/perplexity`` of the reference answers and ``val/rouge_l``, ROUGE-L F1
    of the policy's greedy answer against the reference (torchmetrics).

    Args:
        rouge_max_new_tokens: Longest greedy answer for ``val/rouge_l``; 0 skips ROUGE-L.
        export_path: Where the fine-tuned policy is written at the end of training.
        **kwargs: ``StageModule``'s arguments (``policy``, ``model_config``, ``optimizer``, ``lr``, …).
    """

    kind = "sft"

    def __init__(
        self, rouge_max_new_tokens: int = 32, export_path: str | None = "checkpoints/shraygpt-instruct.ckpt", **kwargs
    ):
        require(rouge_max_new_tokens >= 0, f"rouge_max_new_tokens must be >= 0, got {rouge_max_new_tokens}.")
        super().__init__(export_path=export_path, **kwargs)
        self.policy = self.build_policy()
        self.scores = DemonstrationScores(rouge_max_new_tokens)

    def loss(self, batch) -> tuple:
        """Mean next-token NLL over assistant tokens, the MoE aux loss, and the logits."""
        logits, _, aux_loss = self.policy(batch["input_ids"], attention_mask=batch["attention_mask"])
        return next_token_loss(logits, batch["input_ids"], batch["loss_mask"]), aux_loss, logits

    def training_step(self, batch, batch_idx):
        nll, aux_loss, _ = self.loss(batch)
        self.log("train/loss", nll, on_step=True, prog_bar=True)
        self.log_moe(self.policy, aux_loss)
        return self.finite_or_skip(nll + self.aux_weight(self.policy) * aux_loss)

    def validation_step(self, batch, batch_idx):
        nll, aux_loss, logits = self.loss(batch)
        self.log("val/loss", nll, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log_moe(self.policy, aux_loss, prefix="val/")
        self.scores.to(self.device).update(self.policy, batch, self.trainer.datamodule.tokenizer, logits)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.scores.compute().items():
            self.log(f"val/{name}", value, sync_dist=True)
