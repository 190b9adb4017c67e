"""Reward-model training: the Bradley–Terry loss on preference pairs.

The model is ``shraygpt_rl.reward_model.RewardModel``: a ShrayGPT trunk with a scalar head that
scores the last real token or the mean over response tokens. The loss is
``-log sigmoid(r_chosen - r_rejected - margin)`` (InstructGPT eq. 1), optionally plus
``center_rewards_coefficient * mean((r_chosen + r_rejected)^2)`` to keep rewards centred.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAccuracy

from shraygpt_rl.checkpoint import stamp
from shraygpt_rl.data import stack_pairs
from shraygpt_rl.errors import ConfigError, require
from shraygpt_rl.losses import bradley_terry_loss, reward_centering_loss
from shraygpt_rl.reward_model import Pooling, RewardModel
from shraygpt_rl.stages.base import StageModule


class RewardStage(StageModule):
    """Bradley–Terry reward-model training on preference pairs (``PreferenceDataModule`` batches).

    Args:
        policy: Checkpoint whose trunk starts the reward model (usually the SFT policy).
        pooling: Score at the ``last`` real token, or the ``mean`` over response tokens.
        margin: Required gap ``r_chosen - r_rejected`` in the loss.
        margin_from_strength: Take each pair's margin from a person's judgement instead: its
            ``strength`` (2 for "significantly better", 1 for "slightly"), as the labelling
            page writes it (``--data.source prefs.jsonl``); Llama 2's margin loss, §3.2.2.
        center_rewards_coefficient: Weight of ``mean((r_chosen + r_rejected)^2)``; 0 turns it off.
        freeze_trunk: Train the scalar head only.
        export_path: Where the reward model is written at the end of training; PPO's critic and
            the ``LearnedReward`` slot read it.
        **kwargs: ``StageModule``'s arguments.
    """

    kind = "reward"

    def __init__(
        self,
        policy: str | None = None,
        pooling: Pooling = "last",
        margin: float = 0.0,
        margin_from_strength: bool = False,
        center_rewards_coefficient: float = 0.0,
        freeze_trunk: bool = False,
        export_path: str | None = "checkpoints/reward-model.ckpt",
        **kwargs,
    ):
        require(
            center_rewards_coefficient >= 0,
            f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}.",
        )
        super().__init__(policy=policy, export_path=export_path, **kwargs)
        self.model = RewardModel(self.build_policy(), pooling=pooling)
        if freeze_trunk:  # otherwise the trunk trains as built: whole, or its adapters with LoRA
            self.model.trunk.requires_grad_(False)
        self.eval_accuracy, self.eval_margin = BinaryAccuracy(), MeanMetric()
        self.eval_rewards = CatMetric()  # every held-out reward, gathered from all ranks at compute

    def trained_policy(self):
        return self.model.trunk

    def exported_model(self) -> RewardModel:
        return self.model

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        stamp(checkpoint, reward_config=self.model.config)

    def setup(self, stage):
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.margin_from_strength and datamodule is not None:
            if not datamodule.splits:
                datamodule.setup(stage)
            if not {"strength", "margin"} & set(datamodule.splits["train"].column_names):
                raise ConfigError(
                    f"--model.margin_from_strength needs judged pairs with a strength (a labelling file from "
                    f"`train.py --stage label`, or a margin column); '{datamodule.hparams.source}' has none."
                )
        if datamodule is not None:  # ``score`` must tokenise as the training data did
            self.model.tokenizer = datamodule.hparams.tokenizer
            self.model.tokenizer_path = datamodule.hparams.tokenizer_path
            self.model.reply_format = reply_format(datamodule)

    def rewards(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen and rejected rewards (B,) each, scored in one forward; and the aux loss."""
        B = batch["chosen_input_ids"].size(0)
        ids, attention, response = stack_pairs(batch)
        scores, aux_loss = self.model(ids, attention, response)
        return scores[:B], scores[B:], aux_loss

    def margin(self, batch) -> Tensor | float:
        """The pairs' margins (B,) from their judged strength, or the fixed ``margin``."""
        return batch["strength"] if self.hparams.margin_from_strength else self.hparams.margin

    def training_step(self, batch, batch_idx):
        chosen, rejected, aux_loss = self.rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, self.margin(batch))
        if self.hparams.center_rewards_coefficient:
            loss = loss + self.hparams.center_rewards_coefficient * reward_centering_loss(chosen, rejected)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/accuracy", (chosen > rejected).float().mean(), on_step=True, prog_bar=True)
        self.log("train/margin", (chosen - rejected).mean(), on_step=True)
        self.log_moe(self.model.trunk, aux_loss)
        return self.finite_or_skip(loss + self.aux_weight(self.model.trunk) * aux_loss)

    # Held-out evaluation: the same for validation and test, under "val/" or "test/".
    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def _eval_step(self, batch, split: str) -> None:
        chosen, rejected, _ = self.rewards(batch)
        self.eval_accuracy.update(torch.sigmoid(chosen - rejected), torch.ones_like(chosen, dtype=torch.long))
        self.eval_margin.update(chosen - rejected)
        self.eval_rewards.update(torch.cat([chosen, rejected]).detach())
        self.log(f"{split}/loss", bradley_terry_loss(chosen, rejected, self.margin(batch)), batch_size=chosen.numel())

    def _eval_epoch_end(self, split: str) -> None:
        """Pairwise accuracy, margin, and reward mean and std over the whole held-out split."""
        rewards = self.eval_rewards.compute().flatten() if self.eval_rewards.update_count else None
        self.log(f"{split}/accuracy", self.eval_accuracy.compute(), prog_bar=True)
        self.log(f"{split}/margin", self.eval_margin.compute())
        if rewards is not None and rewards.numel() > 1:
            self.log(f"{split}/reward_mean", rewards.mean(), rank_zero_only=True)
            self.log(f"{split}/reward_std", rewards.std(), rank_zero_only=True)
        for metric in (self.eval_accuracy, self.eval_margin, self.eval_rewards):
            metric.reset()


def reply_format(datamodule) -> tuple[str, str, int] | None:
    """How the training pairs' replies were tokenised, for ``RewardModel.score``: the template's
    text around a reply and its end-of-turn token when the prompts were conversations rendered
    by a template, None when they were standard text (or in the course's format), whose replies
    are ``" " + reply`` and EOS whatever the tokenizer's template."""
    chat = getattr(datamodule, "chat", None)
    if chat is None or chat.reply_affixes is None:
        return None
    if not datamodule.splits:
        datamodule.setup("fit")
    if not isinstance(datamodule.splits["train"][0]["prompt"], list):
        return None
    return (*chat.reply_affixes, chat.eot_token)
