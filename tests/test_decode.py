"""The static decode step: the same tokens and log-probabilities as the eager loop and the
training forward, no data-dependent host sync, packed weights that follow the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shraygpt_rl import decode, fixed_shape
from shraygpt_rl.decode import can_decode, static_decoder
from shraygpt_rl.fixed_shape import KEEP_DECODERS, Sampling
from shraygpt_rl.lora import LoRASpec, adapters_disabled, add_lora
from shraygpt_rl.losses import token_logprobs
from shraygpt_rl.model import ShrayGPT, tiny_config

SAMPLINGS = [
    dict(top_k=1),  # greedy
    dict(temperature=1.0),  # the whole vocabulary
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, top_k=50, top_p=0.8),
]


def _left_pad(lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :], mask[i, width - n :] = torch.randint(1, vocab, (n,)), 1
    return ids, mask


@pytest.fixture
def wide_model() -> ShrayGPT:
    """A random model with a vocabulary large enough for top-k 50 and 3 layers of top-2 of 4."""
    torch.manual_seed(0)
    return ShrayGPT(**tiny_config(vocab_size=1000, n_layers=3)).eval()


def _generate(model, ids, mask, engine, seed=1, **options):
    generator = torch.Generator().manual_seed(seed)
    return model.generate(ids, 20, attention_mask=mask, generator=generator, engine=engine, **options)


@pytest.mark.parametrize("options", SAMPLINGS)
def test_static_decoding_gives_the_eager_loops_tokens_for_the_same_seed(wide_model, options):
    ids, mask = _left_pad([5, 13, 9, 2], wide_model.vocab_size)
    eager = _generate(wide_model, ids, mask, engine="eager", **options)
    static = _generate(wide_model, ids, mask, engine="static", **options)
    assert torch.equal(static.sequences, eager.sequences)
    assert torch.equal(static.attention_mask, eager.attention_mask)
    assert torch.allclose(static.logprobs, eager.logprobs, atol=1e-5)


@pytest.mark.parametrize("options", SAMPLINGS[1:])
def test_static_logprobs_are_the_training_forwards_in_float32(wide_model, options):
    """Every sampled token's log-probability under the sampling distribution, recomputed by one
    training forward over prompt + response with the same truncation, to 1e-5."""
    ids, mask = _left_pad([4, 11, 7], wide_model.vocab_size)
    out = _generate(wide_model, ids, mask, engine="static", **options)
    with torch.no_grad():
        logits, _, _ = wide_model(out.sequences, attention_mask=out.attention_mask)
    P = out.prompt_length
    step = logits[:, P - 1 : -1].float() / options.get("temperature", 1.0)  # (B, N, V)
    if options.get("top_k"):  # exactly k candidates; no ties among random logits
        kth = step.topk(options["top_k"], dim=-1).values[..., -1:]
        step = step.masked_fill(step < kth, float("-inf"))
    if options.get("top_p"):
        probs, order = step.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= options["top_p"]
        step = step.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    recomputed = F.log_softmax(step, -1).gather(-1, out.responses[..., None]).squeeze(-1)
    real = out.response_mask.bool()
    assert (recomputed[real] - out.logprobs[real]).abs().max() <= 1e-5


def test_rows_ending_early_give_the_eager_shapes_across_eos_checks(wide_model):
    """EOS is looked at on the host every EOS_CHECK_EVERY steps only; the output is still cut
    where the eager loop stops, at the last row's EOS."""
    ids, mask = _left_pad([6, 3, 8, 5, 7], wide_model.vocab_size)
    free = wide_model.generate(ids, 40, top_k=1, attention_mask=mask, engine="eager")
    eos = int(free.responses[0, 22])  # row 0 ends at step 23, after the first look at step 16
    for max_new_tokens in (40, 23, 17):
        eager = wide_model.generate(ids, max_new_tokens, top_k=1, attention_mask=mask, eos_token_id=eos, engine="eager")
        static = wide_model.generate(
            ids, max_new_tokens, top_k=1, attention_mask=mask, eos_token_id=eos, engine="static"
        )
        assert static.sequences.shape == eager.sequences.shape
        assert torch.equal(static.sequences, eager.sequences)
        assert torch.equal(static.response_mask, eager.response_mask)


def test_a_seeded_generator_ends_where_the_eager_loop_leaves_it(wide_model):
    """The static loop draws every step's uniforms ahead; a generator is left as if only the steps
    taken had drawn, so two generations in a row match the eager loop's two."""
    ids, mask = _left_pad([4, 6], wide_model.vocab_size)
    eos = int(wide_model.generate(ids, 20, top_k=1, attention_mask=mask).responses[0, 3])
    runs = {}
    for static in (False, True):
        generator = torch.Generator().manual_seed(5)
        runs[static] = [
            wide_model.generate(
                ids,
                20,
                attention_mask=mask,
                eos_token_id=eos,
                generator=generator,
                engine=("static" if static else "eager"),
            )
            for _ in range(2)
        ]
    for a, b in zip(runs[False], runs[True]):
        assert torch.equal(a.sequences, b.sequences)


# Four traces cover every branch of the sampler (greedy, the whole vocabulary, top-p, top-k with
# top-p) and both weight layouts; each trace takes a second or more.
TRACED = [(SAMPLINGS[0], False), (SAMPLINGS[1], True), (SAMPLINGS[3], False), (SAMPLINGS[4], True)]


@pytest.mark.parametrize(("options", "blocked"), TRACED)
def test_the_decode_step_traces_as_one_graph(wide_model, monkeypatch, blocked, options):
    """``fullgraph=True`` fails on any graph break: a ``.item()``, a ``bool()`` of a tensor, a
    data-dependent shape. A step that traces whole reads nothing back to the host."""
    monkeypatch.setattr(decode, "onednn_available", lambda dtype: blocked and torch.backends.mkldnn.is_available())
    monkeypatch.setattr(fixed_shape, "_DECODERS", type(fixed_shape._DECODERS)())
    ids, mask = _left_pad([3, 5], wide_model.vocab_size)
    sampling = Sampling(eos_token_id=7, **options)
    decoder = static_decoder(wide_model, 2, 12, sampling)
    assert decoder.weights.blocked == (blocked and torch.backends.mkldnn.is_available())
    decoder.prefill(wide_model, ids, mask)
    torch._dynamo.reset()
    step = torch.compile(decoder._step, fullgraph=True, backend="eager")
    step()
    step()  # the second call reuses the trace: the step's shapes did not change
    assert int(decoder.t) == 2 and decoder.valid[:, 5:7].all()


def test_the_traced_step_ends_a_row_at_any_of_its_stop_ids(wide_model, monkeypatch):
    """The stop ids live in a device tensor of the decoder: the step that traces whole ends a row
    at either of two (an end-of-turn token besides EOS), and no other row."""
    monkeypatch.setattr(fixed_shape, "_DECODERS", type(fixed_shape._DECODERS)())
    ids, mask = _left_pad([3, 5, 4], wide_model.vocab_size)
    decoder = static_decoder(wide_model, 3, 12, Sampling(top_k=1, eos_token_id=(7, 9)))
    decoder.prefill(wide_model, ids, mask)
    decoder.logits.zero_()
    decoder.logits[[0, 1, 2], [9, 7, 5]] = 1.0  # greedy picks the second stop id, the first, neither
    torch._dynamo.reset()
    torch.compile(decoder._step, fullgraph=True, backend="eager")()
    assert decoder.tokens[:, 0].tolist() == [9, 7, 5]
    assert decoder.finished.tolist() == [True, True, False]


def test_decoders_are_kept_per_stop_ids(wide_model, monkeypatch):
    """One id or a sequence of one is the same sampling; other stop ids are another decoder."""
    monkeypatch.setattr(fixed_shape, "_DECODERS", type(fixed_shape._DECODERS)())
    one = static_decoder(wide_model, 2, 16, Sampling(eos_token_id=7))
    assert static_decoder(wide_model, 2, 16, Sampling(eos_token_id=[7])) is one
    two = static_decoder(wide_model, 2, 16, Sampling(eos_token_id=(7, 9)))
    assert two is not one and two.stops.tolist() == [7, 9] and one.stops.tolist() == [7]
    assert static_decoder(wide_model, 2, 16, Sampling(eos_token_id=(7, 8))).stops.tolist() == [7, 8]


def test_packed_weights_follow_in_place_updates(wide_model):
    ids, mask = _left_pad([4, 7], wide_model.vocab_size)
    before = wide_model.generate(ids, 10, top_k=1, attention_mask=mask, engine="static")
    with torch.no_grad():
        for p in wide_model.parameters():  # what an optimizer step does: in place
            p.add_(torch.randn_like(p) * 0.05)
    after = wide_model.generate(ids, 10, top_k=1, attention_mask=mask, engine="static")
    eager = wide_model.generate(ids, 10, top_k=1, attention_mask=mask, engine="eager")
    assert torch.equal(after.sequences, eager.sequences)
    assert not torch.equal(after.sequences, before.sequences)


def test_lora_adapters_are_in_the_packed_weights_and_can_be_switched_off(perturb_adapters):
    torch.manual_seed(0)
    model = add_lora(ShrayGPT(**tiny_config(vocab_size=500)), LoRASpec(r=4, alpha=8)).eval()
    perturb_adapters(model)
    ids, mask = _left_pad([5, 9], 500)
    with_adapters = _generate(model, ids, mask, engine="static", temperature=1.0)
    assert torch.equal(with_adapters.sequences, _generate(model, ids, mask, engine="eager", temperature=1.0).sequences)
    with adapters_disabled(model):
        base = _generate(model, ids, mask, engine="static", temperature=1.0)
        assert torch.equal(base.sequences, _generate(model, ids, mask, engine="eager", temperature=1.0).sequences)
    assert not torch.equal(base.sequences, with_adapters.sequences)


def test_decoders_are_reused_and_at_most_a_few_kept(wide_model, monkeypatch):
    monkeypatch.setattr(fixed_shape, "_DECODERS", type(fixed_shape._DECODERS)())
    first = static_decoder(wide_model, 2, 16, Sampling())
    assert static_decoder(wide_model, 2, 16, Sampling()) is first
    for capacity in range(17, 17 + KEEP_DECODERS + 1):
        static_decoder(wide_model, 2, capacity, Sampling())
    assert len(fixed_shape._DECODERS[wide_model]["decoders"]) == KEEP_DECODERS
    assert static_decoder(wide_model, 2, 16, Sampling()) is not first  # it was dropped


def test_only_shraygpt_without_dropout_runs_shraygpts_static_step(wide_model, tiny_hf):
    assert can_decode(wide_model)
    dropping = ShrayGPT(**tiny_config(dropout=0.1))
    assert not can_decode(dropping.train()) and can_decode(dropping.eval())
    from shraygpt_rl.hf import HFCausalLM

    assert not can_decode(HFCausalLM.from_pretrained(str(tiny_hf("gpt_neo"))))  # hf_decode's step runs it


def test_bf16_autocast_decodes_with_bf16_packed_weights(wide_model):
    ids, mask = _left_pad([4, 8], wide_model.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _generate(wide_model, ids, mask, engine="static", temperature=1.0)
        key = next(k for k in fixed_shape._DECODERS[wide_model]["weights"] if k[0] == torch.bfloat16)
        with torch.no_grad():
            logits, _, _ = wide_model(out.sequences, attention_mask=out.attention_mask)
    assert fixed_shape._DECODERS[wide_model]["weights"][key]["head"].dtype == torch.bfloat16
    recomputed = token_logprobs(logits[:, out.prompt_length - 1 : -1], out.responses)
    real = out.response_mask.bool()
    assert (recomputed[real] - out.logprobs[real]).abs().max() < 0.1  # bf16 rounding, not a different model


@pytest.mark.parametrize("supported", [False, True])
def test_bf16_weights_stay_plain_where_onednn_has_no_bf16_kernels(wide_model, monkeypatch, supported):
    """oneDNN's bf16 reorder needs AVX-512 BF16 or AVX-NE-CONVERT and fails without them (AMD EPYC
    here): then the bf16 weights stay plain and the step still decodes; float32 stays blocked."""
    if supported and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
    assert decode.PackedWeights(torch.bfloat16, torch.device("cpu")).blocked == (
        supported and torch.backends.mkldnn.is_available()
    )
    assert decode.PackedWeights(torch.float32, torch.device("cpu")).blocked == torch.backends.mkldnn.is_available()
    ids, mask = _left_pad([4, 8], wide_model.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _generate(wide_model, ids, mask, engine="static", temperature=1.0)
    assert out.response_mask.sum() > 0


def test_inference_mode_and_no_grad_generations_do_not_share_buffers(wide_model):
    """Lightning validates under inference mode and fits without it; tensors made under one
    cannot be written under the other, so each mode has its own decoder."""
    ids, mask = _left_pad([4, 6], wide_model.vocab_size)
    with torch.inference_mode():
        first = wide_model.generate(ids, 8, top_k=1, attention_mask=mask)
    with torch.no_grad():
        second = wide_model.generate(ids, 8, top_k=1, attention_mask=mask)
    with torch.inference_mode():
        third = wide_model.generate(ids, 8, top_k=1, attention_mask=mask)
    assert torch.equal(first.sequences, second.sequences) and torch.equal(second.sequences, third.sequences)


def test_repeated_prompts_are_prefilled_once_and_decode_as_the_eager_loop(wide_model, monkeypatch):
    """GRPO's layout: each prompt G times in a row. The prefill runs the distinct prompts only,
    and the tokens and log-probabilities are the eager loop's."""
    ids, mask = _left_pad([5, 13, 9], wide_model.vocab_size)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # (12, P)
    widths = []
    features = type(wide_model).features

    def spy(self, idx, *args, **kwargs):
        widths.append(idx.size(0))
        return features(self, idx, *args, **kwargs)

    monkeypatch.setattr(type(wide_model), "features", spy)
    static = _generate(wide_model, ids, mask, engine="static", temperature=1.0)
    assert widths == [3]
    eager = _generate(wide_model, ids, mask, engine="eager", temperature=1.0)
    assert torch.equal(static.sequences, eager.sequences)
    assert torch.allclose(static.logprobs, eager.logprobs, atol=1e-5)
    assert len({tuple(r) for r in static.responses[:4].tolist()}) > 1  # one prompt's rows sample apart
