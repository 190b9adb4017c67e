"""KTO's DataModule: unpaired examples, each with a fixed mismatched partner for the KL estimate."""

from __future__ import annotations

from typing import Any

import torch

from shraygpt_rl.data.datamodules import ChatDataModule, _pad
from shraygpt_rl.data.unpaired import partners, unpair


class KTODataModule(ChatDataModule):
    """Unpaired examples for KTO (``data/unpaired.py``): a file of ``prompt``, ``completion``,
    ``label`` rows read as it is, or preference pairs split in two, chosen desirable and rejected
    undesirable. Held-out splits are carved from the pairs, so both halves of a pair stay together.

    Each batch holds the right-padded ``input_ids``, ``attention_mask``, ``response_mask`` (1 on
    completion tokens), ``label`` (B,) bool (true: desirable), the rows' ``index`` and ``prompt``
    strings, and ``kl_input_ids``, ``kl_attention_mask``, ``kl_response_mask``: each row's prompt
    with its partner's completion, the mismatched pairs of KTO's KL estimate. The partner is fixed
    per row (``unpaired.partners``, seeded by ``seed`` and the split) rather than the next row of
    the batch, as TRL takes it: reference log-probabilities of the mismatched pairs can then be
    computed once before training and stay exact whatever the shuffled batches hold.
    """

    response_columns = ("completion",)
    kinds = ("preferences", "unpaired")
    reads = "unpaired"

    def task_split(self, task, split):
        return unpair(task.preferences(split))

    def hh_split(self, rows):
        return rows if "label" in rows.column_names else unpair(rows)

    def setup(self, stage=None):
        first = not self.splits
        super().setup(stage)
        if first:
            for split, data in self.splits.items():
                partner = partners(len(data), f"{self.hparams.seed}-kto-{split}")
                completions = list(data["completion_ids"])
                data = data.add_column("partner", partner)
                self.splits[split] = data.add_column("kl_completion_ids", [completions[p] for p in partner])

    def collate(self, rows):
        batch: dict[str, Any] = {
            "prompt": [r["prompt_text"] for r in rows],
            "index": torch.tensor([r["index"] for r in rows]),
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.bool),
        }
        pad = self.tokenizer.eot_token
        for prefix, column in (("", "completion_ids"), ("kl_", "kl_completion_ids")):
            fitted = [self._fit(r["prompt_ids"], r[column]) for r in rows]
            batch[f"{prefix}input_ids"] = _pad([p + c for p, c in fitted], pad)
            batch[f"{prefix}attention_mask"] = _pad([[1] * (len(p) + len(c)) for p, c in fitted], 0)
            batch[f"{prefix}response_mask"] = _pad([[0] * len(p) + [1] * len(c) for p, c in fitted], 0)
        return batch
