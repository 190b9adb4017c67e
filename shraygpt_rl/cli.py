"""``python train.py --stage <stage>``: a LightningCLI per stage.

Every ``__init__`` argument of the stage's LightningModule (``--model.*``) and DataModule
(``--data.*``) is a flag and a YAML key, as are the Trainer's (``--trainer.*``). Defaults: a
TensorBoard logger under ``logs/<stage>``, a progress bar, ``ModelCheckpoint`` (with ``last.ckpt``)
under ``checkpoints/<stage>`` and learning-rate monitoring. ``--ckpt_path last`` resumes.
Without ``--config``, ``configs/<stage>.yaml`` is read when it exists (the demo settings).

``--stage eval`` and ``--stage pipeline`` are not training stages: they run
``shraygpt_rl.pipeline.evaluate`` and ``pipeline``, whose arguments are flags the same way.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from jsonargparse import auto_cli
from lightning.pytorch.cli import LightningCLI

from shraygpt_rl.checkpoint import CheckpointError
from shraygpt_rl.data import DataError, PreferenceDataModule, PromptDataModule, SFTDataModule
from shraygpt_rl.pipeline import evaluate, pipeline
from shraygpt_rl.runtime import retain_freed_memory
from shraygpt_rl.stages.base import ConfigError
from shraygpt_rl.stages.dpo import DPOStage
from shraygpt_rl.stages.grpo import GRPOStage, RLOOStage
from shraygpt_rl.stages.ppo import PPOStage
from shraygpt_rl.stages.reward import RewardStage
from shraygpt_rl.stages.sft import SFTStage
from shraygpt_rl.tokenizer import TokenizerError

STAGES = {
    "sft": (SFTStage, SFTDataModule),
    "reward": (RewardStage, PreferenceDataModule),
    "dpo": (DPOStage, PreferenceDataModule),
    "ppo": (PPOStage, PromptDataModule),
    "grpo": (GRPOStage, PromptDataModule),
    "rloo": (RLOOStage, PromptDataModule),
}
# The pipeline runs stages from Python with their own ``args``; what is on sys.argv is its own.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
COMMANDS = {"eval": evaluate, "pipeline": pipeline}  # not training stages: plain functions behind jsonargparse
USAGE = "usage: python train.py --stage {%s} [--config CONFIG.yaml] [--help] [--print_config] [--ckpt_path last]"


class ShrayCLI(LightningCLI):
    """LightningCLI with the project's Trainer defaults and ``--ckpt_path`` to resume a run."""

    stage = "sft"

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Checkpoint to resume from; 'last' picks the latest in checkpoints/<stage>/.",
        )  # fmt: skip
        # Defaults set here stay configurable (``trainer_defaults`` callbacks would not be).
        parser.set_defaults({f"trainer.{key}": value for key, value in trainer_defaults(self.stage).items()})


def trainer_defaults(stage: str) -> dict:
    return {
        "log_every_n_steps": 10,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "logs", "name": stage},
        },
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": f"checkpoints/{stage}", "save_last": True, "every_n_train_steps": 100},
            },
            {
                "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                "init_args": {"logging_interval": "step"},
            },
        ],
    }


def split_stage(argv: list[str]) -> tuple[str, list[str]]:
    """Take ``--stage X`` (or ``--stage=X``) out of ``argv``."""
    for i, arg in enumerate(argv):
        if arg == "--stage" and i + 1 < len(argv):
            stage, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
            break
        if arg.startswith("--stage="):
            stage, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
            break
    else:
        raise SystemExit(f"{USAGE % ','.join([*STAGES, *COMMANDS])}\nerror: --stage is required.")
    if stage not in STAGES and stage not in COMMANDS:
        raise SystemExit(f"error: unknown stage '{stage}'; choose one of {', '.join([*STAGES, *COMMANDS])}.")
    return stage, rest


def build_cli(stage: str, args: list[str]) -> ShrayCLI:
    module, datamodule = STAGES[stage]
    cli_class = type("ShrayCLI", (ShrayCLI,), {"stage": stage})
    return cli_class(
        module,
        datamodule,
        args=args,
        run=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": f"train.py --stage {stage}"},
    )


def main(argv: list[str] | None = None):
    """Run ``train.py``: a training stage (returns its LightningCLI), or ``eval``/``pipeline``
    (returns their report). Without ``--config``, ``configs/<stage>.yaml`` is used when it exists."""
    retain_freed_memory()  # before the first big allocation: see shraygpt_rl.runtime
    stage, args = split_stage(list(sys.argv[1:] if argv is None else argv))
    default = Path("configs") / f"{stage}.yaml"
    if default.is_file() and not any(a == "--config" or a.startswith("--config=") for a in args):
        print(f"train.py: using {default} (pass --config to use another)", file=sys.stderr)
        args = ["--config", str(default), *args]
    try:
        if stage in COMMANDS:
            return auto_cli(COMMANDS[stage], args=args, as_positional=False, prog=f"train.py --stage {stage}")
        cli = build_cli(stage, args)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
        return cli
    except (CheckpointError, DataError, TokenizerError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
