"""Reward model: a ShrayGPT trunk with a scalar head, trained with the Bradley–Terry loss.

``r(x, y)`` is the head's value at the last real token (the EOS after the response) or, with
``pooling="mean"``, the mean over response tokens. The loss is
``-log sigmoid(r_chosen - r_rejected - margin)`` (InstructGPT eq. 1), optionally plus
``center_rewards_coefficient * mean((r_chosen + r_rejected)^2)`` to keep rewards centred.

``RewardModel`` is also the PPO critic: ``values`` gives one value per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from shraygpt_rl.checkpoint import read_reward_checkpoint, write_reward_checkpoint
from shraygpt_rl.losses import bradley_terry_loss, masked_mean, reward_centering_loss
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.stages.base import StageModule
from shraygpt_rl.tokenizer import format_response, get_tokenizer

Pooling = Literal["last", "mean"]


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (B,), for left or right padding."""
    T = attention_mask.size(1)
    return T - 1 - attention_mask.flip(1).long().argmax(dim=1)


class RewardModel(nn.Module):
    """ShrayGPT trunk (without its LM head) plus ``value_head``: C -> 1.

    Args:
        trunk: The policy whose blocks become the trunk; its LM head is dropped.
        pooling: ``last`` real token, or ``mean`` over response tokens.
        tokenizer: Name of the tokenizer ``score`` uses on strings.
        tokenizer_path: Local vocabulary file for that tokenizer.
    """

    def __init__(self, trunk: ShrayGPT, pooling: Pooling = "last", tokenizer: str = "byte",
                 tokenizer_path: str | None = None):  # fmt: skip
        super().__init__()
        trunk.head = None  # the LM head plays no part in a reward model
        self.trunk = trunk
        self.value_head = nn.Linear(trunk.config["d_model"], 1)
        nn.init.normal_(self.value_head.weight, std=1 / (trunk.config["d_model"] + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)
        self.pooling, self.tokenizer, self.tokenizer_path = pooling, tokenizer, tokenizer_path

    @property
    def config(self) -> dict[str, Any]:
        return {"policy_config": self.trunk.config, "pooling": self.pooling, "tokenizer": self.tokenizer,
                "tokenizer_path": self.tokenizer_path}  # fmt: skip

    @classmethod
    def from_policy(cls, path: str, **kwargs) -> RewardModel:
        """A fresh head on the trunk of a policy checkpoint (the usual start: the SFT model)."""
        return cls(ShrayGPT.load_from_checkpoint(path), **kwargs)

    @classmethod
    def load_from_checkpoint(cls, path: str, map_location: Any = "cpu") -> RewardModel:
        """A trained reward model (exported, or the reward stage's Lightning checkpoint)."""
        config, state_dict = read_reward_checkpoint(path, map_location)
        trunk = ShrayGPT(**config.pop("policy_config"))
        model = cls(trunk, **config)
        model.load_state_dict(state_dict)
        return model

    def save_checkpoint(self, path: str) -> None:
        write_reward_checkpoint(path, self.state_dict(), self.config)

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token values (B, T) in float32, and the trunk's MoE aux loss."""
        hidden, _, aux_loss = self.trunk.features(input_ids, attention_mask=attention_mask)
        return self.value_head(hidden).squeeze(-1).float(), aux_loss

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor | None = None):
        """Scores (B,) and the aux loss; ``response_mask`` is needed for ``pooling="mean"``."""
        values, aux_loss = self.values(input_ids, attention_mask)
        if self.pooling == "mean":
            if response_mask is None:
                raise ValueError("pooling='mean' needs the response mask.")
            return masked_mean(values, response_mask.float(), dim=1), aux_loss
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1), aux_loss

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> Tensor:
        """Rewards (B,) of responses to prompts, as text (the ``LearnedReward`` slot)."""
        enc = get_tokenizer(self.tokenizer, self.tokenizer_path)
        device = self.value_head.weight.device
        scores = []
        for start in range(0, len(prompts), batch_size):
            rows, masks = [], []
            for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
                p = enc.encode_ordinary(prompt)
                r = enc.encode_ordinary(format_response(response)) + [enc.eot_token]
                rows.append(p + r)
                masks.append([0] * len(p) + [1] * len(r))
            width = max(map(len, rows))
            ids = torch.tensor([r + [enc.eot_token] * (width - len(r)) for r in rows], device=device)
            attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            response = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
            scores.append(self(ids, attention, response)[0].float().cpu())
        return torch.cat(scores)


class RewardStage(StageModule):
    """Bradley–Terry reward-model training on preference pairs (``PreferenceDataModule`` batches).

    Args:
        policy: Checkpoint whose trunk starts the reward model (usually the SFT policy).
        pooling: Score at the ``last`` real token, or the ``mean`` over response tokens.
        margin: Required gap ``r_chosen - r_rejected`` in the loss.
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
        center_rewards_coefficient: float = 0.0,
        freeze_trunk: bool = False,
        export_path: str | None = "checkpoints/reward-model.ckpt",
        **kwargs,
    ):
        super().__init__(policy=policy, export_path=export_path, **kwargs)
        self.model = RewardModel(self.build_policy(), pooling=pooling)
        self.model.trunk.requires_grad_(not freeze_trunk)
        self.eval_accuracy, self.eval_margin = BinaryAccuracy(), MeanMetric()
        self._eval_rewards: list[Tensor] = []

    def policy_config(self) -> dict[str, Any]:
        return self.model.trunk.config

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["shraygpt_rl"]["reward_config"] = self.model.config

    def setup(self, stage):
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:  # ``score`` must tokenise as the training data did
            self.model.tokenizer = datamodule.hparams.tokenizer
            self.model.tokenizer_path = datamodule.hparams.tokenizer_path

    def rewards(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen and rejected rewards (B,) each, scored in one forward; and the aux loss."""
        B = batch["chosen_input_ids"].size(0)
        ids, attention, response = stack_pairs(batch)
        scores, aux_loss = self.model(ids, attention, response)
        return scores[:B], scores[B:], aux_loss

    def training_step(self, batch, batch_idx):
        chosen, rejected, aux_loss = self.rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, self.hparams.margin)
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
        self._eval_rewards.append(torch.cat([chosen, rejected]).detach())
        self.log(f"{split}/loss", bradley_terry_loss(chosen, rejected, self.hparams.margin), batch_size=chosen.numel())

    def _eval_epoch_end(self, split: str) -> None:
        """Pairwise accuracy, margin, and reward mean and std over the whole held-out split."""
        rewards = self.all_gather(torch.cat(self._eval_rewards)).flatten() if self._eval_rewards else None
        self._eval_rewards.clear()
        self.log(f"{split}/accuracy", self.eval_accuracy.compute(), prog_bar=True)
        self.log(f"{split}/margin", self.eval_margin.compute())
        if rewards is not None and rewards.numel() > 1:
            self.log(f"{split}/reward_mean", rewards.mean(), rank_zero_only=True)
            self.log(f"{split}/reward_std", rewards.std(), rank_zero_only=True)
        self.eval_accuracy.reset()
        self.eval_margin.reset()

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.model.save_checkpoint(self.hparams.export_path)


def stack_pairs(batch) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen rows then rejected rows, right-padded to one width: ids, attention, response mask."""
    width = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))

    def widen(x: Tensor, value: int = 0) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.size(1)), value=value)

    ids = torch.cat([widen(batch[f"{s}_input_ids"]) for s in ("chosen", "rejected")])
    attention = torch.cat([widen(batch[f"{s}_attention_mask"]) for s in ("chosen", "rejected")])
    prompt = torch.cat([widen(batch[f"{s}_prompt_mask"]) for s in ("chosen", "rejected")])
    return ids, attention, attention * (1 - prompt)
