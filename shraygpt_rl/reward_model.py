"""The reward model: a ShrayGPT trunk with a scalar head, as a model (training is ``stages/reward.py``).

``r(x, y)`` is the head's value at the last real token (the EOS after the response) or, with
``pooling="mean"``, the mean over response tokens. ``values`` gives one value per token, which
makes the same module PPO's critic. ``score`` takes text, which makes it a reward function
(``rewards.LearnedReward``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from shraygpt_rl.checkpoint import read_reward_checkpoint, write_reward_checkpoint
from shraygpt_rl.losses import masked_mean
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.policy import policy_config, policy_from_config
from shraygpt_rl.tokenizer import encode_special, format_response, get_tokenizer, through

Pooling = Literal["last", "mean"]


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (B,), for left or right padding."""
    T = attention_mask.size(1)
    return T - 1 - attention_mask.flip(1).long().argmax(dim=1)


class RewardModel(nn.Module):
    """A policy's trunk (without its LM head) plus ``value_head``: C -> 1.

    Args:
        trunk: The policy (either backend, ``shraygpt_rl.policy``) whose trunk this becomes; its
            LM head is dropped.
        pooling: ``last`` real token, or ``mean`` over response tokens.
        tokenizer: Name of the tokenizer ``score`` uses on strings.
        tokenizer_path: Local vocabulary file for that tokenizer.
        reply_format: How ``score`` tokenises a reply, as the training data's chat template did:
            the template's text before and after a reply's content, and its end-of-turn token;
            None: standard text's (``" " + reply`` and EOS, the course's format too).
    """

    def __init__(
        self,
        trunk: ShrayGPT,
        pooling: Pooling = "last",
        tokenizer: str = "byte",
        tokenizer_path: str | None = None,
        reply_format: tuple[str, str, int] | None = None,
    ):
        super().__init__()
        trunk.release_head()  # the LM head plays no part in a reward model
        self.trunk = trunk
        self.value_head = nn.Linear(trunk.config["d_model"], 1)
        nn.init.normal_(self.value_head.weight, std=1 / (trunk.config["d_model"] + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)
        self.pooling, self.tokenizer, self.tokenizer_path = pooling, tokenizer, tokenizer_path
        self.reply_format = None if reply_format is None else tuple(reply_format)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "policy_config": policy_config(self.trunk),
            "pooling": self.pooling,
            "tokenizer": self.tokenizer,
            "tokenizer_path": self.tokenizer_path,
            "reply_format": self.reply_format,
        }

    @classmethod
    def load_from_checkpoint(cls, path: str, map_location: Any = "cpu") -> RewardModel:
        """A trained reward model (exported, or the reward stage's Lightning checkpoint)."""
        config, state_dict = read_reward_checkpoint(path, map_location)
        trunk = policy_from_config(config.pop("policy_config"))
        model = cls(trunk, **config)
        model.load_state_dict(state_dict)
        return model

    def save_checkpoint(self, path: str, stage: str = "reward") -> None:
        """Write the reward model where ``load_from_checkpoint``, PPO's critic and ``LearnedReward`` read it."""
        write_reward_checkpoint(path, self.state_dict(), self.config, stage=stage)

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

    def encoding(self):
        """The tokenizer ``score`` uses, loaded once per (name, path)."""
        key = (self.tokenizer, self.tokenizer_path)
        if getattr(self, "_encoding_key", None) != key:
            self._encoding, self._encoding_key = get_tokenizer(*key), key
        return self._encoding

    def reply_ids(self, enc, response: str) -> list[int]:
        """A reply's tokens after its prompt, as the training data's chat format made them."""
        if self.reply_format is None:
            return enc.encode_ordinary(format_response(response)) + [enc.eot_token]
        before, after, end_of_turn = self.reply_format
        return through(encode_special(enc, before + response + after), end_of_turn)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> Tensor:
        """Rewards (B,) of responses to prompts, as text (the ``LearnedReward`` slot)."""
        enc = self.encoding()
        device = self.value_head.weight.device
        scores = []
        for start in range(0, len(prompts), batch_size):
            rows, masks = [], []
            for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
                p = enc.encode_ordinary(prompt)
                r = self.reply_ids(enc, response)
                rows.append(p + r)
                masks.append([0] * len(p) + [1] * len(r))
            width = max(map(len, rows))
            ids = torch.tensor([r + [enc.eot_token] * (width - len(r)) for r in rows], device=device)
            attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            response = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
            scores.append(self(ids, attention, response)[0].float().cpu())
        return torch.cat(scores)
