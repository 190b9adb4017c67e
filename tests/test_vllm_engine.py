"""The vLLM rollout engine (``vllm_engine.py``) against the eager engine, on a tiny random OPT.

Skipped where vLLM is not installed (as in CI). vLLM's CPU attention refuses heads of width 16,
so the model here has heads of width 64. One ``vllm.LLM`` serves the whole module (its start-up is
most of the cost), in the pytest worker's own process: the tests share one worker.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from shraygpt_rl.bench.tiny_hf import tiny_hf_model
from shraygpt_rl.engines import EagerEngine, GenerationOutput
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.fixed_shape import Sampling
from shraygpt_rl.generation import generate, response_logits, response_logprobs
from shraygpt_rl.hf import HFCausalLM
from shraygpt_rl.lora import LoRASpec, merge_lora
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.policy import with_lora
from shraygpt_rl.vllm_engine import VLLMEngine, merged_state_dict

pytest.importorskip("vllm", reason="needs vLLM (the optional vllm extra: pip install -e '.[vllm]')")

pytestmark = [pytest.mark.xdist_group("vllm"), pytest.mark.timeout(600)]

# Largest gap measured between vLLM's log-probabilities (float32, CPU) and the training forward's:
# 5e-7; the tolerance leaves room for other CPUs' kernels.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory) -> Path:
    """A tiny random OPT (2 layers, 2 heads of width 64) with a byte-level tokenizer."""
    wide = dict(hidden_size=128, word_embed_proj_dim=128, ffn_dim=256, num_attention_heads=2)
    return tiny_hf_model("opt", tmp_path_factory.mktemp("vllm-opt"), max_position_embeddings=256, **wide)


@pytest.fixture(scope="module")
def policy(opt_folder) -> HFCausalLM:
    return HFCausalLM.from_pretrained(str(opt_folder)).eval()


@pytest.fixture(scope="module")
def engine(policy) -> VLLMEngine:
    """The engine, started by a first (greedy) generation; ``engine.kept`` records whether the
    start left this process's random state, thread count and ``torch.set_num_threads`` alone."""
    engine, set_num_threads, threads = VLLMEngine(), torch.set_num_threads, torch.get_num_threads()
    rng, environment = torch.random.get_rng_state(), dict(os.environ)
    generate(policy, torch.tensor([[72, 105]]), 2, temperature=0, engine=engine)
    added = set(os.environ) - set(environment) - {"VLLM_ENABLE_V1_MULTIPROCESSING"}  # set on purpose
    engine.kept = (
        torch.equal(torch.random.get_rng_state(), rng),
        torch.set_num_threads is set_num_threads,
        torch.get_num_threads() == threads,
        sorted(added),
    )
    return engine


def test_start_leaves_process_state(engine):
    """An in-process vLLM seeds the global generators, disables ``torch.set_num_threads`` and sets
    environment variables for its workers (``LD_PRELOAD`` …): the engine undoes all three."""
    assert engine.kept == (True, True, True, [])


def test_sampling_leaves_the_global_generator_alone(policy, engine, prompts):
    """With the caller's generator, a sampled generation draws nothing from torch's global one,
    as the exact engines do not."""
    idx, mask = prompts
    state = torch.random.get_rng_state()
    generate(policy, idx, 6, attention_mask=mask, generator=torch.Generator().manual_seed(1), engine=engine)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_row_of_padding_only_is_refused_in_one_sentence(policy, engine, prompts):
    idx, mask = prompts
    mask = mask.clone()
    mask[1] = 0
    with pytest.raises(ConfigError, match="needs at least one prompt token per row"):
        generate(policy, idx, 4, attention_mask=mask, engine=engine)


def test_another_model_of_the_same_architecture_is_loaded(policy, engine, prompts):
    """The reference and the policy share an architecture, not weights: switching loads."""
    idx, mask = prompts
    other = copy.deepcopy(policy)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    loads = engine.loads
    generate(other, idx, 6, attention_mask=mask, temperature=0, engine=engine)
    generate(policy, idx, 6, attention_mask=mask, temperature=0, engine=engine)
    assert engine.loads == loads + 2


@pytest.fixture
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of different lengths, left-padded with 256 (EOS)."""
    idx = torch.tensor([[256, 256, 256, 72, 105], [84, 104, 101, 32, 99], [256, 65, 32, 98, 105]])
    return idx, (idx != 256).long()


def check_layout(out: GenerationOutput, idx, mask, max_new_tokens: int, stops, pad: int) -> None:
    """What every engine's output looks like (``EagerEngine``'s layout)."""
    B, P = idx.shape
    N = out.responses.size(1)
    lengths = out.response_mask.sum(1)
    assert out.prompt_length == P and out.sequences.shape == (B, P + N) and out.logprobs.shape == (B, N)
    assert N == int(lengths.max()) and N <= max_new_tokens
    assert torch.equal(out.sequences[:, :P], idx) and torch.equal(out.attention_mask[:, :P], mask)
    assert torch.equal(out.attention_mask[:, P:], out.response_mask)
    for row, n in zip(out.responses, lengths.tolist()):
        hit = [k for k, t in enumerate(row[:n].tolist()) if t in stops]
        assert hit in ([], [n - 1])  # the row ends at its first stop token, included
        assert n == max_new_tokens or hit  # or runs the whole budget
        assert (row[n:] == pad).all()
    for mask_row in out.response_mask:
        n = int(mask_row.sum())
        assert mask_row[:n].all() and not mask_row[n:].any()  # 1s then 0s
    assert (out.logprobs[out.response_mask == 0] == 0).all()


def test_layout_matches_eager(policy, engine, prompts):
    """Sampled rows that stop at different steps: the eager engine's layout, padding after each end."""
    idx, mask = prompts
    stops = tuple(range(0, 257, 3))  # a third of the vocabulary: rows end after a few tokens
    outs = {
        name: generate(policy, idx, 12, eos_token_id=stops, attention_mask=mask, pad_token_id=256, engine=e)
        for name, e in (("eager", EagerEngine()), ("vllm", engine))
    }
    for out in outs.values():
        check_layout(out, idx, mask, 12, stops, 256)
        assert out.sequences.dtype == idx.dtype and out.attention_mask.dtype == torch.long
    assert (outs["vllm"].logprobs[outs["vllm"].response_mask == 1] < 0).all()


def test_greedy_matches_eager(policy, engine, prompts):
    """Greedy tokens, masks and (zero) log-probabilities equal the eager engine's, stop included."""
    idx, mask = prompts
    eager = generate(policy, idx, 16, temperature=0, attention_mask=mask, engine="eager")
    ours = generate(policy, idx, 16, temperature=0, attention_mask=mask, engine=engine)
    assert torch.equal(ours.sequences, eager.sequences) and not ours.logprobs.any()
    stop = int(eager.responses[0, 3])  # row 0 ends at its 4th token; the others wherever it comes
    eager = generate(policy, idx, 16, temperature=0, eos_token_id=stop, attention_mask=mask, engine="eager")
    ours = generate(policy, idx, 16, temperature=0, eos_token_id=stop, attention_mask=mask, engine=engine)
    for field in ("sequences", "attention_mask", "response_mask", "logprobs"):
        assert torch.equal(getattr(ours, field), getattr(eager, field)), field
    check_layout(ours, idx, mask, 16, (stop,), stop)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_training_forward(policy, engine, prompts, temperature):
    """vLLM's log-probabilities of its samples are the training forward's, at the temperature."""
    idx, mask = prompts
    g = torch.Generator().manual_seed(0)
    out = generate(policy, idx, 24, temperature=temperature, attention_mask=mask, generator=g, engine=engine)
    with torch.no_grad():
        ours, _, _ = response_logprobs(policy, out.sequences, out.attention_mask, out.prompt_length, temperature)
    gap = ((ours - out.logprobs) * out.response_mask).abs().max()
    assert gap < LOGPROB_ATOL, float(gap)


def test_logprobs_after_top_k_and_top_p(policy, engine, prompts):
    """With top-k or top-p, the log-probability is under the truncated, renormalised distribution,
    as the other engines return it."""
    idx, mask = prompts
    for top_k, top_p in ((20, None), (None, 0.8)):
        g = torch.Generator().manual_seed(1)
        out = generate(policy, idx, 16, top_k=top_k, top_p=top_p, attention_mask=mask, generator=g, engine=engine)
        with torch.no_grad():
            logits, _ = response_logits(policy, out.sequences, out.attention_mask, out.prompt_length)
        if top_k is not None:
            keep = logits >= logits.topk(top_k, dim=-1).values[..., -1:]
        else:
            probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs < top_p)
        truncated = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
        expected = truncated.gather(-1, out.responses[..., None])[..., 0].masked_fill(out.response_mask == 0, 0)
        assert ((expected - out.logprobs).abs() < LOGPROB_ATOL).all(), (top_k, top_p)


def test_seeded_runs_repeat(policy, engine, prompts):
    """The same generator seed gives the same samples; another seed other samples."""
    idx, mask = prompts

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(policy, idx, 16, attention_mask=mask, generator=g, engine=engine).sequences

    first = run(3)
    assert torch.equal(run(3), first) and not torch.equal(run(4), first)


def test_new_weights_are_loaded(policy, engine, prompts):
    """After an in-place change of the policy's weights the next generation uses them (and an
    unchanged policy is not loaded again)."""
    idx, mask = prompts
    before = generate(policy, idx, 16, temperature=0, attention_mask=mask, engine=engine)
    loads = engine.loads
    generate(policy, idx, 16, temperature=0, attention_mask=mask, engine=engine)
    assert engine.loads == loads
    params = [p for name, p in policy.named_parameters() if "layers.1" in name]
    with torch.no_grad():
        for p in params:
            p.mul_(1.5)
    try:
        after = generate(policy, idx, 16, temperature=0, attention_mask=mask, engine=engine)
        eager = generate(policy, idx, 16, temperature=0, attention_mask=mask, engine="eager")
        assert engine.loads == loads + 1
        assert not torch.equal(after.sequences, before.sequences)
        assert torch.equal(after.sequences, eager.sequences)
    finally:
        with torch.no_grad():
            for p in params:
                p.div_(1.5)


def test_lora_adapters_are_merged(opt_folder, engine, prompts, perturb_adapters):
    """A LoRA policy generates as its merged model does: the adapters go into vLLM's weights."""
    idx, mask = prompts
    lora = with_lora(HFCausalLM.from_pretrained(str(opt_folder)).eval(), LoRASpec(r=4, alpha=8, dropout=0.0))
    perturb_adapters(lora)
    merged = dict(merged_state_dict(lora.model))
    expected = merge_lora(copy.deepcopy(lora)).model.state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], v, atol=1e-6) for k, v in expected.items())
    base = HFCausalLM.from_pretrained(str(opt_folder)).eval()
    eager = generate(lora, idx, 16, temperature=0, attention_mask=mask, engine="eager")
    ours = generate(lora, idx, 16, temperature=0, attention_mask=mask, engine=engine)
    plain = generate(base, idx, 16, temperature=0, attention_mask=mask, engine="eager")
    assert torch.equal(ours.sequences, eager.sequences) and not torch.equal(ours.sequences, plain.sequences)


def test_refuses_shraygpt_and_turns(policy, prompts):
    """ShrayGPT (vLLM has no such architecture) and multi-turn rollouts are refused in one sentence."""
    idx, mask = prompts
    with pytest.raises(ConfigError, match="Hugging Face causal LMs only"):
        generate(ShrayGPT(**tiny_config()).eval(), idx, 4, attention_mask=mask, engine="vllm")
    with pytest.raises(ConfigError, match="multi-turn"):
        VLLMEngine().generate(policy, idx, mask, 4, Sampling(), turns=object())
