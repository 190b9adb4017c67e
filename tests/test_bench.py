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


def test_the_other_benchmarks_run_at_a_small_size(tmp_path, monkeypatch, capsys):
    """The README's bench commands, with every stage cut to a few steps."""
    import shraygpt_rl.bench
    from shraygpt_rl.bench.__main__ import main

    small = [
        "--trainer.max_steps",
        "8",
        "--trainer.val_check_interval",
        "4",
        "--trainer.limit_val_batches",
        "1",
        "--data.train_size",
        "64",
        "--data.val_size",
        "16",
        "--data.test_size",
        "16",
        "--trainer.enable_progress_bar",
        "false",
    ]
    monkeypatch.setattr(shraygpt_rl.bench, "OVERRIDES", small)
    main(["generation", "--prompts", "2", "--new-tokens", "4"])
    main(["moe", "--moe-tokens", "64"])
    monkeypatch.chdir(tmp_path)
    main(["learning", "--workdir", str(tmp_path / "learning"), "--stages", "ppo", "grpo", "rloo"])
    monkeypatch.chdir(tmp_path)
    main(["stages", "--workdir", str(tmp_path / "stages")])
    printed = capsys.readouterr().out
    assert "greedy outputs identical to the course's way: 2/2 rows" in printed
    assert "max |sparse - dense|" in printed
    assert all(f"  {stage} " in printed for stage in ("sft", "ppo", "grpo", "rloo"))
    assert "reward model held-out pairwise accuracy" in printed
