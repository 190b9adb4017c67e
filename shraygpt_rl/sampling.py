"""The sampler: one token per row from (B, V) logits, with temperature, top-k and top-p, and the
sampled token's log-probability under the distribution it was drawn from.

It has no data-dependent branch and reads nothing back to the host, so the eager rollout loop
and the captured decode step (``shraygpt_rl.decode``) share it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row from (B, V) logits; return ``(tokens, logprobs)``, each (B,).

    ``temperature == 0`` or ``top_k == 1`` is greedy decoding (logprob 0: a point mass; the first
    of tied maxima). Top-k keeps the k largest logits (exactly k: see ``_sample_top_k``); top-p
    keeps the smallest set of tokens whose probability reaches p (Holtzman et al., 2020), always
    at least the most likely one. Each row takes two uniforms, from ``generator`` or, for a caller
    that draws them ahead, from ``uniforms`` (B, 2).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        # max's indices are argmax's (the first maximum) at a third of its cost on CPU
        return logits.max(dim=-1).indices, logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if uniforms is None:
        uniforms = torch.rand(logits.size(0), 2, generator=generator, device=logits.device)
    if top_k is not None and top_k < logits.size(-1):
        return _sample_top_k(logits, top_k, top_p, uniforms)
    drop = None  # (B, V) True where nucleus truncation removes a token
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(outside).scatter(-1, order, outside)
    # One pass of exp over the vocabulary: unnormalised weights for sampling, and the sampled
    # token's log-probability as a log-softmax would give it. Dropped tokens' weights are zeroed
    # after the exp rather than their logits set to -inf before it: exp(-inf) takes the slow path
    # of the vector exp, 16x slower than a finite argument on this CPU.
    top = logits.max(dim=-1, keepdim=True).values  # (B, 1); the most likely token is never dropped
    weights = (logits - top).exp_()  # (B, V)
    if drop is not None:
        weights.masked_fill_(drop, 0.0)
    tokens = sample_categorical(weights, uniforms=uniforms)  # (B,)
    log_norm = weights.sum(dim=-1).log()  # (B,)
    return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) - top.squeeze(-1) - log_norm


def _sample_top_k(logits: Tensor, top_k: int, top_p: float | None, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k (then top-p) sampling on the k candidates alone: (B, k) instead of (B, V) work.

    The candidates are the k tokens ``torch.topk`` returns, largest first: exactly k, with ties at
    the k-th logit broken by topk's order (HF's warper keeps every tie; vLLM keeps exactly k).
    One inverse-CDF draw over at most k weights needs no second level.
    """
    values, indices = logits.topk(top_k, dim=-1)  # (B, k), largest first
    weights = (values - values[:, :1]).exp()  # (B, k)
    if top_p is not None and top_p < 1.0:
        probs = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    cdf = weights.cumsum(dim=-1)  # (B, k)
    choice = _invert(cdf, uniforms[:, :1])  # (B, 1)
    tokens = indices.gather(-1, choice).squeeze(-1)
    return tokens, values.gather(-1, choice).squeeze(-1) - values[:, 0] - cdf[:, -1].log()


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling options that mean nothing, in one sentence."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def sample_categorical(
    weights: Tensor, generator: torch.Generator | None = None, block: int = 256, uniforms: Tensor | None = None
) -> Tensor:
    """One index per row of non-negative ``weights`` (B, V), drawn with probability proportional
    to its weight, by inverse-CDF sampling in two levels.

    ``torch.multinomial`` draws V exponential variates per row; on CPU that was half of all
    rollout time at a 50k vocabulary. Here a row costs two uniforms and cumulative sums: a block
    of ``block`` tokens is drawn from the block masses, then a token from that block's weights,
    with an independent uniform at each level so that ``P(token) = P(block) * P(token | block)``
    holds to float32 rounding at either level (one level would carry the rounding of a 50k-term
    sum to every tail token). Zero-weight tokens are never drawn. ``uniforms`` (B, 2), when
    given, replace the two draws from ``generator``.
    """
    B, V = weights.shape
    weights = weights.float()
    full = V // block
    block_mass = weights[:, : full * block].view(B, full, block).sum(-1)  # (B, full): no padded copy
    if V % block:
        block_mass = torch.cat([block_mass, weights[:, full * block :].sum(-1, keepdim=True)], dim=1)
    if uniforms is None:
        uniforms = torch.rand(B, 2, generator=generator, device=weights.device)
    uniforms = uniforms[:, :, None]  # (B, 2, 1)
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
