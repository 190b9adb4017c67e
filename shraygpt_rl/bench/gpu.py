"""GPU speed at the course's size, in one run: the decode step, one GRPO step, the FLOP rate
achieved against a bf16 matmul rate measured beside it, and TRL's GRPOTrainer on a same-shape
Qwen2-MoE when ``trl`` is importable.

The course shape is ``course_config(block_size=1024)``: 1.58 B parameters (0.77 B active), random
init, bf16 autocast (the policy's weights stay float32, as under ``--trainer.precision
bf16-mixed``). A random model almost never samples EOS, so every completion runs the full length.
``--shape tiny --device cpu`` runs the same code at toy size, for the tests.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch

from shraygpt_rl.bench.throughput import fit_and_time, step_flops
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.decode import static_decoder
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.fixed_shape import Sampling
from shraygpt_rl.model import ShrayGPT, course_config, tiny_config
from shraygpt_rl.stages.grpo import GRPOStage

Shape = Literal["course", "tiny"]


def shape_config(shape: Shape) -> dict:
    return course_config(block_size=1024) if shape == "course" else tiny_config(block_size=512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """This device's bf16 matmul rate (TFLOP/s) on n x n matrices (float32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def bench_decode(
    model: ShrayGPT, batches: tuple[int, ...], prompt_tokens: int = 128, steps: int = 64, eager_steps: int = 4
) -> dict[int, dict[str, float]]:
    """Milliseconds per decode step (top-k 50) at each batch size: the static step (replayed as a
    CUDA graph after its first two steps) against the eager loop, prefill excluded."""
    device = model.tok_emb.weight.device
    results = {}
    for B in batches:
        ids = torch.randint(0, model.vocab_size, (B, prompt_tokens), device=device)
        mask = torch.ones_like(ids)
        with _autocast(device):
            decoder = static_decoder(model, B, prompt_tokens + steps + 4, Sampling(top_k=50))
            decoder.prefill(model, ids, mask)
            for _ in range(3):  # two eager warm-up steps, then the capture
                decoder.step()
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                decoder.step()
            _sync(device)
            static_ms = (time.perf_counter() - start) / steps * 1e3
            eager_ms = _eager_step_ms(model, ids, mask, eager_steps)
        results[B] = {"static_ms": static_ms, "eager_ms": eager_ms, "tokens_per_s": B / static_ms * 1e3}
        print(
            f"  decode batch {B:>4}: static {static_ms:7.2f} ms/step ({B / static_ms * 1e3:9.0f} tok/s)   "
            f"eager loop {eager_ms:7.2f} ms/step   {eager_ms / static_ms:5.1f}x"
        )
    return results


def _eager_step_ms(model: ShrayGPT, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    """The eager loop's time per step: a generation of ``steps + 1`` tokens less one of 1."""
    device = ids.device
    timings = []
    for n in (1, steps + 1, 1, steps + 1):
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, n, top_k=50, attention_mask=mask, engine="eager")
        _sync(device)
        timings.append(time.perf_counter() - start)
    return (timings[3] - timings[2]) / steps * 1e3


def bench_grpo(
    shape: Shape,
    device: torch.device,
    prompts: int,
    generations: int,
    new_tokens: int,
    micro_batch_size: int,
    steps: int,
    tokenizer_path: str | None,
    logprob_chunk_rows: int | None = None,
) -> dict[str, float]:
    """GRPO steps through Lightning (bf16-mixed on GPU): completions/s, the split, peak memory."""
    config = shape_config(shape)
    tokenizer = "r50k_base" if shape == "course" else "byte"
    data = PromptDataModule(
        source="arithmetic",
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path if shape == "course" else None,
        batch_size=prompts,
        max_length=config["block_size"],
        max_prompt_length=256,
        train_size=prompts * (steps + 1),
    )
    with torch.device(device):  # a 1.6 B model is initialised on the GPU, not the CPU
        stage = GRPOStage(
            model_config=config,
            num_generations=generations,
            max_new_tokens=new_tokens,
            top_k=50,
            beta=0.0,
            optimizer="adamw",
            lr=1e-6,
            micro_batch_size=micro_batch_size,
            logprob_chunk_rows=logprob_chunk_rows,
            export_path=None,
            log_samples_every=0,
        )
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timed = fit_and_time(
        stage, data, steps, accelerator="gpu" if cuda else "cpu", precision="bf16-mixed" if cuda else "32-true"
    )
    rows = prompts * generations
    step_s, gen_s = timed["step_s"], timed["generation_s"]
    flops = step_flops(stage.policy, rows, timed["prompt_tokens"], new_tokens)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return {"completions_per_s": rows / step_s, "step_s": step_s, "generation_s": gen_s, "flops": flops, "peak": peak}


def bench_trl(
    shape: Shape, device: torch.device, prompts: int, generations: int, new_tokens: int, micro: int, steps: int, vocab
):
    """TRL's GRPOTrainer on a Qwen2-MoE of the same shape and batch: seconds per step, or None
    when trl is not importable."""
    if not trl_importable():
        return None
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from shraygpt_rl.bench.tiny_hf import gpt2_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="shraygpt-trl-"))
    tokenizer = gpt2_tokenizer("r50k" if shape == "course" else "byte", folder, vocab_file=vocab)
    tokenizer.pad_token = tokenizer.eos_token
    c = shape_config(shape)
    hidden = -(-int(2.68 * c["d_model"]) // 8) * 8  # ShrayGPT's expert width (2744 at course size), a multiple of 8
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=c["d_model"],
        num_hidden_layers=c["n_layers"],
        num_attention_heads=c["n_head"],
        num_key_value_heads=c["n_head"],
        num_experts=c["num_experts"],
        num_experts_per_tok=c["num_experts_per_tok"],
        moe_intermediate_size=hidden,
        shared_expert_intermediate_size=hidden,
        intermediate_size=hidden,
        max_position_embeddings=c["block_size"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch.device(device):
        model = Qwen2MoeForCausalLM(config)
    cuda = device.type == "cuda"
    questions = [f"What is {a} + {b}? Answer:" for a, b in zip(range(10, 99), range(30, 119))]
    timed = time_trl_grpo(
        model,
        tokenizer,
        (questions * 10)[: prompts * (steps + 1)],
        generations=generations,
        new_tokens=new_tokens,
        micro=micro,
        rows=prompts * generations,
        steps=steps,
        output_dir=folder,
        device=device,
        top_k=50,
        learning_rate=1e-6,
        bf16=cuda,
        use_cpu=not cuda,
    )
    return timed["step_s"]


def trl_importable() -> bool:
    """Whether ``trl`` (and the ``datasets`` it needs) import here."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def time_trl_grpo(
    model,
    tokenizer,
    prompts: list[str],
    generations: int,
    new_tokens: int,
    micro: int,
    rows: int,
    steps: int,
    output_dir: str | Path,
    device: torch.device,
    **config,
) -> dict[str, float]:
    """Run TRL's GRPOTrainer for one warm-up step and ``steps`` timed ones.

    Each step samples ``generations`` completions of up to ``new_tokens`` tokens for ``rows //
    generations`` of ``prompts`` (texts, taken in order) and takes one optimizer step over the
    ``rows`` completions, in forward/backward passes of ``micro`` rows. The reward is the
    completion's length in characters (cheap, and it varies within a group). Needs ``trl``.

    Args:
        model: A ``transformers`` causal LM; its ``generate`` is timed, so it is wrapped in place.
        tokenizer: Its tokenizer, with a pad token.
        prompts: At least ``rows // generations * (steps + 1)`` prompt texts.
        generations: Completions per prompt (``num_generations``).
        new_tokens: ``max_completion_length``.
        micro: ``per_device_train_batch_size``, in completions.
        rows: Completions per optimizer step.
        steps: Timed steps, after one warm-up step.
        output_dir: TRL's output folder (nothing is saved there).
        device: Where the model runs (for the timer's synchronisation).
        **config: Further ``GRPOConfig`` fields (``top_k``, ``learning_rate``, ``bf16``, ``use_cpu`` …).

    Returns:
        The timed steps' mean seconds: ``step_s`` (optimizer step to optimizer step) and
        ``generation_s`` (in ``model.generate``).
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro,
        num_generations=generations,
        max_completion_length=new_tokens,
        beta=0.0,
        max_steps=steps + 1,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        save_strategy="no",
        **config,
    )
    dataset = Dataset.from_dict({"prompt": prompts[: rows // generations * (steps + 1)]})
    generation_s: list[float] = []
    generate = model.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        _sync(device)
        generation_s.append(time.perf_counter() - start)
        return out

    model.generate = timed_generate  # TRL calls the unwrapped model's generate (no vLLM)

    class Timer(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.stamps.append(time.perf_counter())

    timer = Timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    per_step = len(generation_s) // (steps + 1)  # generate calls per step (one, unless micro-batched)
    return {
        "step_s": (timer.stamps[-1] - timer.stamps[0]) / (len(timer.stamps) - 1),
        "generation_s": sum(generation_s[per_step:]) / steps,
    }


def bench_gpu(
    shape: Shape = "course",
    device: str = "cuda",
    batches: tuple[int, ...] = (8, 32, 128),
    prompts: int = 16,
    generations: int = 8,
    new_tokens: int = 128,
    micro_batch_size: int = 32,
    steps: int = 2,
    tokenizer_path: str | None = None,
    logprob_chunk_rows: int | None = None,
) -> dict[str, float]:
    """Everything the module docstring lists, printed side by side."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench gpu needs a CUDA GPU; `--device cpu --shape tiny` runs its code at toy size.")
    if shape == "course" and not (tokenizer_path and Path(tokenizer_path).is_file()):
        raise ConfigError("bench gpu at the course shape needs --tokenizer-path <r50k_base.tiktoken> (no download).")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peak = matmul_tflops(dev, n=8192 if dev.type == "cuda" else 512)
    with torch.device(dev):
        model = ShrayGPT(**shape_config(shape)).eval()
    params, active = model.num_parameters() / 1e9, model.num_parameters(active=True) / 1e9
    print(
        f"bench gpu: {name}, torch {torch.__version__}, {shape} shape "
        f"({params:.2f} B parameters, {active:.2f} B active)"
    )
    print(f"  {'bf16' if dev.type == 'cuda' else 'fp32'} matmul rate measured now: {peak:.1f} TFLOP/s")
    decode = bench_decode(model, batches)
    del model
    grpo = bench_grpo(
        shape, dev, prompts, generations, new_tokens, micro_batch_size, steps, tokenizer_path, logprob_chunk_rows
    )
    rows = prompts * generations
    achieved = grpo["flops"] / grpo["step_s"] / 1e12
    print(
        f"  GRPO step {prompts} x {generations} x {new_tokens} (beta 0, AdamW, micro-batch {micro_batch_size}): "
        f"{grpo['completions_per_s']:.2f} completions/s ({grpo['step_s']:.2f} s/step: generation "
        f"{grpo['generation_s']:.2f} s = {grpo['generation_s'] / grpo['step_s']:.0%}, update "
        f"{grpo['step_s'] - grpo['generation_s']:.2f} s), peak {grpo['peak']:.1f} GiB"
    )
    print(
        f"  achieved {achieved:.2f} TFLOP/s = {achieved / peak:.1%} of the matmul rate "
        f"({grpo['flops'] / 1e12:.2f} TFLOP per step)"
    )
    trl_s = bench_trl(shape, dev, prompts, generations, new_tokens, micro_batch_size, steps, tokenizer_path)
    result = {
        "completions_per_s": grpo["completions_per_s"],
        "achieved_tflops": achieved,
        **{f"decode_ms_{b}": d["static_ms"] for b, d in decode.items()},
    }
    if trl_s is None:
        print("  TRL: not importable here; pip install trl to run its GRPOTrainer beside ours")
    else:
        print(
            f"  TRL GRPOTrainer, same-shape Qwen2-MoE: {rows / trl_s:.2f} completions/s ({trl_s:.2f} s/step); "
            f"ours / TRL = {trl_s / grpo['step_s']:.1f}x"
        )
        result["trl_completions_per_s"] = rows / trl_s
    return result
