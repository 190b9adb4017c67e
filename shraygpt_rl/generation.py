"""The rollout engine: batched, KV-cached sampling from ShrayGPT and Hugging Face models.

One prefill over the (left-padded) prompts, then one step of a single token per row. Rows stop
independently, each at the first of the stop ids ``eos_token_id`` it samples: one id, or several
(an instruct model ends its turn with its chat template's end-of-turn token, ``<|im_end|>`` or
``<|eot_id|>``, not with its EOS). Besides the tokens, ``generate`` returns what RL needs: the
response mask and each sampled token's log-probability under the distribution it was sampled
from (after temperature, top-k and top-p).

The loop itself is a rollout engine's (``engines.py``): ``engine`` names one (``auto``, ``static``,
``eager``, ``vllm``) or is one a stage holds; every engine gives the same output.

With ``turns`` (a ``turns.Turns``: an environment and its tools), the loop looks at the host
after every step: a row whose tool call is complete is fed the observation's tokens, one per step,
while the others sample (multi-turn rollouts, see ``turns.py``). ``response_mask`` is then 1 on the
policy's own tokens only; ``attention_mask`` covers the observations too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from shraygpt_rl.engines import EOS_CHECK_EVERY, EngineName, GenerationOutput, RolloutEngine, make_engine  # noqa: F401
from shraygpt_rl.fixed_shape import Sampling, stop_ids
from shraygpt_rl.lora import AdaptersDisabled, adapters_disabled
from shraygpt_rl.losses import entropy_from_logits, token_logprobs
from shraygpt_rl.sampling import check_sampling, sample_categorical, sample_next_token  # noqa: F401
from shraygpt_rl.tokenizer import decode_response, stop_tokens
from shraygpt_rl.turns import Turns


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
    engine: EngineName | RolloutEngine = "auto",
    turns: Turns | None = None,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens after each prompt of ``idx`` (B, P).

    Args:
        model: A ``ShrayGPT`` or ``HFCausalLM``, used as it is (``model.eval()`` turns dropout off).
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
        engine: The rollout engine (``engines.py``), or its name: ``auto`` runs the fixed-shape
            decode step wherever the model supports it, else the eager loop.
        turns: Multi-turn state (``turns.Turns``) for the rows: tool calls answered in the loop.

    Returns:
        A ``GenerationOutput`` with N <= ``max_new_tokens`` columns (the loop stops early once
        every row has ended).
    """
    P = idx.size(1)
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
    sampling = Sampling(temperature, top_k, top_p, stops, pad)
    if isinstance(model, AdaptersDisabled):  # a LoRA run's reference: the policy with its adapters off
        with adapters_disabled(model.policy):
            return make_engine(engine).generate(
                model.policy, idx, attention_mask, max_new_tokens, sampling, generator, turns
            )
    return make_engine(engine).generate(model, idx, attention_mask, max_new_tokens, sampling, generator, turns)


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
    engine: EngineName | RolloutEngine = "auto",
) -> tuple[GenerationOutput, list[str]]:
    """Sample a response per prompt row in eval mode, and decode each up to its stop token.

    What a rollout and a held-out evaluation both do. Dropout is off while sampling and the
    model's mode is restored after. Rows end at any of the tokenizer's stop tokens
    (``tokenizer.stop_tokens``: ``<|endoftext|>`` for tiktoken's encodings; an instruct model's
    end-of-turn token besides its EOS).

    With an ``environment`` (``environments.Environment``), the rollout is multi-turn: tool calls
    are answered in the loop (``turns.Turns``, up to ``max_turns`` policy turns per row), given
    each row's ``prompts`` text and ``metadata``. The texts then hold the observations too.
    ``engine`` is the rollout engine that samples (``engines.py``).

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
            engine=engine,
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
