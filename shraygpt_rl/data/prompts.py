"""Prompts for the online stages: ``PromptDataModule``, left-padded for batched generation, with
each prompt's metadata for the reward functions, and PPO-ptx's demonstrations beside them."""

from __future__ import annotations

from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, RandomSampler

from shraygpt_rl.data.datamodules import _NOT_METADATA, ChatDataModule, SFTDataModule, _pad, init_arguments
from shraygpt_rl.errors import require


class PromptDataModule(ChatDataModule):
    """Prompts for PPO/GRPO, left-padded for batched generation, with their metadata.

    Metadata is every other column: for the built-in tasks ``task``, ``question``, ``numbers`` and
    ``target``; for HH-RLHF ``chosen_response`` and ``rejected_response`` (for lexical rewards).

    With ``ptx_source``, each training batch is ``{"prompts": …, "ptx": …}``: the prompts and a
    batch of demonstrations for PPO-ptx, drawn with replacement so that there is one per prompt
    batch (``SFTDataModule``'s batches, with this DataModule's tokenizer, lengths and task options).

    Args:
        ptx_source: Demonstrations for PPO-ptx: any source ``SFTDataModule`` reads; None: none.
        ptx_batch_size: Demonstrations per training batch.
        **kwargs: ``ChatDataModule``'s arguments.
    """

    def __init__(self, ptx_source: str | None = None, ptx_batch_size: int = 8, **kwargs):
        require(ptx_batch_size >= 1, f"ptx_batch_size must be at least 1, got {ptx_batch_size}.")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.ptx: SFTDataModule | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        hp = self.hparams
        if hp.ptx_source and self.ptx is None:
            # Only what SFTDataModule takes: LightningCLI may add entries of its own (``_instantiator``).
            # The prompt source's own options (its hub configuration, renames, HH subset) are not the demonstrations'.
            accepted = init_arguments(SFTDataModule) - {"source", "batch_size", "subset", "columns", "data_dir"}
            shared = {k: v for k, v in hp.items() if k in accepted}
            self.ptx = SFTDataModule(source=hp.ptx_source, batch_size=hp.ptx_batch_size, **shared)
            self.ptx.setup(stage)

    def train_dataloader(self):
        prompts = super().train_dataloader()
        if not self.hparams.ptx_source:
            return prompts
        if self.ptx is None:
            self.setup()
        demos = self.ptx.splits["train"]
        sampler = RandomSampler(demos, replacement=True, num_samples=len(prompts) * self.hparams.ptx_batch_size)
        ptx = DataLoader(demos, batch_size=self.hparams.ptx_batch_size, sampler=sampler, collate_fn=self.ptx.collate)
        return CombinedLoader({"prompts": prompts, "ptx": ptx}, mode="max_size_cycle")

    def task_split(self, task, split):
        return task.prompts(split)

    def metadata_keys(self) -> set[str]:
        """The metadata every prompt carries (what reward functions may read)."""
        if not self.splits:
            self.setup()
        return set(self.splits["train"].column_names) - _NOT_METADATA

    def hh_split(self, pairs):
        return pairs.remove_columns([c for c in ("chosen", "rejected") if c in pairs.column_names])

    def collate(self, rows):
        prompts = [r["prompt_ids"][-self.hparams.max_prompt_length :] for r in rows]
        return {
            "input_ids": _pad(prompts, self.tokenizer.eot_token, left=True),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
            "prompt": [r["prompt_text"] for r in rows],
            "metadata": [{k: v for k, v in r.items() if k not in _NOT_METADATA} for r in rows],
        }
