"""The rollout engine: batched, KV-cached sampling from ShrayGPT and Hugging Face models.

One prefill over the (left-padded) prompts, then one step of a single token per row. Rows stop
independently, each at the first of the stop ids ``eos_token_id`` it samples: one id, or several
(an instruct model ends its turn with its chat template's end-of-turn token, ``<|im_end|>`` or
``<|eot_id|>``, not with its EOS). Besides the tokens, ``generate`` returns what RL needs: the
response mask and each sampled token's log-probability under the distribution it was sampled
from (after temperature, top-k and top-p).

Two loops give the same output. ShrayGPT runs through ``shraygpt_rl.decode.StaticDecoder``: a
fixed-shape step with no host sync (a CUDA graph on GPU) that tracks the stop ids on the device
and looks at the host for "every row has ended" only every ``EOS_CHECK_EVERY`` steps. Other
models, and ShrayGPT with ``static=False``, run the eager loop: the model's own forward against
its cache, finished rows fed padding, one host sync per step.

With ``turns`` (a ``turns.Turns``: an environment and its tools), either loop looks at the host
after every step: a row whose tool call is complete is fed the observation's tokens, one per step,
while the others sample (multi-turn rollouts, see ``turns.py``). ``response_mask`` is then 1 on the
policy's own tokens only; ``attention_mask`` covers the observations too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from shraygpt_rl.decode import Sampling, StaticDecoder, can_decode, is_stop, static_decoder, stop_ids
from shraygpt_rl.losses import entropy_from_logits, token_logprobs
from shraygpt_rl.sampling import check_sampling, sample_categorical, sample_next_token  # noqa: F401
from shraygpt_rl.tokenizer import decode_response, stop_tokens
from shraygpt_rl.turns import Turns

EOS_CHECK_EVERY = 16  # decode steps between looks at the host for "every row has ended"


@dataclass
class GenerationOutput:
    """Prompts and sampled responses.

    Attributes:
        sequences: (B, P + N) left-padded prompts followed by right-padded responses.
        attention_mask: (B, P + N) 1 on real prompt and response tokens, 0 on padding.
        response_mask: (B, N) 1 on sampled tokens up to and including the row's stop token; 0 on
            padding and on the observations of a multi-turn rollout (not the policy's tokens).
        logprobs: (B, N) log-probability of each sampled token under the sampling distribution;
            0 where ``response_mask`` is 0, and 0 for greedy decoding (a point mass).
        prompt_length: P, the padded prompt width.
        turns: Multi-turn rollouts: per row ``turns``, ``tool_calls``, ``tool_errors`` and
            ``max_turns`` (hit), each (B,); None for single-turn.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logprobs: Tensor
    prompt_length: int
    turns: dict[str, Tensor] | None = None

    @property
    def responses(self) -> Tensor:
        """(B, N) the sampled tokens, padded after each row's end."""
        return self.sequences[:, self.prompt_length :]


def response_logits(
    model, sequences: Tensor, attention_mask: Tensor, prompt_length: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The training-style counterpart of ``generate``: float32 logits (B, N, V) at the positions
    that predict the response tokens ``sequences[:, prompt_length:]``, divided by ``temperature``
    as sampling did, and the MoE aux loss. The head runs on those positions only: at a 50k
    vocabulary the head and its softmax are most of the cost of an update."""
    hidden, _, aux_loss = model.features(sequences, attention_mask=attention_mask)
    logits = model.head(hidden[:, prompt_length - 1 : -1]).float()  # position t predicts token t + 1
    return (logits if temperature == 1.0 else logits / temperature), aux_loss


def response_logprobs(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Log-probabilities (B, N) of the response tokens under ``model`` (and their entropies, or
    None), with the aux loss: ``response_logits`` followed by the log-softmax.

    With ``chunk_rows``, the head and log-softmax run on that many rows at a time and are
    recomputed in the backward pass (activation checkpointing), so the (B, N, V) float32 logits
    never exist at once: at most (chunk_rows, N, V) do, at the cost of a second head product per
    chunk in the backward. The values are the same, row for row.
    """
    hidden, _, aux_loss = model.features(sequences, attention_mask=attention_mask)
    hidden = hidden[:, prompt_length - 1 : -1]  # (B, N, C): position t predicts token t + 1
    labels = sequences[:, prompt_length:]  # (B, N)
    if not chunk_rows or chunk_rows >= hidden.size(0):
        return (*_head_logprobs(model.head, hidden, labels, temperature, entropy), aux_loss)
    parts = [
        checkpoint(_head_logprobs, model.head, h, y, temperature, entropy, use_reentrant=False)
        for h, y in zip(hidden.split(chunk_rows), labels.split(chunk_rows))
    ]
    logprobs = torch.cat([lp for lp, _ in parts])
    return logprobs, (torch.cat([e for _, e in parts]) if entropy else None), aux_loss


def sequence_logprobs(
    model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, average: bool = False, chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """Sum (or mean) of each row's response-token log-probabilities under ``model``, (B,), and the
    aux loss: ``losses.sequence_logprobs`` of the model's logits, with the LM head run on the
    positions that predict a response token only, ``chunk`` of them at a time.

    DPO's rows are prompt then response, right-padded: with a long prompt (HH-RLHF) and a 50k
    vocabulary the full (B, T, V) logits are gigabytes, nearly all of them never read.
    """
    hidden, _, aux_loss = model.features(input_ids, attention_mask=attention_mask)  # (B, T, C)
    scored = response_mask[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    rows = scored.nonzero()[:, 0]  # (N,)
    states, labels = hidden[:, :-1][scored], input_ids[:, 1:][scored]  # (N, C), (N,)
    parts = [token_logprobs(model.head(h).float(), y) for h, y in zip(states.split(chunk), labels.split(chunk))]
    logprobs = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)  # (N,)
    sums = torch.zeros(input_ids.size(0), device=hidden.device).index_add(0, rows, logprobs)  # (B,)
    return (sums / scored.sum(1).clamp(min=1) if average else sums), aux_loss


def _head_logprobs(head, hidden: Tensor, labels: Tensor, temperature: float, entropy: bool):
    logits = head(hidden).float()  # (b, N, V)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, labels), (entropy_from_logits(logits) if entropy else None)


@torch.no_grad()
def generate(
    model,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    static: bool | None = None,
    turns: Turns | None = None,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens after each prompt of ``idx`` (B, P).

    Args:
        model: A ``ShrayGPT``. It is used as it is (call ``model.eval()`` to turn dropout off).
        idx: Prompt token ids, left-padded when their lengths differ.
        max_new_tokens: Most tokens to sample per row.
        temperature: Softmax temperature; 0 means greedy.
        top_k: Keep only the k most likely tokens (1 means greedy).
        top_p: Nucleus sampling threshold in (0, 1].
        eos_token_id: The token, or tokens, that end a row (the first of them the row samples);
            the loop stops when every row has ended.
        attention_mask: (B, P) 1 for prompt tokens and 0 for left padding; None means no padding.
        pad_token_id: Filler after a row's end; defaults to the first of ``eos_token_id``, else 0.
        generator: A seeded ``torch.Generator`` for reproducible sampling.
        static: Use the static decode step (None: whenever the model supports it, see
            ``decode.can_decode``); False runs the eager loop.
        turns: Multi-turn state (``turns.Turns``) for the rows: tool calls answered in the loop.

    Returns:
        A ``GenerationOutput`` with N <= ``max_new_tokens`` columns (the loop stops early once
        every row has ended).
    """
    B, P = idx.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if P + max_new_tokens > model.block_size:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the model's block_size "
            f"{model.block_size}; shorten the prompts or ask for fewer tokens."
        )
    stops = stop_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops is not None else 0)
    check_sampling(temperature, top_k, top_p)
    if attention_mask is None:
        attention_mask = torch.ones_like(idx)
    if static is None:
        static = can_decode(model)
    if static:
        sampling = Sampling(temperature, top_k, top_p, stops, pad)
        decoder = static_decoder(model, B, P + max_new_tokens, sampling)
        return _generate_static(model, decoder, idx, attention_mask, max_new_tokens, generator, turns)
    device = idx.device
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
    mask[:, :P] = attention_mask
    tokens = torch.full((B, max_new_tokens), pad, dtype=idx.dtype, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    fed = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # observation tokens
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop_tensor = None if stops is None else torch.tensor(stops, dtype=torch.long, device=device)  # (S,)
    force = forced = None

    caches = model.new_kv_caches(B, P + max_new_tokens)
    logits, caches, _ = model(idx, caches, attention_mask=mask[:, :P], logits_to_keep=1)
    n = 0
    for n in range(1, max_new_tokens + 1):
        t = n - 1
        next_tokens, next_logprobs = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
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


def _generate_static(
    model, decoder: StaticDecoder, idx: Tensor, attention_mask: Tensor, max_new_tokens: int, generator, turns=None
) -> GenerationOutput:
    """``generate`` through the static decoder: prefill, ``max_new_tokens - 1`` steps and a last
    sample, stopping at the first look at the host that finds every row ended (with ``turns``,
    a look after every step, which also feeds the observations)."""
    B, P = idx.shape
    N = max_new_tokens
    restore = None if decoder.sampling.greedy else _draw_uniforms(decoder, N, generator, idx.device)
    decoder.prefill(model, idx, attention_mask)
    eos = decoder.sampling.eos_token_id
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


def _draw_uniforms(decoder: StaticDecoder, steps: int, generator, device):
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


@torch.no_grad()
def sample_and_decode(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    tokenizer,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    environment=None,
    prompts: list[str] | None = None,
    metadata: list[dict] | None = None,
    max_turns: int = 4,
) -> tuple[GenerationOutput, list[str]]:
    """Sample a response per prompt row in eval mode, and decode each up to its stop token.

    What a rollout and a held-out evaluation both do. Dropout is off while sampling and the
    model's mode is restored after. Rows end at any of the tokenizer's stop tokens
    (``tokenizer.stop_tokens``: ``<|endoftext|>`` for tiktoken's encodings; an instruct model's
    end-of-turn token besides its EOS).

    With an ``environment`` (``environments.Environment``), the rollout is multi-turn: tool calls
    are answered in the loop (``turns.Turns``, up to ``max_turns`` policy turns per row), given
    each row's ``prompts`` text and ``metadata``. The texts then hold the observations too.

    Returns:
        The ``GenerationOutput`` and the response texts (without the stop token).
    """
    turns = None
    if environment is not None:
        metadata = metadata if metadata is not None else [{} for _ in range(len(input_ids))]
        turns = Turns(environment, tokenizer, prompts, metadata, max_turns, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        out = generate(
            model,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=stop_tokens(tokenizer),
            attention_mask=attention_mask,
            generator=generator,
            turns=turns,
        )
    finally:
        model.train(was_training)
    # One read from the device; then, per row, its real tokens (the policy's and the observations)
    # and which of them are the policy's.
    real = out.attention_mask[:, out.prompt_length :]
    rows, real, own = (t.tolist() for t in (out.responses, real, out.response_mask))
    texts = [
        decode_response(tokenizer, [t for t, r in zip(row, used) if r], [o for o, r in zip(mine, used) if r])
        for row, used, mine in zip(rows, real, own)
    ]
    return out, texts
