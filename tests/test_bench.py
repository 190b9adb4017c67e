"""Benchmark arithmetic, checked against torch's own FLOP count; the bench commands themselves run
in tests/test_documented_commands.py."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from shraygpt_rl.bench.throughput import step_flops
from shraygpt_rl.model import ShrayGPT, tiny_config


def test_step_flops_matches_torchs_count_of_a_generation_and_an_update():
    """``step_flops`` against ``FlopCounterMode`` over what a GRPO step runs: generating 5 tokens
    after a 10-token prompt for 4 rows, then a forward over the 15 tokens (the backward is counted
    as twice the forward, as the formula says). The formula leaves out attention scores, about
    0.2% here, so it must agree within 0.5% (leaving out the head's generation FLOPs alone would
    be 0.7%)."""
    torch.manual_seed(0)
    model = ShrayGPT(**tiny_config()).eval()
    with FlopCounterMode(display=False) as generation, torch.no_grad():
        model.generate(torch.randint(0, 320, (4, 10)), 5, top_k=1)
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(torch.randint(0, 320, (4, 15)))
    measured = generation.get_total_flops() + 3 * forward.get_total_flops()
    assert abs(step_flops(model, rows=4, prompt_tokens=10, new_tokens=5) / measured - 1) < 0.005


def test_the_tools_table_gives_each_seed_and_the_spread_over_seeds(capsys):
    """``bench learning --stages tools --seeds …``'s table: one row per policy and seed, then min /
    mean / max over the seeds (the documented-commands test runs the tools benchmark on one seed)."""
    from shraygpt_rl.bench.tools import report

    rows = {
        "SFT, no tool": {0: dict(success=0.1, greedy=0.2, seconds=5), 1: dict(success=0.3, greedy=0.4, seconds=6)},
        "GRPO, tool": {0: dict(success=0.8, greedy=0.9, seconds=50), 1: dict(success=0.6, greedy=1.0, seconds=60)},
    }
    report(rows, 200)
    printed = capsys.readouterr().out
    assert "held-out 3-digit multiplication (200 test prompts)" in printed
    assert len([line for line in printed.splitlines() if line.startswith("  GRPO, tool ")]) == 3  # two seeds, spread
    assert "over seeds 0, 1: min / mean / max of held-out success" in printed
    assert "0.600 / 0.700 / 0.800" in printed and "0.900 / 0.950 / 1.000" in printed
    assert "0.100 / 0.200 / 0.300" in printed
