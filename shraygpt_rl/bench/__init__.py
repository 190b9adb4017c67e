"""Benchmarks: ``python -m shraygpt_rl.bench {generation,moe,grpo-step,learning,stages}``.

What the benchmarks share: where the repository and ``../shared`` are, the demo's arithmetic data
as ``configs/sft.yaml`` sets it up, and ``run_stage``, which trains a stage with its config from
``configs/`` through the same runner as ``train.py``. Stages write ``checkpoints/`` and ``logs/``
in the current directory, as ``train.py`` does.
"""

from __future__ import annotations

import time
from pathlib import Path

from shraygpt_rl.data.datamodules import ChatDataModule
from shraygpt_rl.runner import data_from_config
from shraygpt_rl.runner import run_stage as _run

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"  # read-only material beside the checkout, when there is one
R50K = SHARED / "tokenizers" / "r50k_base.tiktoken"
HH_SAMPLE = SHARED / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
# The benchmarks' model: the online-RL issue's bench shape, random init (vocabulary of r50k_base).
BENCH_SHAPE = dict(
    vocab_size=50257, block_size=256, d_model=256, n_head=8, d_head=32, n_layers=4,
    num_experts=4, num_experts_per_tok=2, dropout=0.0,
)  # fmt: skip
# The tests shrink the benchmarks with these: flags appended to every stage's command, and the
# number of held-out prompts and pairs the figures are measured on.
OVERRIDES: list[str] = []
HELD_OUT = 200


def demo_data(datamodule: type[ChatDataModule], config: str = "sft", **overrides) -> ChatDataModule:
    """The demo's data (arithmetic, from ``configs/sft.yaml``; another config's with ``config``)
    with ``HELD_OUT`` validation and test examples, batched by 100 for evaluation."""
    sizes = {"batch_size": 100, "val_size": HELD_OUT, "test_size": HELD_OUT}
    return data_from_config(datamodule, ROOT / "configs" / f"{config}.yaml", **{**sizes, **overrides})


def run_stage(stage: str, *args: str, config: str | None = None) -> float:
    """``python train.py --stage <stage> --config configs/<config>.yaml <args>``, the config being
    the stage's own by default; wall seconds."""
    start = time.perf_counter()
    _run(stage, ["--config", str(ROOT / "configs" / f"{config or stage}.yaml"), *args, *OVERRIDES])
    return time.perf_counter() - start
