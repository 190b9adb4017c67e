"""The rollout engine: batched, KV-cached sampling from ShrayGPT.

One prefill over the (left-padded) prompts, then one forward of a single token per row and step
against preallocated latent caches. Rows stop independently at ``eos_token_id``; finished rows
are fed padding, which attention and expert dispatch skip. Besides the tokens, ``generate``
returns what RL needs: the response mask and each sampled token's log-probability under the
distribution it was sampled from (after temperature, top-k and top-p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shraygpt_rl.tokenizer import decode_response


@dataclass
class GenerationOutput:
    """Prompts and sampled responses.

    Attributes:
        sequences: (B, P + N) left-padded prompts followed by right-padded responses.
        attention_mask: (B, P + N) 1 on real prompt and response tokens, 0 on padding.
        response_mask: (B, N) 1 on sampled tokens up to and including the row's EOS.
        logprobs: (B, N) log-probability of each sampled token under the sampling distribution;
            0 where ``response_mask`` is 0, and 0 for greedy decoding (a point mass).
        prompt_length: P, the padded prompt width.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logprobs: Tensor
    prompt_length: int

    @property
    def responses(self) -> Tensor:
        """(B, N) the sampled tokens, padded after each row's end."""
        return self.sequences[:, self.prompt_length :]


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row from (B, V) logits; return ``(tokens, logprobs)``, each (B,).

    ``temperature == 0`` or ``top_k == 1`` is greedy decoding (logprob 0: a point mass). Top-k
    keeps the k largest logits (ties included); top-p keeps the smallest set of tokens whose
    probability reaches p (Holtzman et al., 2020), always at least the most likely one.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1), logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already >= p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    # One pass of exp over the vocabulary: unnormalised weights for sampling, and the sampled
    # token's log-probability as a log-softmax would give it.
    top = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    weights = (logits - top).exp_()  # (B, V)
    tokens = sample_categorical(weights, generator)  # (B,)
    log_norm = weights.sum(dim=-1).log()  # (B,)
    return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) - top.squeeze(-1) - log_norm


def sample_categorical(weights: Tensor, generator: torch.Generator | None = None, block: int = 256) -> Tensor:
    """One index per row of non-negative ``weights`` (B, V), drawn with probability proportional
    to its weight, by inverse-CDF sampling in two levels.

    ``torch.multinomial`` draws V exponential variates per row; on CPU that was half of all
    rollout time at a 50k vocabulary. Here a row costs two uniforms and cumulative sums: a block
    of ``block`` tokens is drawn from the block masses, then a token from that block's weights,
    with an independent uniform at each level so that ``P(token) = P(block) * P(token | block)``
    holds to float32 rounding at either level (one level would carry the rounding of a 50k-term
    sum to every tail token). Zero-weight tokens are never drawn.
    """
    B, V = weights.shape
    weights = weights.float()
    full = V // block
    block_mass = weights[:, : full * block].view(B, full, block).sum(-1)  # (B, full): no padded copy
    if V % block:
        block_mass = torch.cat([block_mass, weights[:, full * block :].sum(-1, keepdim=True)], dim=1)
    uniforms = torch.rand(B, 2, 1, generator=generator, device=weights.device)
    chosen = _invert(block_mass.cumsum(-1), uniforms[:, 0])  # (B, 1) block index
    columns = chosen * block + torch.arange(block, device=weights.device)  # (B, block)
    within = weights.gather(1, columns.clamp(max=V - 1)) * (columns < V)  # (B, block)
    return (chosen * block + _invert(within.cumsum(-1), uniforms[:, 1])).squeeze(1)


def _invert(cdf: Tensor, uniform: Tensor) -> Tensor:
    """The first index whose cumulative mass exceeds ``uniform * total``, per row: (B, 1).

    ``right=True`` skips entries of zero mass; the clamp and ``last`` guard the case where
    rounding puts the draw at the very top of the range.
    """
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)  # (B, 1)
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # the last index that adds mass
    return torch.minimum(index, last)


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


@torch.no_grad()
def generate(
    model,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens after each prompt of ``idx`` (B, P).

    Args:
        model: A ``ShrayGPT``. It is used as it is (call ``model.eval()`` to turn dropout off).
        idx: Prompt token ids, left-padded when their lengths differ.
        max_new_tokens: Most tokens to sample per row.
        temperature: Softmax temperature; 0 means greedy.
        top_k: Keep only the k most likely tokens (1 means greedy).
        top_p: Nucleus sampling threshold in (0, 1].
        eos_token_id: Token that ends a row; the loop stops when every row has ended.
        attention_mask: (B, P) 1 for prompt tokens and 0 for left padding; None means no padding.
        pad_token_id: Filler after a row's end; defaults to ``eos_token_id``, else 0.
        generator: A seeded ``torch.Generator`` for reproducible sampling.

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
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    device = idx.device
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
    mask[:, :P] = 1 if attention_mask is None else attention_mask
    tokens = torch.full((B, max_new_tokens), pad, dtype=idx.dtype, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    caches = model.new_kv_caches(B, P + max_new_tokens)
    logits, caches, _ = model(idx, caches, attention_mask=mask[:, :P], logits_to_keep=1)
    n = 0
    for n in range(1, max_new_tokens + 1):
        t = n - 1
        next_tokens, next_logprobs = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
        alive = ~finished
        tokens[:, t] = torch.where(alive, next_tokens, pad)
        logprobs[:, t] = next_logprobs * alive
        mask[:, P + t] = alive  # the token just sampled is real for rows that had not ended
        if eos_token_id is not None:
            finished |= alive & (next_tokens == eos_token_id)
            if bool(finished.all()):  # one host sync per step; lets every row stop early
                break
        if n < max_new_tokens:
            logits, caches, _ = model(tokens[:, t : t + 1], caches, attention_mask=mask[:, : P + n])
    return GenerationOutput(
        sequences=torch.cat([idx, tokens[:, :n]], dim=1),
        attention_mask=mask[:, : P + n],
        response_mask=mask[:, P : P + n],
        logprobs=logprobs[:, :n],
        prompt_length=P,
    )


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
) -> tuple[GenerationOutput, list[str]]:
    """Sample a response per prompt row in eval mode, and decode each up to its EOS.

    What a rollout and a held-out evaluation both do. Dropout is off while sampling and the
    model's mode is restored after. Rows end at the tokenizer's ``<|endoftext|>``.

    Returns:
        The ``GenerationOutput`` and the response texts (without the EOS).
    """
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
            eos_token_id=tokenizer.eot_token,
            attention_mask=attention_mask,
            generator=generator,
        )
    finally:
        model.train(was_training)
    texts = [decode_response(tokenizer, row[mask.bool()]) for row, mask in zip(out.responses, out.response_mask)]
    return out, texts
