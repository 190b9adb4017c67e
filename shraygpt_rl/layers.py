"""ShrayGPT's building blocks: RoPE, the latent KV cache, multi-head latent attention, expert
routing and the mixture of experts, and the pre-norm block that joins them (``model.py`` stacks
the blocks). The static decode step (``decode.py``) imports RoPE and ``route`` from here, so a
token is rotated and routed by the same code in rollout and update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------
# Rotary position embeddings and expert routing (the decode step uses them too)
# --------------------------------------------------------------------------------------------
def rope_freqs(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Unit complex rotations ``exp(i * pos * base^(-2j/dim))`` for ``positions`` (B, T): (B, T, dim/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the pairs ``(x[2j], x[2j+1])`` of ``x`` (B, T, h, D) by ``freqs`` (B, T, D/2).

    Each pair is the complex number ``x[2j] + i x[2j+1]``, so the rotation is one complex product
    (the course's cos/sin arithmetic in a single kernel). Returns (B, h, T, D), the layout that
    attention wants; without autograd the product is written straight into that layout.
    """
    B, T, h, D = x.shape
    pairs = torch.view_as_complex(x.float().reshape(B, T, h, D // 2, 2))  # (B, T, h, D/2)
    if torch.is_grad_enabled() or T == 1:  # at T = 1 the transpose is a view: nothing to save
        rotated = (pairs * freqs[:, :, None]).transpose(1, 2)
    else:  # out= has no autograd, but saves the transpose copy of a long prefill
        rotated = torch.empty(B, h, T, D // 2, dtype=pairs.dtype, device=x.device)
        torch.mul(pairs, freqs[:, :, None], out=rotated.transpose(1, 2))
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (B, h, T, D)


def route(gate_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Routing of tokens by their gate logits (S, E): ``(probs, weights, experts)``.

    ``probs`` (S, E) is the float32 softmax, ``experts`` (S, k) the top-k experts and ``weights``
    (S, k) their probabilities renormalised to sum to 1. The training forward and the decode step
    both route through here, so a token goes to the same experts in rollout and update.
    """
    probs = gate_logits.float().softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return probs, weights / weights.sum(dim=-1, keepdim=True), experts


# --------------------------------------------------------------------------------------------
# Latent KV cache
# --------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """One layer's cache of the latent key (before RoPE) and the latent value.

    ``k`` and ``v`` are (B, capacity, Dl) buffers of which the first ``length`` positions are
    filled. A cache built by ``empty`` is preallocated and written in place; a cache returned by
    an uncached forward holds exactly its tokens and grows by concatenation when reused.
    """

    k: Tensor
    v: Tensor
    length: int

    @classmethod
    def empty(cls, batch: int, capacity: int, d_latent: int, device=None, dtype=None) -> KVCache:
        shape = (batch, capacity, d_latent)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype), 0)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, T, Dl) latents after the cached ones; return all cached latents so far."""
        end = self.length + k.size(1)
        if end > self.k.size(1):  # grow (course-style reuse of a returned cache)
            self.k = torch.cat([self.k[:, : self.length], k], dim=1)
            self.v = torch.cat([self.v[:, : self.length], v], dim=1)
        else:
            self.k[:, self.length : end] = k
            self.v[:, self.length : end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class MultiHeadLatentAttention(nn.Module):
    """MLA: H query heads of width Dh over one latent key/value head of width Dl.

    Each head's key is ``RoPE(k_lat W_k[h])`` and its value ``v_lat W_v[h]``. Only the latent
    ``k_lat`` and ``v_lat`` are cached; keys are expanded and rotated when used. RoPE acts on the
    expanded key, so ``W_k`` cannot be absorbed into the query; ``W_v`` can, and is, so values
    are never expanded: ``sum_t p_t (v_t W_v[h]) = (sum_t p_t v_t) W_v[h]``.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, d_latent: int = 64, dropout: float = 0.0):
        super().__init__()
        if n_head * d_head != d_model:
            raise ValueError(f"n_head * d_head must equal d_model, got {n_head} * {d_head} != {d_model}.")
        if d_head % 2:
            raise ValueError(f"RoPE needs an even d_head, got {d_head}.")
        self.n_head, self.d_head, self.d_latent, self.dropout = n_head, d_head, d_latent, dropout
        self.wq = nn.Linear(d_model, n_head * d_head, bias=False)
        self.wk_lat = nn.Linear(d_model, d_latent, bias=False)
        self.wv_lat = nn.Linear(d_model, d_latent, bias=False)
        self.k_expand = nn.Parameter(torch.empty(n_head, d_latent, d_head))
        self.v_expand = nn.Parameter(torch.empty(n_head, d_latent, d_head))
        nn.init.xavier_uniform_(self.k_expand)
        nn.init.xavier_uniform_(self.v_expand)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self, x: Tensor, rope: Tensor, attn_mask: Tensor | None, kv_cache: KVCache | None = None
    ) -> tuple[Tensor, KVCache]:
        """Attend ``x`` (B, T, C). ``rope`` (B, Tk, Dh/2) rotates all Tk keys; queries are the last T."""
        B, T, C = x.shape
        H, Dh, Dl = self.n_head, self.d_head, self.d_latent
        q = apply_rope(self.wq(x).view(B, T, H, Dh), rope[:, -T:])  # (B, H, T, Dh)
        k_lat, v_lat = self.wk_lat(x), self.wv_lat(x)  # (B, T, Dl)
        if kv_cache is None:
            kv_cache = KVCache(k_lat, v_lat, T)
        else:
            k_lat, v_lat = kv_cache.append(k_lat, v_lat)  # (B, Tk, Dl)
        Tk = k_lat.size(1)
        k = self.keys(k_lat, rope)  # (B, H, Tk, Dh)
        if T == 1:
            y = _decode_attention(q, k, v_lat, attn_mask)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v_lat[:, None].expand(B, H, Tk, Dl),
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=attn_mask is None,
            )
        y = torch.einsum("bhtl,hld->bthd", y, self.v_expand.to(y.dtype))  # (B, T, H, Dh)
        return self.proj(y.reshape(B, T, C)), kv_cache

    def keys(self, k_lat: Tensor, rope: Tensor) -> Tensor:
        """Every head's rotated key (B, H, Tk, Dh) from latent keys (B, Tk, Dl) and ``rope`` (B, Tk, Dh/2)."""
        B, Tk, Dl = k_lat.shape
        w_k = self.k_expand.transpose(0, 1).reshape(Dl, -1).to(k_lat.dtype)  # all heads in one matmul
        return apply_rope((k_lat @ w_k).view(B, Tk, self.n_head, self.d_head), rope)


def _decode_attention(q: Tensor, k: Tensor, v_lat: Tensor, mask: Tensor | None) -> Tensor:
    """One query per head (B, H, 1, Dh) over per-head keys (B, H, Tk, Dh) and latent values (B, Tk, Dl).

    The heads share the values, so they are folded into the rows of one (H, Tk) @ (Tk, Dl)
    product per sequence instead of expanding the values to every head.
    """
    B, H, _, Dh = q.shape
    scores = (q @ k.transpose(-1, -2)) * Dh**-0.5  # (B, H, 1, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v_lat.dtype)
    return (probs.view(B, H, -1) @ v_lat).view(B, H, 1, -1)  # (B, H, 1, Dl)


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------
class Expert(nn.Module):
    """SwiGLU variant of the course: ``w3(w1(x) * silu(w2(x)))`` (the SiLU gate is on w2)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.w1(x) * F.silu(self.w2(x)))


class MoE(nn.Module):
    """Top-k routed experts plus a shared expert, with the Switch-style load-balancing loss.

    After each forward, ``expert_load`` (E,) holds the fraction of routed (token, slot) pairs sent
    to each expert and ``router_entropy`` the mean entropy of the routing distribution, both
    detached, for monitoring.
    """

    def __init__(self, d_model: int, num_experts: int, num_experts_per_tok: int):
        super().__init__()
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}], got {num_experts_per_tok}.")
        d_hidden = int(2.68 * d_model)
        self.num_experts, self.top_k = num_experts, num_experts_per_tok
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(num_experts))
        self.shared_expert = Expert(d_model, d_hidden)
        self.dense = False  # True: run every expert on every token, as the course did
        self.expert_load: Tensor | None = None
        self.router_entropy: Tensor | None = None

    def forward(self, x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mix ``x`` (B, T, C); ``keep`` holds the flat indices of real tokens (None: all are).

        Returns the output (B, T, C), zero at padding, and the aux loss over the real tokens.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (S, C)
        xs = x if keep is None else x[keep]  # (S_real, C)
        probs, weights, experts = route(self.gate(xs), self.top_k)  # (S_real, E), (S_real, k) x 2, float32
        mix = self._mix_dense if self.dense else self._mix_sparse
        ys = self.shared_expert(xs) + mix(xs, weights, experts)
        self._record_stats(probs, experts)
        out = ys if keep is None else x.new_zeros(x.shape, dtype=ys.dtype).index_copy_(0, keep, ys)
        return out.view(shape[:-1] + (-1,)), self.aux_loss(probs, experts[:, 0])

    def _mix_sparse(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Group the (token, slot) pairs by expert so that each expert sees only its tokens."""
        flat_experts = experts.flatten()  # (S*k,)
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()  # one host sync
        tokens = order // self.top_k  # (S*k,) token of each grouped pair
        chunks = x[tokens].split(counts)
        ys = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])  # (S*k, C)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(ys[: x.size(0)]).index_add_(0, tokens, ys)

    def _mix_dense(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """The course's formulation: every expert on every token, zero weight off the top-k."""
        gates = torch.zeros(x.size(0), self.num_experts, device=x.device).scatter(1, experts, weights)
        ys = torch.stack([expert(x) for expert in self.experts], dim=1)  # (S, E, C)
        return (gates.to(ys.dtype)[..., None] * ys).sum(dim=1)

    def aux_loss(self, probs: Tensor, top1: Tensor) -> Tensor:
        """Load-balancing loss ``E * sum_e importance[e] * load[e]`` (Switch Transformer, eq. 4).

        importance is the mean routing probability and load the fraction of tokens whose top-1
        expert is e; only importance carries a gradient.
        """
        if probs.size(0) == 0:
            return probs.sum()
        importance = probs.mean(dim=0)  # (E,)
        load = torch.bincount(top1, minlength=self.num_experts).to(probs.dtype) / top1.numel()
        return self.num_experts * (importance * load).sum()

    @torch.no_grad()
    def _record_stats(self, probs: Tensor, experts: Tensor) -> None:
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts).float()
        self.expert_load = counts / counts.sum().clamp(min=1)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1)
        self.router_entropy = entropy.mean() if entropy.numel() else entropy.sum()


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + moe(norm2(x))``."""

    def __init__(self, d_model, n_head, d_head, num_experts, num_experts_per_tok, d_latent=64, dropout=0.0):
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model, eps=1e-5)
        self.norm2 = nn.RMSNorm(d_model, eps=1e-5)
        self.mha = MultiHeadLatentAttention(d_model, n_head, d_head, d_latent, dropout)
        self.moe = MoE(d_model, num_experts, num_experts_per_tok)

    def forward(self, x, rope, attn_mask, keep, kv_cache=None):
        a, kv_cache = self.mha(self.norm1(x), rope, attn_mask, kv_cache)
        x = x + a
        m, aux_loss = self.moe(self.norm2(x), keep)
        return x + m, kv_cache, aux_loss
