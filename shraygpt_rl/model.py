"""ShrayGPT: the course's decoder-only MoE transformer, state-dict compatible with its checkpoints.

Architecture (see the course notebooks 06/07): token embedding -> n_layers pre-norm blocks of
multi-head latent attention (MLA, DeepSeek-V2 §2.1) and a top-k routed SwiGLU mixture of experts
with an always-on shared expert (DeepSeekMoE) -> RMSNorm -> untied head. There are no absolute
position embeddings; RoPE is applied to the queries and to the single latent key.

Where this implementation departs from the course's code (outputs are the same, see the parity
tests against ``../shared/fixtures/course-checkpoint``):

* **Padding.** ``attention_mask`` (B, T) marks real tokens. Positions come from the mask, so a
  left-padded row gives the same logits as the unpadded row. Padding tokens take no part in
  attention, in expert dispatch or in the aux-loss statistics.
* **Sparse MoE.** Each token runs only its top-k experts plus the shared expert; the course ran
  every expert on every token. ``MoE.dense = True`` restores the course's formulation.
* **RoPE on keys.** The course rotates each head's *expanded* key (over Dh), not the latent key
  (the fixture proves it, to 0.0 max error). So the cache holds the unrotated latent K and the
  latent V (2·Dl numbers per token and layer), keys are expanded and rotated when used, and
  ``v_expand`` is absorbed after attention so that values are never expanded.
* **Cache.** ``KVCache`` can be preallocated for a whole generation; the course grew it by
  concatenation and its cached ``generate`` fed the last prompt token twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shraygpt_rl.checkpoint import read_policy_checkpoint, write_policy_checkpoint
from shraygpt_rl.decode import apply_rope, rope_freqs, route
from shraygpt_rl.generation import GenerationOutput, generate


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


class ShrayGPT(nn.Module):
    """The course model. ``model(idx)`` returns ``(logits, kv_caches, aux_loss)`` like the course's.

    Args:
        vocab_size: Size of the token vocabulary (50257 for ``r50k_base``).
        block_size: The longest sequence the model is meant to see.
        d_model: Residual width C.
        n_head: Number of query heads H; ``n_head * d_head == d_model``.
        d_head: Width of each query head Dh.
        n_layers: Number of transformer blocks.
        num_experts: Routed experts per MoE layer E.
        num_experts_per_tok: Experts each token is routed to (top-k).
        dropout: Dropout on the embeddings and the attention probabilities.
        d_latent: Width of the latent key/value (64 in every course model).
        aux_loss_weight: Weight of the MoE load-balancing loss in the training objective.
        **extra: Other hyper-parameters a course checkpoint carries (learning rates); kept in
            ``config`` so that a saved checkpoint round-trips them.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int,
        n_head: int,
        d_head: int,
        n_layers: int,
        num_experts: int,
        num_experts_per_tok: int,
        dropout: float = 0.0,
        d_latent: int = 64,
        aux_loss_weight: float = 0.01,
        **extra: Any,
    ):
        super().__init__()
        self.config: dict[str, Any] = dict(
            vocab_size=vocab_size,
            block_size=block_size,
            d_model=d_model,
            n_head=n_head,
            d_head=d_head,
            n_layers=n_layers,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            dropout=dropout,
            aux_loss_weight=aux_loss_weight,
            **extra,
        )
        if d_latent != 64:
            self.config["d_latent"] = d_latent
        self.block_size, self.d_head, self.d_latent = block_size, d_head, d_latent
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            Block(d_model, n_head, d_head, num_experts, num_experts_per_tok, d_latent, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def aux_loss_weight(self) -> float:
        return self.config["aux_loss_weight"]

    def forward(
        self,
        idx: Tensor,
        kv_cache_list: list[KVCache] | None = None,
        start_pos: int | None = None,
        attention_mask: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Tensor, list[KVCache], Tensor]:
        """Run the model on token ids ``idx`` (B, T).

        Args:
            idx: Token ids (B, T).
            kv_cache_list: One ``KVCache`` per layer holding the earlier tokens, or None.
            start_pos: Position of ``idx[:, 0]`` when there is no ``attention_mask``; defaults to
                the cache's length. Ignored when ``attention_mask`` is given.
            attention_mask: (B, Tpast + T), 1 for a real token and 0 for padding, covering the
                cached tokens and ``idx``. Positions are counted over real tokens only, so left
                padding does not shift them.
            logits_to_keep: If > 0, compute logits for the last that many positions only.

        Returns:
            ``(logits, kv_caches, aux_loss)``: logits (B, T or logits_to_keep, V), the updated
            caches, and the MoE aux loss averaged over layers.
        """
        hidden, caches, aux_loss = self.features(idx, kv_cache_list, start_pos, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.head(hidden), caches, aux_loss

    def features(
        self,
        idx: Tensor,
        kv_cache_list: list[KVCache] | None = None,
        start_pos: int | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[KVCache], Tensor]:
        """Like ``forward`` but returns the final normed hidden states (B, T, C) instead of logits;
        reward models and critics put their own head on these."""
        B, T = idx.shape
        past = 0 if kv_cache_list is None else kv_cache_list[0].length
        key_positions, attn_mask, keep = self._positions_and_masks(idx, past, start_pos, attention_mask)
        rope = rope_freqs(key_positions, self.d_head)  # (B, Tk, Dh/2), shared by all layers

        x = self.dropout(self.tok_emb(idx))  # (B, T, C)
        caches, aux_losses = [], []
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache_list is None else kv_cache_list[i]
            x, cache, aux_loss = layer(x, rope, attn_mask, keep, cache)
            caches.append(cache)
            aux_losses.append(aux_loss)
        return self.ln_f(x), caches, torch.stack(aux_losses).mean()

    def _positions_and_masks(self, idx, past, start_pos, attention_mask):
        """Key positions (B, Tk), the attention mask (None: plain causal), real-token indices."""
        B, T = idx.shape
        Tk, device = past + T, idx.device
        causal = torch.ones(T, Tk, dtype=torch.bool, device=device).tril(past)  # query i is key past+i
        if attention_mask is None:
            start = past if start_pos is None else start_pos
            positions = torch.arange(start - past, start + T, device=device).expand(B, Tk)
            if past == 0 or T == 1:  # causal within idx, or one query that sees every cached key
                return positions, None, None
            return positions, causal.expand(B, 1, T, Tk), None
        if attention_mask.shape != (B, Tk):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new tokens) = {(B, Tk)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        real = attention_mask.bool()
        positions = (real.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, Tk), counted over real tokens
        # A query may see the real keys up to itself. A padding query also sees itself, so that
        # no row is fully masked (its output is never used).
        own = torch.eye(T, Tk, dtype=torch.bool, device=device).roll(past, dims=1)
        attn_mask = (causal & real[:, None, :]) | own  # (B, T, Tk)
        keep = real[:, past:].flatten().nonzero().squeeze(1)
        return positions, attn_mask[:, None], None if keep.numel() == B * T else keep

    # ---------------------------------------------------------------------------------------
    # Generation, monitoring and checkpoints
    # ---------------------------------------------------------------------------------------
    def new_kv_caches(self, batch: int, capacity: int, device=None, dtype=None) -> list[KVCache]:
        """Preallocated latent caches for ``batch`` rows of up to ``capacity`` tokens."""
        ref = self.tok_emb.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        return [KVCache.empty(batch, capacity, self.d_latent, device, dtype) for _ in self.layers]

    def generate(self, idx: Tensor, max_new_tokens: int, **kwargs) -> GenerationOutput:
        """Batched, KV-cached sampling; see ``shraygpt_rl.generation.generate`` for the arguments."""
        return generate(self, idx, max_new_tokens, **kwargs)

    tokenizer_source: str | None = None  # a checkpoint does not name its tokenizer: the data's config does
    static_decoding = True  # generation runs it through shraygpt_rl.decode.StaticDecoder

    def release_head(self) -> None:
        """Drop the LM head: a reward model or critic built on this trunk does not use it."""
        self.head = None

    def moe_stats(self) -> dict[str, Tensor]:
        """Routing statistics of the last forward: ``load`` (L, E) and ``router_entropy`` (L,)."""
        moes = [layer.moe for layer in self.layers]
        if any(m.expert_load is None for m in moes):
            raise RuntimeError("moe_stats() needs a forward pass first.")
        return {
            "load": torch.stack([m.expert_load for m in moes]),
            "router_entropy": torch.stack([m.router_entropy for m in moes]),
        }

    @classmethod
    def load_from_checkpoint(cls, path: str | os.PathLike, map_location: Any = "cpu", strict: bool = True) -> ShrayGPT:
        """Load a course (or shraygpt-rl) checkpoint: ``state_dict`` plus ``hyper_parameters``.

        The file is read with ``weights_only=True``: no arbitrary object is ever unpickled.
        """
        hparams, state_dict = read_policy_checkpoint(path, map_location)
        model = cls(**hparams)
        model.load_state_dict(state_dict, strict=strict)
        return model

    def save_checkpoint(self, path: str | os.PathLike, stage: str = "") -> None:
        """Write a Lightning-style checkpoint that the course's ``load_from_checkpoint`` reads.

        Refuses to overwrite a file that shraygpt-rl did not write, such as a course checkpoint.
        """
        write_policy_checkpoint(path, self.state_dict(), self.config, stage=stage)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; with ``active``, only those a token touches (top-k + shared experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        moe = self.layers[0].moe if len(self.layers) else None
        per_expert = sum(p.numel() for p in moe.shared_expert.parameters()) if moe else 0
        idle = (moe.num_experts - moe.top_k) * per_expert * len(self.layers) if moe else 0
        return total - idle


def course_config(**overrides: Any) -> dict[str, Any]:
    """The course's full-size hyper-parameters (about 1.6 B parameters, 0.7 B active)."""
    config = dict(
        vocab_size=50257, block_size=8192, d_model=1024, n_head=32, d_head=32, n_layers=24,
        num_experts=6, num_experts_per_tok=2, dropout=0.0,
    )  # fmt: skip
    config.update(overrides)
    return config


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A CPU-sized model for tests and the embedded demo (2 layers, 4 experts)."""
    config = dict(
        vocab_size=320, block_size=128, d_model=64, n_head=4, d_head=16, n_layers=2,
        num_experts=4, num_experts_per_tok=2, dropout=0.0,
    )  # fmt: skip
    config.update(overrides)
    return config
