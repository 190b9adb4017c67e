"""One GRPO step on random-init Hugging Face models of real shapes: ours with each rollout engine,
beside TRL's GRPOTrainer on the same model folder, in one run.

Shapes: ``tinystories`` (TinyStories-33M's GPT-Neo config, 68.5 M parameters) and ``opt-350m``
(facebook/opt-350m's config), random init, float32, with GPT-2's ``r50k_base`` tokenizer and
``<|endoftext|>`` as EOS and padding. Default sizes: 8 arithmetic prompts x 4 generations x 48 new
tokens, temperature 1, no top-k, ``beta=0``, AdamW. A random model almost never samples EOS, so
every generation runs all 48 decode steps in every engine (the comparison is like for like).

Printed: ``generate`` alone (the eager loop against the fixed-shape ``static`` step), then our
``GRPOStage`` with ``rollout_engine`` eager and static, then TRL (when ``trl`` is importable).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from shraygpt_rl.bench import R50K
from shraygpt_rl.bench.gpu import time_trl_grpo, trl_importable
from shraygpt_rl.bench.throughput import fit_and_time
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.generation import generate
from shraygpt_rl.hf import HFCausalLM
from shraygpt_rl.stages.grpo import GRPOStage

# The hub models' configs (their architecture and sizes), for ``save_shape``.
SHAPES: dict[str, tuple[str, dict]] = {
    "tinystories": (
        "gpt_neo",
        dict(
            vocab_size=50257, hidden_size=768, num_layers=4, num_heads=16, max_position_embeddings=2048,
            attention_types=[[["global", "local"], 2]], window_size=256, intermediate_size=None,
        ),
    ),
    "opt-350m": (
        "opt",
        dict(
            vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
            max_position_embeddings=2048, word_embed_proj_dim=512, do_layer_norm_before=False,
        ),
    ),
}  # fmt: skip
# ``--shape tiny``: each shape at toy size (2 layers of width 64), for a smoke run.
TINY = {
    "tinystories": dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
    "opt-350m": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32),
}
LEARNING_RATE = 1e-5


def save_shape(
    shape: str, folder: Path, overrides: dict | None = None, vocabulary: str = "r50k", vocab_file=None
) -> int:
    """Write a random-init float32 model of ``shape`` (its config updated with ``overrides``) and
    a GPT-2 tokenizer (``tiny_hf.gpt2_tokenizer``'s ``vocabulary``) to ``folder``; with the byte
    vocabulary the model's vocabulary is the tokenizer's. Returns the parameter count."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, OPTConfig, OPTForCausalLM

    from shraygpt_rl.bench.tiny_hf import gpt2_tokenizer

    kind, config = SHAPES[shape]
    tokenizer = gpt2_tokenizer(vocabulary, folder, vocab_file=vocab_file)
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    config = {**config, **(overrides or {}), "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    if vocabulary != "r50k":
        config["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    if kind == "gpt_neo":
        model = GPTNeoForCausalLM(GPTNeoConfig(**config))
    else:
        model = OPTForCausalLM(OPTConfig(**config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.num_parameters()


@torch.no_grad()
def time_engines(folder: Path, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: int, repeats: int = 3):
    """Best-of-``repeats`` seconds of ``generate`` (temperature 1, no top-k) with the eager loop and
    the static step, the two taking turns (so that a drift in the machine's speed hits both) after
    a warm-up each; and how many rows sampled EOS before ``new_tokens``."""
    model = HFCausalLM.from_pretrained(str(folder)).eval()
    timings, early = {"eager": [], "static": []}, 0
    for n in range(repeats + 1):
        for engine in timings:
            torch.manual_seed(n)
            start = time.perf_counter()
            out = generate(model, ids, new_tokens, attention_mask=mask, eos_token_id=eos, engine=engine)
            timings[engine].append(time.perf_counter() - start)
            early += int((out.response_mask.sum(1) < new_tokens).sum())
    return {engine: min(times[1:]) for engine, times in timings.items()}, early


def _row(label: str, rows: int, step_s: float, generation_s: float) -> None:
    print(f"  {label:<40}{rows / step_s:13.2f} {step_s:9.2f} {generation_s:10.2f} s {step_s - generation_s:8.2f} s")


def bench_hf_grpo_step(
    shape: str = "tinystories",
    prompts: int = 8,
    generations: int = 4,
    new_tokens: int = 48,
    steps: int = 3,
    tokenizer_path: str | None = None,
    overrides: dict | None = None,
    vocabulary: str = "r50k",
) -> dict[str, float]:
    """Generation with each engine, then GRPO steps (ours eager, ours static, TRL), side by side.

    Args:
        shape: A key of ``SHAPES``.
        prompts: Prompts per step.
        generations: Completions per prompt.
        new_tokens: Tokens sampled per completion.
        steps: Timed steps, after one warm-up step (and generation's best of 3).
        tokenizer_path: Local ``r50k_base.tiktoken`` (default: ``../shared``'s).
        overrides: Config fields replacing the shape's (the tests shrink the model with them).
        vocabulary: ``r50k`` or ``byte`` (``tiny_hf.gpt2_tokenizer``'s; byte for the tests).

    Returns:
        The figures: parameters, generation seconds and tokens/s per engine, each GRPO run's
        completions/s and seconds (step, generation, update), and ours/TRL ratios when TRL ran.
    """
    vocab_file = Path(tokenizer_path) if tokenizer_path else R50K
    if vocabulary == "r50k" and not vocab_file.is_file():
        raise ConfigError(f"bench grpo-step --hf needs r50k_base.tiktoken: {vocab_file} is missing (--tokenizer-path).")
    workdir = Path(tempfile.mkdtemp(prefix="shraygpt-hf-step-"))
    folder = workdir / shape
    params = save_shape(shape, folder, overrides, vocabulary, vocab_file if vocabulary == "r50k" else None)
    data = PromptDataModule(
        source="arithmetic",
        tokenizer="hf",
        tokenizer_path=str(folder),
        batch_size=prompts,
        max_length=256,
        max_prompt_length=128,
        train_size=prompts * (steps + 1),
        val_size=prompts,
        test_size=prompts,
    )
    data.setup()
    train = data.splits["train"]
    texts = list(train["prompt_text"])
    batch = data.collate([train[i] for i in range(prompts)])
    ids, mask = (t.repeat_interleave(generations, 0) for t in (batch["input_ids"], batch["attention_mask"]))
    eos, rows = data.tokenizer.eot_token, prompts * generations
    prompt_tokens = sum(len(p) for p in train["prompt_ids"]) / len(train)
    trl = trl_importable()
    print(
        f"bench grpo-step --hf {shape}: {SHAPES[shape][0]} of {params / 1e6:.1f} M parameters, random init, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"  {prompts} arithmetic prompts ({prompt_tokens:.1f} tokens on average) x {generations} generations x "
        f"{new_tokens} new tokens, temperature 1, no top-k, beta=0, AdamW lr {LEARNING_RATE:g}"
    )
    seconds, early = time_engines(folder, ids, mask, new_tokens, eos)
    print(
        f"  A random model almost never samples EOS, so every generation runs all {new_tokens} decode steps in every "
        f"engine, ours and TRL's\n  (a loop stops only when all its rows have ended; rows that sampled EOS early "
        f"in the {2 * 4 * rows} generated below: {early})"
    )
    tokens = rows * new_tokens
    result = {"parameters": float(params)}
    print(f"generate alone, {rows} rows ({prompts} prompts x {generations}) x {new_tokens} tokens, best of 3:")
    for engine, s in seconds.items():
        result |= {f"generate_{engine}_s": s, f"generate_{engine}_tokens_per_s": tokens / s}
        print(f"  {engine:<8} {s:8.2f} s  {tokens / s:8.0f} tokens/s")
    result["generate_static_over_eager"] = seconds["eager"] / seconds["static"]
    print(f"  static / eager: {result['generate_static_over_eager']:.2f}x the tokens/s")
    title = f"GRPO step, mean of {steps} after 1 warm-up"
    print(f"{title:<42}{'completions/s':>13} {'s/step':>9} {'generation':>12} {'update':>10}")
    for engine in ("eager", "static"):
        torch.manual_seed(0)
        stage = GRPOStage(
            policy=str(folder),
            rollout_engine=engine,
            num_generations=generations,
            max_new_tokens=new_tokens,
            beta=0.0,
            optimizer="adamw",
            lr=LEARNING_RATE,
            export_path=None,
            log_samples_every=0,
        )
        timed = fit_and_time(stage, data, steps, accelerator="cpu")
        step_s, gen_s = timed["step_s"], timed["generation_s"]
        result |= {f"{engine}_completions_per_s": rows / step_s, f"{engine}_step_s": step_s}
        result |= {f"{engine}_generation_s": gen_s, f"{engine}_update_s": timed["update_s"]}
        _row(f"ours, rollout_engine={engine}", rows, step_s, gen_s)
        del stage
    if not trl:
        print("  TRL GRPOTrainer: not importable here (pip install trl, or run with a Python that has it)")
        return result
    import trl as trl_module
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    timed = time_trl_grpo(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        AutoTokenizer.from_pretrained(folder),
        texts,
        generations=generations,
        new_tokens=new_tokens,
        micro=rows,
        rows=rows,
        steps=steps,
        output_dir=workdir / "trl",
        device=torch.device("cpu"),
        temperature=1.0,
        top_k=0,
        learning_rate=LEARNING_RATE,
        disable_dropout=True,
        gradient_checkpointing=False,  # TRL's default is on; ours keeps the activations, as this does
        bf16=False,
        use_cpu=True,
    )
    step_s, gen_s = timed["step_s"], timed["generation_s"]
    result |= {"trl_completions_per_s": rows / step_s, "trl_step_s": step_s, "trl_generation_s": gen_s}
    result |= {"trl_update_s": step_s - gen_s}
    result |= {f"{e}_over_trl": step_s / result[f"{e}_step_s"] for e in ("static", "eager")}
    _row(f"TRL {trl_module.__version__} GRPOTrainer", rows, step_s, gen_s)
    static, eager = result["static_over_trl"], result["eager_over_trl"]
    print(f"  ours / TRL in completions/s: rollout_engine=static {static:.2f}x, eager {eager:.2f}x")
    print("  (TRL samples with model.generate and its dynamic cache, then takes one forward/backward of all rows")
    print("  that also computes per-token entropies, activation checkpointing off as ours; its reward is the")
    print("  completion's length, ours the arithmetic verifier's)")
    return result
