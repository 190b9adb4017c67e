"""Benchmarks: ``python -m shraygpt_rl.bench {generation,moe,grpo-step,learning,stages}``.

What the stage-running benchmarks share: the repository root, the arithmetic task as the demo
configs set it up, and ``run_stage``, which runs ``train.py`` with a config from ``configs/``.
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK = dict(source="arithmetic", digits=2, system_prompt=None, max_length=64, max_prompt_length=48, batch_size=100)
OVERRIDES: list[str] = []  # flags appended to every stage's command (the tests shrink the runs with them)


def run_stage(stage: str, *args: str) -> float:
    """``python train.py --stage <stage> --config configs/<stage>.yaml <args>``; wall seconds."""
    from shraygpt_rl.cli import main as train  # the CLI imports every stage: only when running one

    start = time.perf_counter()
    train(["--stage", stage, "--config", str(ROOT / "configs" / f"{stage}.yaml"), *args, *OVERRIDES])
    return time.perf_counter() - start
