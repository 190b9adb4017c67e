"""ShrayGPT's one-token decode step with fixed shapes and no host sync inside the step. It
computes RoPE and expert routing with the training forward's own functions (``layers.py``). The
loop around it (``generation.py``) reads the host for "every row has ended" every
``EOS_CHECK_EVERY`` steps, and after every step in a multi-turn rollout (tools).

``generation.generate`` runs ShrayGPT through ``StaticDecoder``: one eager prefill, then ``step``
per token. A step samples the next token of every row from the last logits, records it, and runs
it through the model against a preallocated cache. Every tensor it touches has a shape fixed by
(batch, capacity), every index is a tensor on the device, and nothing is read back to the host,
so on CUDA the step is captured once as a CUDA graph and replayed for every token; on CPU the
same code runs eagerly. ``torch.compile(decoder.step, fullgraph=True)`` traces it without a
graph break (``tests/test_decode.py``): that is the proof that it never syncs.

How it differs from the eager forward, with the same weights, the same routing and the same
arithmetic up to the order of float additions:

* **Packed weights** (``PackedWeights``): every matrix transposed to (in, out), the query and
  latent key/value projections in one matrix, the routed and shared experts side by side, in the
  decode dtype (the autocast dtype when autocast is on, so a bf16 run casts the weights once per
  change instead of once per step). A module that is not a plain ``nn.Linear`` (a LoRA layer)
  contributes the matrix it applies, adapters included, read off by applying it to the identity.
* **One prefill per distinct prompt**: rows that repeat a prompt (GRPO's G samples of it) get
  copies of its keys and values (``fixed_shape.distinct_prompts``).
* **Keys are cached after RoPE**, (B, H, capacity, Dh), instead of as latents expanded and
  rotated at every step: each key is expanded and rotated once, when its token is written.
* **Attention spans the whole capacity**, masked by ``valid`` (B, capacity) rather than sliced
  to the current length.
* **Experts run densely**: every expert on every row, gated by zero off the row's top-k, as the
  course's formulation did. A decode step reads every expert's weights anyway once its B·k slots
  cover the experts, so this costs little and needs no per-expert counts. With top-2 routing the
  result per row is the same two products added.
* **Stop tokens** (EOS, and an instruct model's end-of-turn token besides it) are tracked on the
  device: each sampled token is compared with a preallocated tensor of their ids, and
  ``generation`` looks at the host every few steps only.
* **Uniforms for sampling** are drawn for all steps before the loop, in the order in which the
  eager sampler draws them, so that a seeded generator gives the same stream either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shraygpt_rl.fixed_shape import (
    KEEP_DECODERS,
    FixedShapeDecoder,
    Sampling,
    cached,
    capacity_bucket,
    decode_dtype,
    distinct_prompts,
    linear_weight,
    onednn_available,
    signature,
)
from shraygpt_rl.layers import apply_rope, rope_freqs, route


# --------------------------------------------------------------------------------------------
# Packed weights
# --------------------------------------------------------------------------------------------
def can_decode(model: nn.Module) -> bool:
    """Whether ``StaticDecoder`` runs ``model``: a ShrayGPT (``static_decoding``) whose parameters
    are plain local tensors (not sharded by FSDP) and that samples without dropout."""
    if not getattr(model, "static_decoding", False):
        return False
    params = list(model.parameters())
    if any(type(p) is not nn.Parameter or p.numel() == 0 for p in params):
        return False
    dropping = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()) or any(
        getattr(layer.mha, "dropout", 0.0) > 0 for layer in model.layers
    )
    return not (model.training and dropping)


BLOCKED = ("head", "up", "down")  # the matrices too large to stay in cache from one step to the next


class PackedWeights:
    """ShrayGPT's weights laid out for one-token steps (see the module docstring).

    ``refresh(model)`` recomputes them when the model's weights have changed since the last call,
    writing into the same tensors, so that captured CUDA graphs keep reading the right memory.
    ``matmul(x, name)`` applies one of them.

    On CPU the largest matrices (``BLOCKED``: the head and the experts, most of a step's memory
    traffic) are kept in oneDNN's blocked layout, as inductor's CPU freezing does: a step streams
    them from memory, and in that layout a 16-row product with the 50k-column head ran in 3.3 ms
    instead of 5.1 ms on 2 cores. The others stay plain (the blocked call has a fixed cost of
    about 20 us that small matrices do not repay).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.blocked = device.type == "cpu" and onednn_available(dtype)
        self.tensors: dict[str, Tensor] = {}
        self.signature: tuple | None = None

    def matmul(self, x: Tensor, name: str) -> Tensor:
        """``x @ W[name]`` for ``x`` (B, in)."""
        if self.blocked and name.rsplit(".", 1)[-1] in BLOCKED:
            return torch.ops.mkldnn._linear_pointwise(x, self.tensors[name], None, "none", [], "")
        return x @ self.tensors[name]

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        current = signature(model)
        if current == self.signature:
            return
        with torch.autocast(model.tok_emb.weight.device.type, enabled=False):
            for name, value in self._compute(model).items():
                value = value.to(self.dtype)
                if self.blocked and name.rsplit(".", 1)[-1] in BLOCKED:  # (out, in), reordered; no graphs on CPU
                    self.tensors[name] = torch.ops.mkldnn._reorder_linear_weight(value.T.contiguous())
                elif name in self.tensors and self.tensors[name].shape == value.shape:
                    self.tensors[name].copy_(value)
                else:
                    self.tensors[name] = value.contiguous()
        self.signature = current

    def _compute(self, model: nn.Module) -> dict[str, Tensor]:
        out = {"tok_emb": model.tok_emb.weight, "ln_f": model.ln_f.weight, "head": linear_weight(model.head).T}
        for i, layer in enumerate(model.layers):
            mha, moe = layer.mha, layer.moe
            H, Dh, Dl = mha.n_head, mha.d_head, mha.d_latent
            experts = [*moe.experts, moe.shared_expert]  # the shared expert is the last column block
            up = [torch.cat([linear_weight(e.w1), linear_weight(e.w2)]).T for e in experts]  # (C, 2Hd) each
            out |= {
                f"{i}.norm1": layer.norm1.weight,
                f"{i}.norm2": layer.norm2.weight,
                f"{i}.qkv": torch.cat([linear_weight(mha.wq), linear_weight(mha.wk_lat), linear_weight(mha.wv_lat)]).T,
                f"{i}.k_expand": mha.k_expand.transpose(0, 1).reshape(Dl, H * Dh),
                f"{i}.v_expand": mha.v_expand,  # (H, Dl, Dh)
                f"{i}.proj": linear_weight(mha.proj).T,
                f"{i}.gate": linear_weight(moe.gate).T,  # (C, E)
                f"{i}.up": torch.cat(up, dim=1),  # (C, (E+1) * 2Hd)
                f"{i}.down": torch.cat([linear_weight(e.w3).T for e in experts]),  # ((E+1) * Hd, C)
            }
        return out

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------
class StaticDecoder(FixedShapeDecoder):
    """ShrayGPT's fixed-shape decoding state (``fixed_shape.FixedShapeDecoder``'s buffers) and
    ``caches``: per layer, keys after RoPE (B, H, cap, Dh) and latent values (B, cap, Dl)."""

    def __init__(self, model: nn.Module, batch: int, capacity: int, sampling: Sampling, dtype: torch.dtype):
        device = model.tok_emb.weight.device
        super().__init__(batch, capacity, model.vocab_size, sampling, device)
        first = model.layers[0]
        self.H, self.Dh, self.Dl = first.mha.n_head, first.mha.d_head, first.mha.d_latent
        self.E, self.top_k = first.moe.num_experts, first.moe.top_k
        self.C, self.n_layers = model.tok_emb.weight.size(1), len(model.layers)
        self.eps = [(layer.norm1.eps, layer.norm2.eps) for layer in model.layers], model.ln_f.eps
        self.dtype = dtype
        self.caches = [
            (
                torch.zeros(batch, self.H, capacity, self.Dh, device=device, dtype=dtype),
                torch.zeros(batch, capacity, self.Dl, device=device, dtype=dtype),
            )
            for _ in model.layers
        ]
        self.weights: PackedWeights | None = None

    @torch.no_grad()
    def prefill(self, model: nn.Module, idx: Tensor, attention_mask: Tensor) -> None:
        """Reset the state and run each distinct prompt of (B, P) once through ``model``'s own
        forward (eagerly, under whatever autocast the caller set), keeping its rotated keys and
        latent values for every row it fills."""
        P = idx.size(1)
        shared = distinct_prompts(idx, attention_mask)  # each distinct prompt once, copied to its rows
        ids, mask, rows = shared if shared is not None else (idx, attention_mask, slice(None))
        hidden, caches, _ = model.features(ids, attention_mask=mask)
        rope = rope_freqs((mask.long().cumsum(-1) - 1).clamp(min=0), self.Dh)  # (U, P, Dh/2)
        for layer, latent, (keys, values) in zip(model.layers, caches, self.caches):
            keys[:, :, :P].copy_(layer.mha.keys(latent.k, rope)[rows])
            values[:, :P].copy_(latent.v[rows])
        hidden = hidden[rows]
        self.reset(attention_mask, model.head(hidden[:, -1]))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, V) after the tokens (B,), written to the cache at column ``start + t``."""
        with torch.autocast(self.device.type, enabled=False):  # the packed weights carry the dtype
            return self._forward(tokens)

    def _forward(self, tokens: Tensor) -> Tensor:
        w, C = self.weights, self.C
        column = (self.start + self.t).view(1)
        freqs = rope_freqs(self.positions[:, None], self.Dh)  # (B, 1, Dh/2)
        x = F.embedding(tokens, w["tok_emb"])  # (B, C)
        for i, (keys, values) in enumerate(self.caches):
            eps1, eps2 = self.eps[0][i]
            x = x + self.attention(i, F.rms_norm(x, (C,), w[f"{i}.norm1"], eps1), freqs, column, keys, values)
            x = x + self.experts(i, F.rms_norm(x, (C,), w[f"{i}.norm2"], eps2))
        x = F.rms_norm(x, (C,), w["ln_f"], self.eps[1])
        return w.matmul(x, "head")  # (B, V)

    def attention(self, i: int, h: Tensor, freqs: Tensor, column: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """MLA for one query per row over the whole cache, masked by ``valid``: (B, C)."""
        w, B, H, Dh, Dl = self.weights, self.batch, self.H, self.Dh, self.Dl
        q, k_lat, v_lat = (h @ w[f"{i}.qkv"]).split([H * Dh, Dl, Dl], dim=-1)  # (B, H*Dh), (B, Dl), (B, Dl)
        q = apply_rope(q.view(B, 1, H, Dh), freqs)  # (B, H, 1, Dh)
        k = apply_rope((k_lat @ w[f"{i}.k_expand"]).view(B, 1, H, Dh), freqs)  # (B, H, 1, Dh)
        keys.index_copy_(2, column, k)
        values.index_copy_(1, column, v_lat[:, None])
        scores = (q @ keys.transpose(-1, -2)).float() * Dh**-0.5  # (B, H, 1, cap)
        scores = scores.masked_fill(~self.valid[:, None, None], float("-inf"))
        y = scores.softmax(dim=-1).to(values.dtype).view(B, H, -1) @ values  # (B, H, Dl)
        y = torch.einsum("bhl,hld->bhd", y, w[f"{i}.v_expand"])  # (B, H, Dh): v_expand absorbed after attention
        return y.reshape(B, H * Dh) @ w[f"{i}.proj"]

    def experts(self, i: int, h: Tensor) -> Tensor:
        """Shared expert plus the top-k routed experts, every expert run on every row: (B, C)."""
        w, B, E = self.weights, self.batch, self.E
        _, weights, experts = route(h @ w[f"{i}.gate"], self.top_k)  # (B, k) each
        gates = torch.zeros(B, E + 1, device=h.device).scatter(1, experts, weights)  # (B, E+1), 0 off the top-k
        gates[:, E] = 1.0  # the shared expert
        up = w.matmul(h, f"{i}.up").view(B, E + 1, 2, -1)  # (B, E+1, 2, Hd): w1(x), w2(x) per expert
        mid = up[:, :, 0] * F.silu(up[:, :, 1]) * gates.to(h.dtype)[..., None]  # (B, E+1, Hd)
        return w.matmul(mid.reshape(B, -1), f"{i}.down")  # the sum over experts happens inside the matmul


def static_decoder(model: nn.Module, batch: int, tokens: int, sampling: Sampling) -> StaticDecoder:
    """The model's decoder for this shape and sampling (made on first use), with its packed
    weights refreshed from the model. ``sampling`` is part of the key, its stop ids included:
    a decoder holds them in a device tensor that its captured step reads."""
    device = model.tok_emb.weight.device
    dtype = decode_dtype(device, model.tok_emb.weight.dtype)
    weights = cached(model, "weights", (dtype, device), lambda: PackedWeights(dtype, device))
    weights.refresh(model)
    capacity = capacity_bucket(tokens, device)
    key = (batch, capacity, sampling, dtype, device)
    decoder = cached(
        model, "decoders", key, lambda: StaticDecoder(model, batch, capacity, sampling, dtype), keep=KEEP_DECODERS
    )
    decoder.weights = weights
    return decoder
