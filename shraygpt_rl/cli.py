"""``python train.py --stage <stage>``: a training stage, or the ``eval`` and ``pipeline`` commands.

A training stage runs through ``shraygpt_rl.runner`` (a LightningCLI per stage: see there for the
flags and the Trainer defaults). ``eval`` and ``pipeline`` are not training stages: they run
``shraygpt_rl.pipeline.evaluate`` and ``pipeline``, whose arguments are flags the same way.
Without ``--config``, ``configs/<stage>.yaml`` is read when it exists (the demo settings; a ``_`` in
the stage's name is a ``-`` in the file's). Bad input stops with one sentence on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import auto_cli
from lightning.pytorch.utilities.exceptions import SIGTERMException

from shraygpt_rl.errors import ConfigError, UserError
from shraygpt_rl.label import label, label_report
from shraygpt_rl.pipeline import evaluate, pipeline
from shraygpt_rl.runner import STAGES, run_stage
from shraygpt_rl.runtime import retain_freed_memory

# not training stages: plain functions behind jsonargparse
COMMANDS = {"eval": evaluate, "pipeline": pipeline, "label": label, "label_report": label_report}
USAGE = "python train.py --stage {%s} [--config CONFIG.yaml] [--help] [--print_config] [--ckpt_path last]"


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
        raise ConfigError(f"--stage is required, as in: {USAGE % ','.join([*STAGES, *COMMANDS])}.")
    if stage not in STAGES and stage not in COMMANDS:
        raise ConfigError(f"Unknown stage '{stage}'; choose one of {', '.join([*STAGES, *COMMANDS])}.")
    return stage, rest


def main(argv: list[str] | None = None):
    """Run ``train.py``: a training stage (returns its LightningCLI), or ``eval``/``pipeline``
    (returns their report). Without ``--config``, ``configs/<stage>.yaml`` is used when it exists."""
    retain_freed_memory()  # before the first big allocation: see shraygpt_rl.runtime
    try:
        stage, args = split_stage(list(sys.argv[1:] if argv is None else argv))
        default = Path("configs") / f"{stage.replace('_', '-')}.yaml"  # online_dpo: online-dpo.yaml
        if default.is_file() and not any(a == "--config" or a.startswith("--config=") for a in args):
            print(f"train.py: using {default} (pass --config to use another)", file=sys.stderr)
            args = ["--config", str(default), *args]
        if stage in COMMANDS:
            return auto_cli(COMMANDS[stage], args=args, as_positional=False, prog=f"train.py --stage {stage}")
        return run_stage(stage, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        print("train.py: stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
        raise SystemExit(143) from None
