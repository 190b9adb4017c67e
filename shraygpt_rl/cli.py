"""``python train.py --stage <stage>``: a training stage, or the ``eval`` and ``pipeline`` commands.

A training stage runs through ``shraygpt_rl.runner`` (a LightningCLI per stage: see there for the
flags and the Trainer defaults). ``eval`` and ``pipeline`` are not training stages: they run
``shraygpt_rl.pipeline.evaluate`` and ``pipeline``, whose arguments are flags the same way.
Without ``--config``, ``configs/<stage>.yaml`` is read when it exists (the demo settings). Bad
input stops with one sentence, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import auto_cli

from shraygpt_rl.checkpoint import CheckpointError
from shraygpt_rl.data import DataError
from shraygpt_rl.pipeline import evaluate, pipeline
from shraygpt_rl.runner import STAGES, run_stage
from shraygpt_rl.runtime import retain_freed_memory
from shraygpt_rl.stages.base import ConfigError
from shraygpt_rl.tokenizer import TokenizerError

COMMANDS = {"eval": evaluate, "pipeline": pipeline}  # not training stages: plain functions behind jsonargparse
USAGE = "usage: python train.py --stage {%s} [--config CONFIG.yaml] [--help] [--print_config] [--ckpt_path last]"


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
        return run_stage(stage, args)
    except (CheckpointError, DataError, TokenizerError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
