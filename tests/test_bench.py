"""Benchmarks run end to end at a small size (their figures come from the full runs)."""

from __future__ import annotations

from shraygpt_rl.bench.throughput import bench_grpo_step, step_flops
from shraygpt_rl.model import ShrayGPT, tiny_config


def test_grpo_step_bench_reports_throughput_and_split(r50k_file, capsys):
    result = bench_grpo_step(prompts=2, generations=2, new_tokens=4, steps=1, tokenizer_path=str(r50k_file))
    assert result["completions_per_s"] > 0 and result["floor_s"] > 0
    assert result["generation_s"] > 0 and result["update_s"] > 0
    printed = capsys.readouterr().out
    assert "completions/s" in printed and "FLOP floor" in printed


def test_step_flops_by_hand():
    model = ShrayGPT(**tiny_config())
    trunk = model.num_parameters(active=True) - 2 * 320 * 64  # minus embedding and head
    # generation: 2 trunk FLOPs per token, head on new tokens; update: 3x a forward (head on N + 1)
    expected = 2 * trunk * 4 * 15 + 2 * 320 * 64 * 4 * 5 + 3 * (2 * trunk * 4 * 15 + 2 * 320 * 64 * 4 * 6)
    assert step_flops(model, rows=4, prompt_tokens=10, new_tokens=5) == expected
