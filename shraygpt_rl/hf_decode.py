"""A fixed-shape decode step for Hugging Face models, in the spirit of ShrayGPT's (``decode.py``).

``HFDecoder`` runs the model's own decoder (``HFCausalLM.model.get_decoder()``, LoRA adapters and
all) one token per row per step against transformers' preallocated ``StaticCache``, with the
attention mask, the positions and the sampler's state in fixed-shape buffers
(``fixed_shape.FixedShapeDecoder``). What it changes from the eager loop, with the same weights
and the same arithmetic up to the order of float additions:

* **No growing cache.** The eager loop's dynamic cache concatenates every layer's keys and values
  at every step (an O(T) copy per token); the static cache writes one column in place.
* **One prefill per distinct prompt.** GRPO and RLOO sample each prompt G times, and evaluation
  repeats prompts for pass@k: the prompt is run once and its keys and values copied to its
  rows, so the prefill costs 1/G of the eager loop's.
* **The LM head** is read off the model (adapters included) into the decode dtype once per
  weight change, in oneDNN's blocked layout on CPU (as ShrayGPT's packed head): at a 50k
  vocabulary it is most of a decode step's memory traffic. The model's own post-processing of
  its logits (``hf.LogitHead``) follows it.
* **Uniforms for sampling** are drawn for all steps ahead, in the eager sampler's order.

Where this would change what the model computes, the engine is not used: ``can_decode`` checks
once per model that a short static decode gives the training forward's logits, and refuses a
capacity beyond the model's attention window (GPT-Neo's local layers and sliding-window models
index their window by cache column).

The step is not captured as a CUDA graph: transformers keeps a sliding layer's length as a host
integer, which a replayed graph would not see change. On GPU the step runs eagerly.
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
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
from shraygpt_rl.hf import HFCausalLM, positions

CHECK_TOKENS = 8  # the exactness check's sequence: half prefill, half decode steps


class HeadWeights:
    """The LM head's (out, in) matrix in the decode dtype, refreshed when the weights change;
    kept in oneDNN's blocked layout on CPU."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.blocked = device.type == "cpu" and onednn_available(dtype)
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.signature: tuple | None = None

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        current = signature(model)
        if current == self.signature:
            return
        linear = model.head.linear
        with torch.autocast(linear.weight.device.type, enabled=False):
            weight = linear_weight(linear).to(self.dtype)  # (V, C), adapters included
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()) if self.blocked else weight.T.contiguous()
        )
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else bias.detach().to(self.dtype)
        self.signature = current

    def __call__(self, hidden: Tensor) -> Tensor:
        """Raw logits (B, V) of ``hidden`` (B, C), before the model's post-processing."""
        hidden = hidden.to(self.dtype)
        if self.blocked:
            return torch.ops.mkldnn._linear_pointwise(hidden, self.weight, self.bias, "none", [], "")
        logits = hidden @ self.weight  # (B, V)
        return logits if self.bias is None else logits + self.bias


def _cache_arg(module: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def attention_window(model: nn.Module) -> int | None:
    """The narrowest attention window of the model's layers, or None when every layer is global."""
    config = model.model.config.get_text_config(decoder=True)
    windows = []
    if config.model_type == "gpt_neo" and "local" in getattr(config, "attention_layers", []):
        windows.append(config.window_size)
    types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and (
        any("sliding" in t for t in types) or getattr(config, "use_sliding_window", not types)
    ):
        windows.append(config.sliding_window)
    return min(windows) if windows else None


class HFDecoder(FixedShapeDecoder):
    """Fixed-shape decoding state of a ``HFCausalLM`` (see the module docstring); ``cache`` is the
    model's ``StaticCache`` of ``capacity`` columns."""

    capturable = False  # see the module docstring

    def __init__(self, model: nn.Module, batch: int, capacity: int, sampling: Sampling, dtype: torch.dtype):
        from transformers import StaticCache

        device = model.head.weight.device
        super().__init__(batch, capacity, model.vocab_size, sampling, device)
        self.dtype = dtype
        self.cache = StaticCache(config=model.model.config, max_cache_len=capacity)
        self.model = weakref.ref(model)  # the per-model cache holds this decoder: no strong cycle
        self.cache_arg = _cache_arg(model.model.get_decoder())
        self.post = model.head.post  # the model's own post-processing of its logits
        self.window = attention_window(model)
        self.head: HeadWeights | None = None

    @torch.no_grad()
    def prefill(self, model: nn.Module, idx: Tensor, attention_mask: Tensor) -> None:
        """Reset the state and run each distinct prompt (B, P) once through the model's decoder,
        under whatever autocast the caller set; its keys and values go to every row it fills."""
        from transformers import DynamicCache

        decoder = model.model.get_decoder()
        self.cache.reset()
        # The dynamic cache keeps every prompt token: can_decode holds P + N within any window.
        shared = distinct_prompts(idx, attention_mask)
        if shared is not None:
            ids, mask, inverse = shared
            cache = DynamicCache(config=model.model.config)
        else:
            ids, mask, cache = idx, attention_mask, self.cache
        out = decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, **{self.cache_arg: cache}
        )
        hidden = out.last_hidden_state[:, -1]  # (U or B, C)
        if shared is not None:
            for i, layer in enumerate(cache.layers):
                self.cache.update(layer.keys[inverse], layer.values[inverse], i)
            hidden = hidden[inverse]  # (B, C)
        self.reset(attention_mask, self.post(self.head(hidden)))

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.model().model.get_decoder()(
            input_ids=tokens[:, None],
            attention_mask=self.valid,
            position_ids=self.positions[:, None],
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        return self.post(self.head(out.last_hidden_state[:, -1]))  # (B, V)


def hf_decoder(model: nn.Module, batch: int, tokens: int, sampling: Sampling) -> HFDecoder:
    """The model's decoder for this shape and sampling (made on first use), with its head
    refreshed from the model."""
    device = model.head.weight.device
    dtype = decode_dtype(device, model.head.weight.dtype)
    head = cached(model, "head", (dtype, device), lambda: HeadWeights(dtype, device))
    head.refresh(model)
    capacity = capacity_bucket(tokens, device)
    key = (batch, capacity, sampling, dtype, device)
    decoder = cached(
        model, "decoders", key, lambda: HFDecoder(model, batch, capacity, sampling, dtype), keep=KEEP_DECODERS
    )
    decoder.head = head
    return decoder


def can_decode(model: nn.Module, tokens: int) -> bool:
    """Whether ``HFDecoder`` runs ``model`` for ``tokens`` columns: a ``HFCausalLM`` in eval mode
    (``sample_and_decode`` sets it) with plain local parameters (not sharded by FSDP), within its
    attention window, and whose static decode gives its training forward's logits (checked once
    per model)."""
    if not isinstance(model, HFCausalLM):
        return False
    if any(type(p) is not nn.Parameter or p.numel() == 0 for p in model.parameters()):
        return False
    if model.training:  # dropout may be functional (OPT's), invisible in the modules; eval mode samples
        return False
    window = attention_window(model)
    if window is not None and capacity_bucket(tokens, model.head.weight.device) > window:
        return False
    return cached(model, "exact", (), lambda: _decodes_exactly(model))


@torch.no_grad()
def _decodes_exactly(model: nn.Module) -> bool:
    """Three rows, the first two the same prompt (the shared prefill's path), the third left-padded:
    a 4-token prompt and 3 decode steps against the model's forward on the whole sequence, without
    autocast, to a tolerance of the weights' dtype. A model whose forward does not take a static
    cache is reported once, in a warning, and decodes eagerly."""
    device, dtype = model.head.weight.device, model.head.weight.dtype
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            idx = torch.arange(CHECK_TOKENS, device=device)[None] * torch.tensor([[7], [7], [5]], device=device) + 3
            idx = idx % model.vocab_size  # (3, T)
            mask = torch.ones_like(idx)
            mask[2, 0] = 0  # one left-padded row
            half = CHECK_TOKENS // 2
            decoder = HFDecoder(model, 3, CHECK_TOKENS, Sampling(temperature=0.0), dtype)
            decoder.head = HeadWeights(dtype, device)
            decoder.head.refresh(model)
            decoder.prefill(model, idx[:, :half], mask[:, :half])
            ours = [decoder.logits.clone()]
            for t in range(half, CHECK_TOKENS - 1):
                decoder.valid[:, t] = True
                ours.append(decoder.forward(idx[:, t]).float())
                decoder.positions.add_(1)
            theirs = model(idx, attention_mask=mask)[0][:, half - 1 : -1].float()  # (3, half, V)
            return torch.allclose(torch.stack(ours, 1), theirs, atol=tolerance, rtol=tolerance)
    except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError, IndexError) as err:
        warnings.warn(
            f"{type(model.model).__name__} does not run in the static decode step ({type(err).__name__}: {err}); "
            "it samples through the eager loop.",
            stacklevel=2,
        )
        return False
    finally:
        model.train(was_training)
