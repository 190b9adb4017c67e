"""What every fixed-shape decode step shares: the sampling settings, the per-row state a step
reads and writes, the step loop (a CUDA graph on GPU), and a per-model cache of decoders.

A decoder holds, for ``batch`` rows of up to ``capacity`` tokens, buffers whose shapes never
change: ``valid`` (B, cap) the real tokens, ``positions`` (B,) the next token's position,
``finished`` (B,), ``stops`` (S,) the stop ids (empty for none), ``force``/``forced`` (B,) the rows
fed a given token at the next step (a multi-turn observation) and that token, ``fed`` (B, cap)
the tokens that were fed, ``tokens``/``logprobs`` (B, cap) what was sampled, ``uniforms``
(cap, B, 2), ``logits`` (B, V) the distribution of the next token, and the device scalars
``start`` (the prompt width P) and ``t`` (steps so far). A step samples from ``logits``, records
the token, runs it through the model (the subclass's ``forward``) and reads and writes nothing
else, so on CUDA it can be captured once and replayed. Two decoders subclass it: ShrayGPT's
(``decode.StaticDecoder``) and Hugging Face models' (``hf_decode.HFDecoder``).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shraygpt_rl.sampling import sample_next_token


def linear_weight(module: nn.Module) -> Tensor:
    """The (out, in) matrix a bias-free linear module applies; for a wrapped one (LoRA), the
    matrix with its adapters, read off by applying the module to the identity."""
    if type(module) is nn.Linear:
        return module.weight
    weight = module.weight if hasattr(module, "weight") else module.base_layer.weight
    eye = torch.eye(weight.size(1), device=weight.device, dtype=weight.dtype)
    return module(eye).T


def signature(model: nn.Module) -> tuple:
    """Changes whenever a weight changes in place or moves, or adapters are switched on or off."""
    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    adapters = tuple(
        (getattr(m, "disable_adapters", None), tuple(getattr(m, "active_adapters", ()) or ()))
        for m in model.modules()
        if hasattr(m, "base_layer")
    )
    return params, adapters


def onednn_available(dtype: torch.dtype) -> bool:
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


class FixedShapeDecoder:
    """The state and loop of a fixed-shape decode step (see the module docstring); a subclass
    gives ``prefill`` (which must call ``reset``) and ``forward``, and says whether its step may be
    captured as a CUDA graph (``capturable``)."""

    capturable = True

    def __init__(self, batch: int, capacity: int, vocab_size: int, sampling: Sampling, device: torch.device):
        B, cap = batch, capacity
        self.batch, self.capacity, self.sampling, self.device = batch, capacity, sampling, device
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
        self.logits = torch.zeros(B, vocab_size, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.graph: Any = None
        self.eager_steps = 0

    def reset(self, attention_mask: Tensor, logits: Tensor) -> None:
        """Start a generation after prompts of mask ``attention_mask`` (B, P) whose next-token
        logits are ``logits`` (B, V)."""
        P = attention_mask.size(1)
        self.logits.copy_(logits)
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

    def prefill(self, model: nn.Module, idx: Tensor, attention_mask: Tensor) -> None:
        raise NotImplementedError

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, V) after ``tokens`` (B,), each written to the cache at column ``start + t``."""
        raise NotImplementedError

    def step(self) -> None:
        """Sample a token per row, record it and run it through the model (``self.logits`` then
        predicts the token after it). On CUDA, the third call captures a graph that every later
        call, in this and later generations, replays."""
        if self.graph is not None:
            self.graph.replay()
            return
        cuda = self.device.type == "cuda" and self.capturable
        if cuda and self.eager_steps >= 2:
            self._capture()
            self.graph.replay()
            return
        self.eager_steps += 1
        if cuda:  # warm-up steps run on a side stream, as graph capture wants
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


def distinct_prompts(idx: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """The distinct rows of the prompts ``idx`` (B, P) with their padding ``attention_mask``, as
    (ids (U, P), mask (U, P), inverse (B,): each row's distinct prompt), or None when no row
    repeats another. GRPO and RLOO sample each prompt G times and evaluation repeats prompts for
    pass@k: a prefill of the U distinct prompts, copied to their rows, costs U/B of a full one."""
    P = idx.size(1)
    rows = torch.cat([idx, attention_mask.to(idx.dtype)], dim=1)  # (B, 2P): a prompt with its padding
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, 2P), (B,)
    if len(distinct) == len(rows):
        return None
    return distinct[:, :P], distinct[:, P:].to(attention_mask.dtype), inverse


# --------------------------------------------------------------------------------------------
# One decoder per model, batch and capacity, reused across generations
# --------------------------------------------------------------------------------------------
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
KEEP_DECODERS = 2  # per model: each holds a whole cache (and, on CUDA, a captured graph)


def decode_dtype(device: torch.device, weights_dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device``, else the weights' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weights_dtype


def capacity_bucket(tokens: int, device: torch.device) -> int:
    """The cache width for ``tokens``: exact on CPU; on CUDA rounded up to a multiple of 64, so
    that prompt batches of different widths share one captured graph."""
    return tokens if device.type != "cuda" else -(-tokens // 64) * 64


def cached(model: nn.Module, kind: str, key: tuple, make: Callable[[], Any], keep: int | None = None) -> Any:
    """The object of ``kind`` that ``model`` holds under ``key``, made by ``make`` on first use;
    with ``keep``, only the ``keep`` most recently used of that kind are kept (a decoder holds a
    whole cache and, on CUDA, a captured graph). Tensors made under inference mode cannot be
    written outside it (Lightning validates in inference mode and fits without it), so the mode
    is part of every key."""
    key = (*key, torch.is_inference_mode_enabled())
    entry = _DECODERS.setdefault(model, {}).setdefault(kind, {})
    value = entry.pop(key, None)
    entry[key] = make() if value is None else value  # most recently used last
    if keep is not None:
        for old in list(entry)[:-keep]:
            del entry[old]
    return entry[key]
