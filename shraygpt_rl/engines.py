"""The rollout engines: prompts in; tokens, log-probabilities, masks and turn records out.

Every rollout (the online stages', ``--stage eval``'s, the labelling page's) goes through
``generation.generate`` or ``generation.sample_and_decode``, which hand it to an engine. A stage
holds one, made from its ``rollout_engine`` argument by ``make_engine``, and never learns which
engine ran. The engines:

==========  ==================================================================================
``auto``    ``static`` where the model supports it, else ``eager`` (decided per call: the
            reference model, a model in training mode with dropout, a long generation past a
            sliding window may each go another way)
``static``  a fixed-shape decode step: ShrayGPT's (``decode.py``) or a Hugging Face model's
            (``hf_decode.py``); no growing cache, no per-step allocation, stop tokens tracked on
            the device and read by the host every ``EOS_CHECK_EVERY`` steps
``eager``   the model's own forward against its growing cache, one host sync per step: the
            reference that the others are tested against
``vllm``    vLLM (the optional ``vllm`` extra, ``vllm_engine.py``), the policy's weights loaded
            into it before each generation
==========  ==================================================================================

Each returns the same ``GenerationOutput``, and in float32 with the same seed the same tokens (under
bf16 autocast the steps round differently, and a long sample can drift apart): the fixed-shape
steps draw their sampler's uniforms ahead, in the eager loop's order, and leave the generator as
the eager loop would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from shraygpt_rl import decode, hf_decode
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.fixed_shape import FixedShapeDecoder, is_stop
from shraygpt_rl.rollout_engine import GenerationOutput, RolloutEngine
from shraygpt_rl.sampling import sample_next_token

EngineName = Literal["auto", "static", "eager", "vllm"]
DecoderFactory = Callable[..., FixedShapeDecoder]  # (model, batch, tokens, sampling) -> decoder
EOS_CHECK_EVERY = 16  # decode steps between looks at the host for "every row has ended"


class EagerEngine(RolloutEngine):
    """The model's own forward against its cache, finished rows fed padding, one host sync per
    step (for "every row has ended", and to feed a multi-turn row its observation)."""

    name = "eager"

    def generate(self, model, idx, attention_mask, max_new_tokens, sampling, generator=None, turns=None):
        (B, P), device, pad, stops = idx.shape, idx.device, sampling.pad_token_id, sampling.eos_token_id
        mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
        mask[:, :P] = attention_mask
        tokens = torch.full((B, max_new_tokens), pad, dtype=idx.dtype, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        fed = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # observation tokens
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        stop_tensor = None if stops is None else torch.tensor(stops, dtype=torch.long, device=device)  # (S,)
        caches = model.new_kv_caches(B, P + max_new_tokens)
        logits, caches, _ = model(idx, caches, attention_mask=mask[:, :P], logits_to_keep=1)
        n = 0
        for n in range(1, max_new_tokens + 1):
            t = n - 1
            next_tokens, next_logprobs = sample_next_token(
                logits[:, -1], sampling.temperature, sampling.top_k, sampling.top_p, generator
            )
            alive = ~finished
            own = alive  # the policy's tokens: not an observation fed in
            if turns is not None:
                force, forced = turns.forced(device)
                next_tokens, own = torch.where(force, forced, next_tokens), alive & ~force
                fed[:, t] = alive & force
            tokens[:, t] = torch.where(alive, next_tokens, pad)
            logprobs[:, t] = next_logprobs * own
            mask[:, P + t] = alive  # the token just sampled is real for rows that had not ended
            if stop_tensor is not None:
                finished |= own & is_stop(next_tokens, stop_tensor)  # as the static step does
            if turns is not None:
                finished[turns.record(t, tokens[:, t], alive, force)] = True
            if (stop_tensor is not None or turns is not None) and bool(finished.all()):
                break  # one host sync per step; lets every row stop early
            if n < max_new_tokens:
                logits, caches, _ = model(tokens[:, t : t + 1], caches, attention_mask=mask[:, : P + n])
        return GenerationOutput(
            sequences=torch.cat([idx, tokens[:, :n]], dim=1),
            attention_mask=mask[:, : P + n],
            response_mask=mask[:, P : P + n] * ~fed[:, :n],
            logprobs=logprobs[:, :n],
            prompt_length=P,
            turns=None if turns is None else turns.stats(device),
        )


class StaticEngine(RolloutEngine):
    """A fixed-shape decode step: ShrayGPT's ``decode.StaticDecoder`` or a Hugging Face model's
    ``hf_decode.HFDecoder``. Prefill, ``max_new_tokens - 1`` steps and a last sample, stopping at
    the first look at the host that finds every row ended (with ``turns``, a look after every
    step, which also feeds the observations)."""

    name = "static"

    @staticmethod
    def decoder_factory(model: nn.Module, tokens: int) -> DecoderFactory | None:
        """The fixed-shape decoder factory that runs ``model`` for ``tokens`` columns (prompt and
        response), or None where neither step supports it."""
        if decode.can_decode(model):
            return decode.static_decoder
        if hf_decode.can_decode(model, tokens):
            return hf_decode.hf_decoder
        return None

    def generate(self, model, idx, attention_mask, max_new_tokens, sampling, generator=None, turns=None):
        tokens = idx.size(1) + max_new_tokens
        make = self.decoder_factory(model, tokens)
        if make is None:
            raise ConfigError(
                f"rollout_engine 'static' cannot run this {type(model).__name__} for {tokens} "
                "tokens (training-mode dropout, sharded weights, a window narrower than the generation, or a model "
                "whose static cache does not reproduce its forward); use 'auto' or 'eager'."
            )
        return self.run(make, model, idx, attention_mask, max_new_tokens, sampling, generator, turns)

    def run(self, make, model, idx, attention_mask, max_new_tokens, sampling, generator=None, turns=None):
        """``generate`` with the decoder factory already chosen (``auto`` chooses it once per call)."""
        (B, P), N = idx.shape, max_new_tokens
        decoder = make(model, B, P + N, sampling)
        restore = None if sampling.greedy else _draw_uniforms(decoder, N, generator, idx.device)
        decoder.prefill(model, idx, attention_mask)
        eos = sampling.eos_token_id
        n = 0
        for n in range(1, N + 1):
            if turns is not None:
                force, forced = turns.forced(idx.device)
                decoder.force.copy_(force), decoder.forced.copy_(forced)
            decoder.step() if n < N else decoder.last()
            if turns is not None:
                ended = turns.record(n - 1, decoder.tokens[:, n - 1], decoder.valid[:, P + n - 1], force)
                decoder.finished[ended] = True
                if bool(decoder.finished.all()):
                    break
            elif eos is not None and (n % EOS_CHECK_EVERY == 0 or n == N) and bool(decoder.finished.all()):
                break
        mask = torch.cat([attention_mask.to(torch.long), decoder.valid[:, P : P + n].long()], dim=1)
        if (eos is not None or turns is not None) and bool(decoder.finished.all()):
            n = int(mask[:, P:].sum(1).max())  # the eager loop stops at the last row's end
            mask = mask[:, : P + n]
        if restore is not None:
            restore(n)
        return GenerationOutput(
            sequences=torch.cat([idx, decoder.tokens[:, :n]], dim=1),
            attention_mask=mask,
            response_mask=mask[:, P:] * ~decoder.fed[:, :n],
            logprobs=decoder.logprobs[:, :n].clone(),
            prompt_length=P,
            turns=None if turns is None else turns.stats(idx.device),
        )


def _draw_uniforms(decoder: FixedShapeDecoder, steps: int, generator, device):
    """Draw the sampler's uniforms for every step ahead, in the eager loop's order; returns a
    function that leaves ``generator`` as if only ``n`` steps had drawn (as the eager loop does)."""
    generator = generator or (torch.default_generator if device.type == "cpu" else None)
    if generator is None:  # CUDA's default generator
        generator = torch.cuda.default_generators[device.index or 0]
    state = generator.get_state()
    B = decoder.batch
    decoder.uniforms[:steps].copy_(torch.rand(steps, B, 2, generator=generator, device=generator.device))

    def restore(n: int) -> None:
        generator.set_state(state)
        torch.rand(n, B, 2, generator=generator, device=generator.device)

    return restore


class AutoEngine(RolloutEngine):
    """``static`` for each call whose model and length it supports, else ``eager``."""

    name = "auto"

    def __init__(self) -> None:
        self.static, self.eager = StaticEngine(), EagerEngine()

    def generate(self, model, idx, attention_mask, max_new_tokens, sampling, generator=None, turns=None):
        make = StaticEngine.decoder_factory(model, idx.size(1) + max_new_tokens)
        if make is None:
            return self.eager.generate(model, idx, attention_mask, max_new_tokens, sampling, generator, turns)
        return self.static.run(make, model, idx, attention_mask, max_new_tokens, sampling, generator, turns)


def make_engine(name: EngineName | RolloutEngine) -> RolloutEngine:
    """The engine ``name`` names (an engine is returned as it is)."""
    if isinstance(name, RolloutEngine):
        return name
    if name == "auto":
        return AutoEngine()
    if name == "static":
        return StaticEngine()
    if name == "eager":
        return EagerEngine()
    if name == "vllm":
        from shraygpt_rl.vllm_engine import VLLMEngine

        return VLLMEngine()
    raise ConfigError(f"rollout_engine must be one of auto, static, eager, vllm; got {name!r}.")
