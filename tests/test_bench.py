"""Benchmark arithmetic by hand; the bench commands themselves run in tests/test_documented_commands.py."""

from __future__ import annotations

from shraygpt_rl.bench.throughput import step_flops
from shraygpt_rl.model import ShrayGPT, tiny_config


def test_step_flops_by_hand():
    model = ShrayGPT(**tiny_config())
    trunk = model.num_parameters(active=True) - 2 * 320 * 64  # minus embedding and head
    # generation: 2 trunk FLOPs per token, head on new tokens; update: 3x a forward (head on N + 1)
    expected = 2 * trunk * 4 * 15 + 2 * 320 * 64 * 4 * 5 + 3 * (2 * trunk * 4 * 15 + 2 * 320 * 64 * 4 * 6)
    assert step_flops(model, rows=4, prompt_tokens=10, new_tokens=5) == expected
