"""Run one training stage from a config plus overrides: what ``train.py``, the pipeline and the
benchmarks share.

``run_stage("ppo", ["--config", "configs/ppo.yaml", "--trainer.max_steps", "8"])`` builds the
stage's ``LightningCLI`` and fits it. Every ``__init__`` argument of the stage's LightningModule
(``--model.*``) and DataModule (``--data.*``) is a flag and a YAML key, as are the Trainer's
(``--trainer.*``). The project's Trainer defaults: a TensorBoard logger under ``logs/<stage>``
and learning-rate monitoring. Checkpoints (``shraygpt_rl.resume``): ``checkpoints/<stage>/
last.ckpt``, written atomically every ``--checkpoint_every`` optimizer steps (0: only at the
end), at the end and on Ctrl-C or SIGTERM; ``--ckpt_path last`` resumes from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI

from shraygpt_rl.data import KTODataModule, PreferenceDataModule, PromptDataModule, SFTDataModule
from shraygpt_rl.data.datamodules import ChatDataModule, init_arguments
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.resume import AtomicCheckpointIO, StepCheckpoint, resolve_ckpt_path
from shraygpt_rl.stages.dpo import DPOStage
from shraygpt_rl.stages.grpo import GRPOStage, RLOOStage
from shraygpt_rl.stages.kto import KTOStage
from shraygpt_rl.stages.online_dpo import OnlineDPOStage
from shraygpt_rl.stages.ppo import PPOStage
from shraygpt_rl.stages.reward import RewardStage
from shraygpt_rl.stages.sft import SFTStage
from shraygpt_rl.stages.trpo import TRPOStage

STAGES: dict[str, tuple[type[L.LightningModule], type[L.LightningDataModule]]] = {
    "sft": (SFTStage, SFTDataModule),
    "reward": (RewardStage, PreferenceDataModule),
    "dpo": (DPOStage, PreferenceDataModule),
    "kto": (KTOStage, KTODataModule),
    "ppo": (PPOStage, PromptDataModule),
    "grpo": (GRPOStage, PromptDataModule),
    "rloo": (RLOOStage, PromptDataModule),
    "trpo": (TRPOStage, PromptDataModule),
    "online_dpo": (OnlineDPOStage, PromptDataModule),
}


class ShrayCLI(LightningCLI):
    """LightningCLI with the project's Trainer defaults, its checkpoints, and ``--ckpt_path``."""

    stage = "sft"

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Checkpoint to resume from; 'last' picks the newest readable one in checkpoints/<stage>/.",
        )
        parser.add_argument(
            "--checkpoint_every",
            type=int,
            default=100,
            help="Write checkpoints/<stage>/last.ckpt every this many optimizer steps (0: only at the end).",
        )
        # Defaults set here stay configurable (``trainer_defaults`` callbacks would not be).
        parser.set_defaults({f"trainer.{key}": value for key, value in trainer_defaults(self.stage).items()})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        """Add the atomic checkpoint writer and, unless checkpointing is off, ``StepCheckpoint``."""
        every = self._get(self.config_init, "checkpoint_every")
        if every < 0:
            raise ConfigError(f"--checkpoint_every must be >= 0, got {every}.")
        if config.get("enable_checkpointing") is not False:
            callbacks = [*callbacks, StepCheckpoint(dirpath=checkpoint_folder(self.stage), every=every)]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        config["plugins"] = [AtomicCheckpointIO(), *plugins]
        return super()._instantiate_trainer(config, callbacks)


def checkpoint_folder(stage: str) -> str:
    """Where a stage's Lightning checkpoints go."""
    return f"checkpoints/{stage}"


def trainer_defaults(stage: str) -> dict[str, Any]:
    """The Trainer settings every stage starts from; flags and YAML override each of them."""
    return {
        "log_every_n_steps": 10,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "logs", "name": stage},
        },
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                "init_args": {"logging_interval": "step"},
            },
        ],
    }


def build_cli(stage: str, args: list[str]) -> ShrayCLI:
    """The stage's LightningCLI with ``args`` parsed and every object built, not yet fitted."""
    module, datamodule = STAGES[stage]
    cli_class = type("ShrayCLI", (ShrayCLI,), {"stage": stage})
    with warnings.catch_warnings():  # passing ``args`` rather than sys.argv is this function's point
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return cli_class(
            module,
            datamodule,
            args=args,
            run=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"train.py --stage {stage}"},
        )


def run_stage(stage: str, args: list[str], callbacks: Sequence[L.Callback] = ()) -> ShrayCLI:
    """Build the stage's CLI from ``args`` (``--config`` and overrides), add ``callbacks`` to its
    Trainer, and fit it, resuming as ``--ckpt_path`` says; returns the CLI."""
    cli = build_cli(stage, args)
    adopt_policy_tokenizer(cli.model, cli.datamodule)
    cli.trainer.callbacks.extend(callbacks)
    ckpt_path = resolve_ckpt_path(cli.config.ckpt_path, checkpoint_folder(stage))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def adopt_policy_tokenizer(model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """A Hugging Face policy's data is tokenised by the policy's own tokenizer unless the config
    names another (the default ``byte`` cannot serve such a model, and ``hf`` without a path
    means the policy's)."""
    own = model.policy_tokenizer()
    data = datamodule.hparams
    if own and (data.tokenizer == "byte" or (data.tokenizer == "hf" and not data.tokenizer_path)):
        data.tokenizer, data.tokenizer_path = own


def policy_tokenizer(policy, config: str | Path | None) -> dict[str, str]:
    """A Hugging Face policy's tokenizer as data overrides, unless ``config`` names another (as
    ``adopt_policy_tokenizer`` does for training): for the commands that sample from a policy
    outside a stage (``--stage eval``, the pipeline's report, the labelling page)."""
    source = getattr(policy, "tokenizer_source", None)
    data = config_section(config, "data")
    named = data.get("tokenizer", "byte") != "byte" and (data.get("tokenizer") != "hf" or data.get("tokenizer_path"))
    return {"tokenizer": "hf", "tokenizer_path": source} if source and not named else {}


def stage_of(config: str | Path) -> str:
    """The stage a config file is for, from its name: the whole name when it names one (with
    ``-`` for ``_``: ``online-dpo.yaml``), else its first part that does (``ppo-rm``: ppo;
    ``opt-sft-dolly``: sft; ``dpo-simpo``: dpo)."""
    stem = Path(config).stem
    if stem.replace("-", "_") in STAGES:
        return stem.replace("-", "_")
    for part in stem.split("-"):
        if part in STAGES:
            return part
    raise ConfigError(f"{Path(config).name} names no stage; put one of {', '.join(STAGES)} in its name.")


def config_section(config: str | Path | None, section: str) -> dict[str, Any]:
    """One section (``model``, ``data``, ``trainer``) of a stage config; empty when there is none."""
    if config is None or not Path(config).is_file():
        return {}
    return dict((yaml.safe_load(Path(config).read_text()) or {}).get(section) or {})


def data_from_config(datamodule: type[ChatDataModule], config: str | Path | None, **overrides: Any) -> ChatDataModule:
    """``datamodule`` built from a stage config's ``data:`` section plus ``overrides``, leaving out
    the options that only another DataModule takes (SFT's ``wrong_fraction`` for prompts, say)."""
    accepted = init_arguments(datamodule)
    data = {k: v for k, v in config_section(config, "data").items() if k in accepted}
    return datamodule(**{**data, **overrides})
