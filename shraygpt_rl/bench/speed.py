"""Speed benchmarks: side-by-side ratios from a single run (a noisy machine cancels out).

Each benchmark also checks that the fast path computes the same thing as the slow one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from shraygpt_rl.bench import BENCH_SHAPE
from shraygpt_rl.layers import MoE
from shraygpt_rl.model import ShrayGPT


def _time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _set_dense(model: torch.nn.Module, dense: bool) -> None:
    for module in model.modules():
        if isinstance(module, MoE):
            module.dense = dense


@torch.no_grad()
def course_generate(model: ShrayGPT, prompt: torch.Tensor, max_new_tokens: int, top_k: int | None = 1) -> torch.Tensor:
    """The course's ``generate_nocache``: recompute the whole prefix per token, one prompt at a
    time; top-1 is greedy, otherwise top-k filtering, softmax and ``torch.multinomial``."""
    for _ in range(max_new_tokens):
        logits, _, _ = model(prompt)  # (1, T, V): logits for every position, as the course did
        logits = logits[:, -1]
        if top_k == 1:
            token = logits.argmax(dim=-1, keepdim=True)
        else:
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(logits.softmax(dim=-1), 1)
        prompt = torch.cat([prompt, token], dim=1)
    return prompt


def bench_generation(num_prompts: int = 16, new_tokens: int = 64, top_k: int = 1, seed: int = 0) -> dict[str, float]:
    """New tokens per second: the static decode step and the eager loop (both batched and cached)
    against the course's way; ``top_k`` 1 is greedy, more samples."""
    torch.manual_seed(seed)
    model = ShrayGPT(**BENCH_SHAPE).eval()
    lengths = torch.randint(24, 49, (num_prompts,), generator=torch.Generator().manual_seed(seed)).tolist()
    prompts = [torch.randint(0, BENCH_SHAPE["vocab_size"], (1, n)) for n in lengths]
    width = max(lengths)
    batch = torch.zeros(num_prompts, width, dtype=torch.long)
    mask = torch.zeros(num_prompts, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        batch[i, width - p.size(1) :], mask[i, width - p.size(1) :] = p[0], 1
    total = num_prompts * new_tokens
    how = "greedy" if top_k == 1 else f"top-k {top_k} sampling"
    print(
        f"generation: {num_prompts} prompts of {min(lengths)}-{max(lengths)} tokens x {new_tokens} new tokens, "
        f"d_model 256, 4 layers, 4 experts top-2, vocab 50257, {how}, {torch.get_num_threads()} threads"
    )

    def batched(static: bool):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(
            batch,
            new_tokens,
            top_k=top_k,
            attention_mask=mask,
            engine="static" if static else "eager",
            generator=generator,
        )

    _set_dense(model, True)  # the course ran every expert on every token
    start = time.perf_counter()
    reference = [course_generate(model, p, new_tokens, top_k) for p in prompts]
    t_course = time.perf_counter() - start
    _set_dense(model, False)
    t_eager = _time(lambda: batched(False), repeats=3)
    t_static = _time(lambda: batched(True), repeats=3)

    static, eager = batched(True), batched(False)
    rows = [
        ("course: no cache, one prompt at a time, dense MoE", t_course),
        ("batched + cached, eager loop", t_eager),
        ("batched + cached, static decode step (shraygpt-rl)", t_static),
    ]
    for name, seconds in rows:
        print(f"  {name:<52} {total / seconds:9.1f} tok/s   {t_course / seconds:6.1f}x")
    same_as_eager = sum(torch.equal(a, b) for a, b in zip(static.responses, eager.responses))
    print(f"  static decode step = eager loop, same seed: {same_as_eager}/{num_prompts} rows")
    results = {"speedup": t_course / t_static, "static_over_eager": t_eager / t_static, "same_as_eager": same_as_eager}
    if top_k == 1:
        same = sum(torch.equal(static.responses[i], ref[0, -new_tokens:]) for i, ref in enumerate(reference))
        print(f"  greedy outputs identical to the course's way: {same}/{num_prompts} rows")
        results["identical_rows"] = same
    return results


def bench_moe(tokens: int = 1024, d_model: int = 1024, num_experts: int = 6, top_k: int = 2) -> dict[str, float]:
    """One MoE layer at the course's size: sparse dispatch against the dense formulation."""
    torch.manual_seed(0)
    moe = MoE(d_model, num_experts, top_k)
    x = torch.randn(1, tokens, d_model)
    print(
        f"moe: {tokens} tokens, d_model {d_model}, {num_experts} experts top-{top_k} + shared expert, "
        f"ideal FLOP ratio {(num_experts + 1) / (top_k + 1):.2f}, {torch.get_num_threads()} threads"
    )
    results = {}
    for mode, grad in (("forward", False), ("forward+backward", True)):
        timings = {}
        for dense in (True, False):
            moe.dense = dense

            def step(grad=grad):
                with torch.set_grad_enabled(grad):
                    y, aux = moe(x.requires_grad_(grad))
                    if grad:
                        (y.square().mean() + aux).backward()
                return y

            timings[dense] = _time(step, repeats=5)
        ratio = timings[True] / timings[False]
        results[mode] = ratio
        dense_ms, sparse_ms = timings[True] * 1e3, timings[False] * 1e3
        print(f"  {mode:<17} dense {dense_ms:8.1f} ms   sparse {sparse_ms:8.1f} ms   {ratio:5.2f}x")
    with torch.no_grad():
        moe.dense = True
        y_dense, aux_dense = moe(x)
        moe.dense = False
        y_sparse, aux_sparse = moe(x)
    err = (y_dense - y_sparse).abs().max().item()
    print(f"  max |sparse - dense| = {err:.2e}, aux loss equal: {torch.allclose(aux_dense, aux_sparse)}")
    results["max_abs_err"] = err
    return results
