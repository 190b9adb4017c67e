"""``bench grpo-step --hf``'s code at toy size: a 2-layer GPT-Neo of width 64 with a byte-level
tokenizer, 2 prompts x 2 generations x 4 tokens, one timed step."""

from __future__ import annotations

from shraygpt_rl.bench.gpu import trl_importable
from shraygpt_rl.bench.hf_step import TINY, bench_hf_grpo_step


def test_the_hf_grpo_step_bench_gives_positive_figures(capsys):
    result = bench_hf_grpo_step(
        "tinystories", prompts=2, generations=2, new_tokens=4, steps=1, overrides=TINY["tinystories"], vocabulary="byte"
    )
    printed = capsys.readouterr().out
    for key in ("generate_eager_tokens_per_s", "generate_static_tokens_per_s", "generate_static_over_eager"):
        assert result[key] > 0, key
    for engine in ("eager", "static"):
        assert result[f"{engine}_completions_per_s"] > 0 and result[f"{engine}_generation_s"] > 0
    assert "ours, rollout_engine=static" in printed and "ours, rollout_engine=eager" in printed
    if trl_importable():
        assert result["trl_completions_per_s"] > 0 and result["static_over_trl"] > 0
        assert "GRPOTrainer" in printed
    else:
        assert "trl_completions_per_s" not in result
        assert "TRL GRPOTrainer: not importable here" in printed
