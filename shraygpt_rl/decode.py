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

import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shraygpt_rl.layers import apply_rope, rope_freqs, route
from shraygpt_rl.sampling import sample_next_token


# --------------------------------------------------------------------------------------------
# Packed weights
# --------------------------------------------------------------------------------------------
def linear_weight(module: nn.Module) -> Tensor:
    """The (out, in) matrix a bias-free linear module applies; for a wrapped one (LoRA), the
    matrix with its adapters, read off by applying the module to the identity."""
    if type(module) is nn.Linear:
        return module.weight
    weight = module.weight if hasattr(module, "weight") else module.base_layer.weight
    eye = torch.eye(weight.size(1), device=weight.device, dtype=weight.dtype)
    return module(eye).T


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


def _signature(model: nn.Module) -> tuple:
    """Changes whenever a weight changes in place or moves, or adapters are switched on or off."""
    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    adapters = tuple(
        (getattr(m, "disable_adapters", None), tuple(getattr(m, "active_adapters", ()) or ()))
        for m in model.modules()
        if hasattr(m, "base_layer")
    )
    return params, adapters


BLOCKED = ("head", "up", "down")  # the matrices too large to stay in cache from one step to the next


def _onednn_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's blocked layout serves ``dtype`` on this CPU: its bf16 and fp16 kernels need
    instructions (AVX-512 BF16, AVX-NE-CONVERT) that many CPUs lack, AMD's and older Intel's among
    them, and the reorder fails there instead of falling back."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


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
        self.blocked = device.type == "cpu" and _onednn_available(dtype)
        self.tensors: dict[str, Tensor] = {}
        self.signature: tuple | None = None

    def matmul(self, x: Tensor, name: str) -> Tensor:
        """``x @ W[name]`` for ``x`` (B, in)."""
        if self.blocked and name.rsplit(".", 1)[-1] in BLOCKED:
            return torch.ops.mkldnn._linear_pointwise(x, self.tensors[name], None, "none", [], "")
        return x @ self.tensors[name]

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        signature = _signature(model)
        if signature == self.signature:
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
        self.signature = signature

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
def stop_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """``eos_token_id`` (one id, several, or None) as a tuple of ids, or None for no stop token."""
    if eos_token_id is None:
        return None
    try:
        return (operator.index(eos_token_id),)  # one id: an int, a NumPy integer, an integer tensor of one element
    except TypeError:
        pass
    ids = tuple(operator.index(t) for t in eos_token_id)
    if not ids:
        raise ValueError("eos_token_id is an empty sequence; pass None for no stop token.")
    return ids


def is_stop(tokens: Tensor, stops: Tensor) -> Tensor:
    """Whether each of ``tokens`` (B,) is one of the ids ``stops`` (S,): (B,) bool.

    One comparison per stop id, OR-ed: a fixed-shape op with no host sync. ``torch.isin`` does
    the same for a few ids, but for many (about ten, more for a larger batch) it switches to
    sorting and ``unique``, whose data-dependent output size would be read back to the host.
    """
    return (tokens[:, None] == stops).any(dim=1)  # (B, S) -> (B,)


@dataclass(frozen=True)
class Sampling:
    """What the sampler does; fixed for the life of a captured step.

    ``eos_token_id`` is the ids that end a row (given as one id or several, kept as a tuple, so
    that ``7`` and ``(7,)`` are the same sampling and share a decoder), or None.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_id", stop_ids(self.eos_token_id))  # frozen: set once, here

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class StaticDecoder:
    """Fixed-shape decoding state for ``batch`` rows of up to ``capacity`` tokens.

    Buffers: ``caches`` (per layer: keys after RoPE (B, H, cap, Dh), latent values (B, cap, Dl)),
    ``valid`` (B, cap) the real tokens, ``positions`` (B,) the next token's RoPE position,
    ``finished`` (B,), ``stops`` (S,) the stop ids of ``sampling`` (empty for none),
    ``force``/``forced`` (B,) the rows fed a given token at the next step
    (a multi-turn observation) and that token, ``fed`` (B, cap) the tokens that were fed,
    ``tokens``/``logprobs`` (B, cap) what was sampled, ``uniforms`` (cap, B, 2),
    ``logits`` (B, V) the distribution of the next token, and the device scalars ``start`` (the
    prompt width P) and ``t`` (steps so far). ``step`` reads and writes these and nothing else.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int, sampling: Sampling, dtype: torch.dtype):
        device = model.tok_emb.weight.device
        first = model.layers[0]
        self.H, self.Dh, self.Dl = first.mha.n_head, first.mha.d_head, first.mha.d_latent
        self.E, self.top_k = first.moe.num_experts, first.moe.top_k
        self.C, self.n_layers = model.tok_emb.weight.size(1), len(model.layers)
        self.eps = [(layer.norm1.eps, layer.norm2.eps) for layer in model.layers], model.ln_f.eps
        self.batch, self.capacity, self.sampling, self.dtype, self.device = batch, capacity, sampling, dtype, device
        B, cap = batch, capacity
        self.caches = [
            (
                torch.zeros(B, self.H, cap, self.Dh, device=device, dtype=dtype),
                torch.zeros(B, cap, self.Dl, device=device, dtype=dtype),
            )
            for _ in model.layers
        ]
        self.valid = torch.zeros(B, cap, dtype=torch.bool, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.stops = torch.tensor(sampling.eos_token_id or (), dtype=torch.long, device=device)  # (S,)
        self.force = torch.zeros(B, dtype=torch.bool, device=device)  # rows fed ``forced`` instead of sampling
        self.forced = torch.zeros(B, dtype=torch.long, device=device)
        self.fed = torch.zeros(B, cap, dtype=torch.bool, device=device)  # the tokens that were fed (observations)
        self.tokens = torch.zeros(B, cap, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(B, cap, device=device)
        self.uniforms = torch.zeros(cap, B, 2, device=device)
        self.logits = torch.zeros(B, model.vocab_size, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.weights: PackedWeights | None = None
        self.graph: Any = None
        self.eager_steps = 0

    # -- per generation ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model: nn.Module, idx: Tensor, attention_mask: Tensor) -> None:
        """Reset the state and run the prompts (B, P) through ``model``'s own forward (eagerly,
        under whatever autocast the caller set), keeping their rotated keys and latent values."""
        B, P = idx.shape
        hidden, caches, _ = model.features(idx, attention_mask=attention_mask)
        rope = rope_freqs((attention_mask.long().cumsum(-1) - 1).clamp(min=0), self.Dh)  # (B, P, Dh/2)
        for layer, latent, (keys, values) in zip(model.layers, caches, self.caches):
            keys[:, :, :P].copy_(layer.mha.keys(latent.k, rope))
            values[:, :P].copy_(latent.v)
        self.logits.copy_(model.head(hidden[:, -1]))
        self.valid.zero_()
        self.valid[:, :P] = attention_mask.bool()
        self.positions.copy_(attention_mask.long().sum(-1))
        self.finished.zero_()
        self.force.zero_()
        self.fed.zero_()
        self.tokens.fill_(self.sampling.pad_token_id)
        self.logprobs.zero_()
        self.start.fill_(P)
        self.t.zero_()

    def step(self) -> None:
        """Sample a token per row, record it and run it through the model (``self.logits`` then
        predicts the token after it). On CUDA, the third call captures a graph that every later
        call, in this and later generations, replays."""
        if self.graph is not None:
            self.graph.replay()
            return
        if self.device.type == "cuda" and self.eager_steps >= 2:
            self._capture()
            self.graph.replay()
            return
        self.eager_steps += 1
        if self.device.type == "cuda":  # warm-up steps run on a side stream, as graph capture wants
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
        else:
            self._step()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    @torch.no_grad()
    def _step(self) -> None:
        with torch.autocast(self.device.type, enabled=False):  # the packed weights carry the dtype
            tokens, alive = self.sample()
            self.logits.copy_(self.forward(tokens))
            self.positions.add_(alive.long())
            self.t.add_(1)

    @torch.no_grad()
    def last(self) -> None:
        """The last token of a generation: sampled and recorded, not run through the model."""
        self.sample()
        self.t.add_(1)

    def sample(self) -> tuple[Tensor, Tensor]:
        """Draw the next token of every row from ``self.logits`` and record it at column ``t``
        (padding for rows that had ended; ``forced`` for the rows in ``force``, which are fed an
        observation: log-probability 0, never an end). A row's own token ends it when it is one of
        ``stops``. Returns the tokens (B,) and which rows were alive."""
        s, t = self.sampling, self.t.view(1)
        uniforms = None if s.greedy else self.uniforms.index_select(0, t)[0]  # (B, 2)
        tokens, logprobs = sample_next_token(self.logits, s.temperature, s.top_k, s.top_p, uniforms=uniforms)
        alive = ~self.finished
        own = alive & ~self.force  # the policy's own tokens
        tokens = torch.where(alive, torch.where(self.force, self.forced, tokens), s.pad_token_id)
        self.tokens.index_copy_(1, t, tokens[:, None])
        self.logprobs.index_copy_(1, t, (logprobs * own)[:, None])
        self.fed.index_copy_(1, t, (alive & self.force)[:, None])
        self.valid.index_copy_(1, self.start.view(1) + t, alive[:, None])  # the new token is real if alive
        if s.eos_token_id is not None:
            self.finished |= own & is_stop(tokens, self.stops)
        return tokens, alive

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, V) after the tokens (B,), written to the cache at column ``start + t``."""
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


# --------------------------------------------------------------------------------------------
# One decoder per model, batch and capacity, reused across generations
# --------------------------------------------------------------------------------------------
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
KEEP_DECODERS = 2  # per model: each holds a whole cache (and, on CUDA, a captured graph)


def decode_dtype(model: nn.Module) -> torch.dtype:
    """The autocast dtype when autocast is on for the model's device, else the weights' dtype."""
    device = model.tok_emb.weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return model.tok_emb.weight.dtype


def capacity_bucket(tokens: int, device: torch.device) -> int:
    """The cache width for ``tokens``: exact on CPU; on CUDA rounded up to a multiple of 64, so
    that prompt batches of different widths share one captured graph."""
    return tokens if device.type != "cuda" else -(-tokens // 64) * 64


def static_decoder(model: nn.Module, batch: int, tokens: int, sampling: Sampling) -> StaticDecoder:
    """The model's decoder for this shape and sampling (made on first use), with its packed
    weights refreshed from the model. ``sampling`` is part of the key, its stop ids included:
    a decoder holds them in a device tensor that its captured step reads."""
    dtype = decode_dtype(model)
    device = model.tok_emb.weight.device
    # Tensors made under inference mode cannot be written outside it (Lightning validates in
    # inference mode and fits without it): each mode has its own weights and buffers.
    inference = torch.is_inference_mode_enabled()
    entry = _DECODERS.setdefault(model, {})
    weights = entry.setdefault(("weights", dtype, device, inference), PackedWeights(dtype, device))
    weights.refresh(model)
    key = (batch, capacity_bucket(tokens, device), sampling, dtype, device, inference)
    decoder = entry.pop(key, None) or StaticDecoder(model, batch, key[1], sampling, dtype)
    decoder.weights = weights
    entry[key] = decoder  # most recently used last
    decoders = [k for k in entry if k[0] != "weights"]
    for old in decoders[:-KEEP_DECODERS]:
        del entry[old]
    return decoder
