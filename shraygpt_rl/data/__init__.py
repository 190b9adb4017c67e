"""RLHF data: HH-RLHF preference pairs, built-in verifiable tasks, and LightningDataModules."""

from shraygpt_rl.data.datamodules import ChatDataModule, PreferenceDataModule, SFTDataModule, stack_pairs
from shraygpt_rl.data.hh_rlhf import DataError, load_preferences
from shraygpt_rl.data.kto import KTODataModule
from shraygpt_rl.data.prompts import PromptDataModule
from shraygpt_rl.data.tasks import ArithmeticTask, SortingTask

__all__ = [
    "ArithmeticTask",
    "ChatDataModule",
    "DataError",
    "KTODataModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "SFTDataModule",
    "SortingTask",
    "load_preferences",
    "stack_pairs",
]
