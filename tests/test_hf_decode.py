"""The fixed-shape decode step for Hugging Face models against the eager loop (the reference):
same seed, same tokens, masks and log-probabilities; those equal the training forward's in
float32; LoRA, tools, weight changes, windows, dropout and bf16."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import ByteTokenizer, Echo, frequent_byte

from shraygpt_rl import fixed_shape, hf_decode
from shraygpt_rl.engines import AutoEngine, EagerEngine, StaticEngine, make_engine
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.generation import generate, response_logprobs
from shraygpt_rl.hf import HFCausalLM
from shraygpt_rl.lora import AdaptersDisabled, LoRASpec, adapters_disabled, add_lora
from shraygpt_rl.turns import Turns

KINDS = ["gpt_neo", "opt", "llama", "qwen2", "gemma2"]
EOS = 256  # the byte tokenizer's <|endoftext|>; a second stop id is a frequent byte


@pytest.fixture(autouse=True)
def fresh_decoders(monkeypatch):
    monkeypatch.setattr(fixed_shape, "_DECODERS", type(fixed_shape._DECODERS)())


def load(tiny_hf, kind: str) -> HFCausalLM:
    return HFCausalLM.from_pretrained(str(tiny_hf(kind))).eval()


def prompts(groups: int = 3, repeats: int = 2, width: int = 9, seed: int = 0):
    """``groups`` distinct prompts, each ``repeats`` times in a row (as GRPO repeats them), two of
    them left-padded by different amounts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(97, 123, (groups, width), generator=g).repeat_interleave(repeats, 0)
    mask = torch.ones_like(ids)
    mask[:repeats, :3] = 0
    mask[-repeats:, :1] = 0
    return ids, mask


def both(model, ids, mask, new_tokens=20, seed=3, **options):
    """The eager and the static engine's outputs for the same seed."""
    outs = []
    for engine in ("eager", "static"):
        g = torch.Generator().manual_seed(seed)
        outs.append(generate(model, ids, new_tokens, attention_mask=mask, generator=g, engine=engine, **options))
    return outs


def assert_same(eager, static):
    assert torch.equal(static.sequences, eager.sequences)
    assert torch.equal(static.attention_mask, eager.attention_mask)
    assert torch.equal(static.response_mask, eager.response_mask)
    assert torch.allclose(static.logprobs, eager.logprobs, atol=1e-5)


def a_stop_token(model, ids, mask, options) -> int:
    """A token the model samples often with these options: rows that stop at it end at
    different steps."""
    out = generate(model, ids, 20, attention_mask=mask, generator=torch.Generator().manual_seed(3), **options)
    return ord(frequent_byte(out.responses))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_static_gives_the_eager_loops_tokens_and_the_training_forwards_logprobs(tiny_hf, kind, options):
    model = load(tiny_hf, kind)
    ids, mask = prompts()
    stop = a_stop_token(model, ids, mask, options)
    eager, static = both(model, ids, mask, eos_token_id=(EOS, stop), **options)
    assert_same(eager, static)
    lengths = static.response_mask.sum(1)
    assert int(lengths.min()) < 20  # a row ended at the stop token
    assert hf_decode.can_decode(model, ids.size(1) + 20)
    if "top_k" in options:
        return  # the training forward has no truncation: its log-probabilities differ by design
    with torch.no_grad():
        logprobs, _, _ = response_logprobs(
            model, static.sequences, static.attention_mask, static.prompt_length, options["temperature"]
        )
    real = static.response_mask.bool()
    assert (logprobs[real] - static.logprobs[real]).abs().max() < 1e-5


def test_one_prefill_per_distinct_prompt_changes_nothing(tiny_hf, monkeypatch):
    """Rows that repeat a prompt share its prefill; all-distinct rows take the other path; a row
    of one prompt gives what it gives alone."""
    model = load(tiny_hf, "llama")
    ids, mask = prompts(groups=2, repeats=3)
    assert hf_decode.can_decode(model, 20)  # its one-time check runs the decoder too
    calls = []
    decoder_call = type(model.model.get_decoder()).forward

    def spy(self, input_ids=None, **kwargs):
        calls.append(tuple(input_ids.shape))
        return decoder_call(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model.model.get_decoder()), "forward", spy)
    shared = generate(model, ids, 8, attention_mask=mask, top_k=1, engine="static")
    assert calls[0] == (2, ids.size(1))  # two distinct prompts prefilled, not six
    alone = generate(model, ids[:1], 8, attention_mask=mask[:1], top_k=1, engine="static")
    assert calls[-8] == (1, ids.size(1))  # one row: nothing to share
    assert torch.equal(shared.sequences[:3], alone.sequences.expand(3, -1))
    eager = generate(model, ids, 8, attention_mask=mask, top_k=1, engine="eager")
    assert torch.equal(shared.sequences, eager.sequences)


@pytest.mark.parametrize("kind", ["gpt_neo", "opt"])
def test_lora_adapters_decode_as_the_eager_loop_and_can_be_switched_off(tiny_hf, kind):
    model = add_lora(load(tiny_hf, kind), LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    ids, mask = prompts()
    eager, static = both(model, ids, mask)
    assert_same(eager, static)
    with adapters_disabled(model):
        base_eager, base_static = both(model, ids, mask)
    assert_same(base_eager, base_static)
    assert not torch.equal(base_static.sequences, static.sequences)


def test_a_weight_update_between_generations_is_decoded(tiny_hf):
    """The packed head is refreshed when any weight changes in place (an optimizer step), and
    the trunk runs the model's own modules."""
    model = load(tiny_hf, "opt")
    ids, mask = prompts()
    before = generate(model, ids, 12, attention_mask=mask, top_k=1, engine="static")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    logits = model(before.sequences)[0]
    logits.logsumexp(-1).mean().backward()
    optimizer.step()
    eager, static = both(model, ids, mask, new_tokens=12, top_k=1)
    assert_same(eager, static)
    assert not torch.equal(static.sequences, before.sequences)


@pytest.mark.parametrize("kind", ["gpt_neo", "qwen2"])
def test_tool_observations_are_fed_as_in_the_eager_loop(tiny_hf, kind):
    """Greedy, so that the random model's favourite byte, the tool's trigger, comes back."""
    model = load(tiny_hf, kind)
    ids, mask = prompts(groups=2, repeats=2)
    enc = ByteTokenizer()
    stop = frequent_byte(generate(model, ids, 40, attention_mask=mask, top_k=1).responses)
    outs = []
    for engine in ("eager", "static"):
        turns = Turns(Echo(stop), enc, ["p"] * len(ids), [{}] * len(ids), 4, 40)
        outs.append(generate(model, ids, 40, attention_mask=mask, top_k=1, engine=engine, turns=turns))
    eager, static = outs
    assert int(static.turns["tool_calls"].sum()) >= 2
    assert_same(eager, static)
    assert all(torch.equal(static.turns[k], eager.turns[k]) for k in eager.turns)
    assert (static.attention_mask[:, static.prompt_length :] > static.response_mask).any()  # observations fed


def test_a_generation_wider_than_a_sliding_window_falls_back_to_eager(tiny_hf):
    """Gemma 2's sliding layers index their window by cache column: the tiny one's window is 64."""
    model = load(tiny_hf, "gemma2")
    ids, mask = prompts(width=20)
    assert hf_decode.attention_window(model) == 64
    assert hf_decode.can_decode(model, 64) and not hf_decode.can_decode(model, 65)
    assert StaticEngine.decoder_factory(model, 20 + 45) is None  # auto runs eager
    assert StaticEngine.decoder_factory(model, 20 + 44) is hf_decode.hf_decoder
    with pytest.raises(ConfigError, match="rollout_engine 'static' cannot run"):
        generate(model, ids, 45, attention_mask=mask, engine="static")
    auto = generate(model, ids, 45, attention_mask=mask, top_k=1)  # eager under auto
    assert torch.equal(auto.sequences, generate(model, ids, 45, attention_mask=mask, top_k=1, engine="eager").sequences)


def test_training_mode_and_an_inexact_model_fall_back_to_eager(tiny_hf, monkeypatch):
    model = load(tiny_hf, "opt")  # functional dropout of 0.1: no nn.Dropout module shows it
    assert not hf_decode.can_decode(model.train(), 20) and hf_decode.can_decode(model.eval(), 20)
    other = load(tiny_hf, "llama")
    forward = hf_decode.HFDecoder.forward
    monkeypatch.setattr(hf_decode.HFDecoder, "forward", lambda self, tokens: forward(self, tokens) + 0.01)
    assert not hf_decode.can_decode(other, 20)  # the check compares with the training forward
    assert StaticEngine.decoder_factory(other, 20) is None  # auto runs eager


def test_auto_checks_the_model_once_per_generation(tiny_hf, monkeypatch):
    """Choosing the step walks the model's parameters: ``auto`` does it once, not once to pick and
    again to run."""
    model = load(tiny_hf, "llama")
    ids, mask = prompts()
    calls = []
    check = hf_decode.can_decode
    monkeypatch.setattr(hf_decode, "can_decode", lambda *args: calls.append(args) or check(*args))
    generate(model, ids, 4, attention_mask=mask, engine="auto")
    assert len(calls) == 1


def test_bf16_autocast_decodes_with_a_bf16_head(tiny_hf):
    model = load(tiny_hf, "llama")
    ids, mask = prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, ids, 12, attention_mask=mask, generator=torch.Generator().manual_seed(1), engine="static")
        with torch.no_grad():
            logprobs, _, _ = response_logprobs(model, out.sequences, out.attention_mask, out.prompt_length)
    (head,) = fixed_shape._DECODERS[model]["head"].values()
    assert head.dtype == torch.bfloat16
    real = out.response_mask.bool()
    assert (logprobs[real] - out.logprobs[real]).abs().max() < 0.1  # bf16 rounding, not another model


def test_engine_names_are_checked_in_one_sentence():
    assert isinstance(make_engine("auto"), AutoEngine) and isinstance(make_engine("eager"), EagerEngine)
    engine = StaticEngine()
    assert make_engine(engine) is engine
    with pytest.raises(ConfigError, match="rollout_engine must be one of auto, static, eager, vllm; got 'fast'"):
        make_engine("fast")


def test_the_vllm_engine_where_vllm_is_absent_says_how_to_install_it():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/test_vllm_engine.py runs it")
    with pytest.raises(
        ConfigError, match=r'needs vLLM, which is not installed; install the extra: pip install -e "\.\[vllm\]"'
    ):
        make_engine("vllm")


def test_the_hf_step_traces_as_one_graph(tiny_hf):
    """``fullgraph=True`` fails on any graph break (a host sync): Gemma 2's step, sliding layer
    and soft-capping included, traces whole, which is what a CUDA graph of it would need (the
    step is not captured yet: docs/model.md)."""
    model = load(tiny_hf, "gemma2")
    ids, mask = prompts(groups=2, repeats=1, width=5)
    decoder = hf_decode.hf_decoder(model, 2, 12, fixed_shape.Sampling(eos_token_id=7))
    decoder.prefill(model, ids, mask)
    torch._dynamo.reset()
    step = torch.compile(decoder._step, fullgraph=True, backend="eager")
    step()
    step()
    assert int(decoder.t) == 2 and decoder.valid[:, 5:7].all()


@pytest.mark.parametrize("engine", ["static", "eager"])
def test_a_lora_runs_reference_samples_the_policy_with_its_adapters_off(tiny_hf, engine):
    """``AdaptersDisabled`` (the reference of a LoRA run) goes through every engine as its
    policy with the adapters switched off: the base model's samples."""
    base = load(tiny_hf, "opt")
    ids, mask = prompts()
    expected = generate(base, ids, 10, attention_mask=mask, top_k=1, engine="eager")
    policy = add_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = generate(AdaptersDisabled(policy), ids, 10, attention_mask=mask, top_k=1, engine=engine)
    assert torch.equal(out.sequences, expected.sequences)
    assert not torch.equal(generate(policy, ids, 10, attention_mask=mask, top_k=1).sequences, expected.sequences)


def test_the_exactness_check_covers_the_shared_prefill(tiny_hf, monkeypatch):
    """A broken copy of a shared prompt's keys and values (each row given another row's) is
    caught by the per-model check, so ``auto`` decodes that model eagerly."""
    model = load(tiny_hf, "llama")
    distinct = hf_decode.distinct_prompts

    def wrong_rows(idx, mask):
        shared = distinct(idx, mask)
        return None if shared is None else (*shared[:2], shared[2].flip(0))

    monkeypatch.setattr(hf_decode, "distinct_prompts", wrong_rows)
    assert not hf_decode.can_decode(model, 20)


def test_the_window_check_uses_the_cache_width_the_device_rounds_to(tiny_hf, monkeypatch):
    """On CUDA the cache is rounded up (to share captured graphs): that width must fit the window."""
    model = load(tiny_hf, "gemma2")
    assert hf_decode.can_decode(model, 50)
    monkeypatch.setattr(hf_decode, "capacity_bucket", lambda tokens, device: -(-tokens // 128) * 128)
    assert not hf_decode.can_decode(model, 50)
