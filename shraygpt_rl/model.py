"""ShrayGPT: the course's decoder-only MoE transformer, state-dict compatible with its checkpoints.

Architecture (see the course notebooks 06/07): token embedding -> n_layers pre-norm blocks of
multi-head latent attention (MLA, DeepSeek-V2 §2.1) and a top-k routed SwiGLU mixture of experts
with an always-on shared expert (DeepSeekMoE) -> RMSNorm -> untied head. There are no absolute
position embeddings; RoPE is applied to the queries and to the single latent key. The blocks and
their parts are in ``layers.py``; this file stacks them, loads checkpoints and generates.

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
from typing import Any

import torch
from torch import Tensor, nn

from shraygpt_rl.checkpoint import read_policy_checkpoint, write_policy_checkpoint
from shraygpt_rl.generation import GenerationOutput, generate
from shraygpt_rl.layers import Block, KVCache, rope_freqs


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
