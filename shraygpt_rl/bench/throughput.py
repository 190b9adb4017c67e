"""One GRPO step at the bench shape: completions per second, and where the time goes.

Bench shape (the online-RL issue's): d_model 256, 4 layers, 8 heads of 32, 4 experts top-2 plus
the shared expert, vocabulary 50257, random init, the ``r50k_base`` tokenizer; 8 arithmetic
prompts with the default system prompt x 4 generations x 48 new tokens, ``beta=0``. A random
model almost never samples EOS, so every completion runs the full 48 tokens.

The same run measures this machine's fp32 matmul rate and counts the step's FLOPs, so the step
time is printed beside its FLOP floor: a ratio that a noisy machine does not shift much.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from shraygpt_rl.bench import BENCH_SHAPE, R50K
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.stages.grpo import GRPOStage


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """This machine's fp32 matmul rate (GFLOP/s) on n x n matrices, as torch uses it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def step_flops(model: ShrayGPT, rows: int, prompt_tokens: int, new_tokens: int) -> float:
    """Matmul FLOPs of one GRPO step with ``beta=0`` and one pass: generation (prefill, then one
    token per step, head on the last position only) plus one forward and backward (2x the
    forward) over prompt + response with the head on the response positions. Attention scores
    are left out (a few percent at these lengths)."""
    active = model.num_parameters(active=True)
    embeddings = model.tok_emb.weight.numel()
    head = model.head.weight.numel()
    trunk = active - embeddings - head  # per token: 2 FLOPs per active trunk weight
    tokens = rows * (prompt_tokens + new_tokens)
    generation = 2 * trunk * tokens + 2 * head * rows * new_tokens
    update = 3 * (2 * trunk * tokens + 2 * head * rows * (new_tokens + 1))
    return generation + update


def bench_grpo_step(
    prompts: int = 8,
    generations: int = 4,
    new_tokens: int = 48,
    steps: int = 3,
    tokenizer_path: str | None = None,
    logprob_chunk_rows: int | None = None,
) -> dict[str, float]:
    """Time ``steps`` GRPO steps after one warm-up step; print completions/s and the split."""
    path = tokenizer_path or (str(R50K) if R50K.is_file() else None)
    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="shraygpt-bench-"))
    ShrayGPT(**BENCH_SHAPE).save_checkpoint(workdir / "policy.ckpt")
    data = PromptDataModule(
        source="arithmetic",
        tokenizer="r50k_base",
        tokenizer_path=path,
        batch_size=prompts,
        max_length=256,
        max_prompt_length=128,
        train_size=prompts * (steps + 1),
    )
    stage = GRPOStage(
        policy=str(workdir / "policy.ckpt"),
        num_generations=generations,
        max_new_tokens=new_tokens,
        beta=0.0,
        optimizer="adamw",
        lr=1e-5,
        export_path=None,
        log_samples_every=0,
        logprob_chunk_rows=logprob_chunk_rows,
    )
    print(
        f"GRPO step: {prompts} prompts x {generations} generations x {new_tokens} new tokens, beta=0, bench "
        f"shape (d_model 256, 4 layers, 8x32 heads, 4 experts top-2, vocab 50257), {torch.get_num_threads()} "
        f"threads"
    )
    timed = fit_and_time(stage, data, steps, accelerator="cpu")
    rows = prompts * generations
    step_s, gen_s, update_s = timed["step_s"], timed["generation_s"], timed["update_s"]
    prompt_tokens = timed["prompt_tokens"]
    gflops = matmul_gflops()
    floor_s = step_flops(stage.policy, rows, prompt_tokens, new_tokens) / (gflops * 1e9)
    print(f"  completions/s            {rows / step_s:8.2f}   ({step_s:.2f} s per step, mean of {steps})")
    print(
        f"  generation               {gen_s:8.2f} s  {gen_s / step_s:5.1%}   {rows * new_tokens / gen_s:7.0f} tokens/s"
    )
    print(f"  update (+ scoring)       {update_s:8.2f} s  {update_s / step_s:5.1%}")
    print(f"  FLOP floor at {gflops:.0f} GFLOP/s fp32 matmul: {floor_s:.2f} s; step / floor = {step_s / floor_s:.2f}x")
    return {"completions_per_s": rows / step_s, "generation_s": gen_s, "update_s": update_s, "floor_s": floor_s}


def fit_and_time(stage: L.LightningModule, data, steps: int, **trainer_options) -> dict[str, float]:
    """Fit ``stage`` for one warm-up step and ``steps`` timed ones, without logging or checkpoints;
    the timed steps' mean seconds (``step_s``, ``generation_s``, ``update_s``) and prompt tokens."""
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps + 1,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
        default_root_dir=tempfile.mkdtemp(prefix="shraygpt-bench-"),
        **trainer_options,
    )
    trainer.fit(stage, datamodule=data)
    measured = timer.steps[1:]  # the first step warms up allocators and kernels (and captures graphs)
    mean = {key: sum(s[key] for s in measured) / len(measured) for key in ("step_s", "generation_s", "update_s")}
    return {**mean, "prompt_tokens": timer.prompt_tokens}


class StepTimer(L.Callback):
    """Reads the stage's own step timings (the same numbers it logs under ``perf/``)."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.prompt_tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()
        self.prompt_tokens = int(batch["attention_mask"].sum(1).float().mean())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step_s = time.perf_counter() - self.start
        generation_s = pl_module.perf["generation_s"]
        self.steps.append({"step_s": step_s, "generation_s": generation_s, "update_s": step_s - generation_s})
