"""The policy interface every stage calls, and loading and saving a policy of either backend.

A policy is ``ShrayGPT`` (``model.py``) or a Hugging Face causal LM (``hf.HFCausalLM``). Both
answer the same calls, and the stages, the rollout engine and the reward model use nothing else:

* ``policy(idx, kv_caches=None, attention_mask=None, logits_to_keep=None) -> (logits, caches,
  aux_loss)``: the training forward with an attention mask (B, T) of real tokens, and, with the
  caches of ``new_kv_caches(batch, capacity)``, one step of KV-cached decoding
  (``generation.generate`` samples with per-row EOS and returns the sampling log-probabilities);
* ``features(idx, attention_mask) -> (hidden, _, aux_loss)`` and ``head``: the final hidden
  states and the LM head, so that ``generation.response_logits`` runs the head on response
  positions only;
* ``aux_loss`` is the MoE load-balancing loss (0 for a dense model), weighted by
  ``aux_loss_weight``; ``moe_stats()`` gives the router statistics (empty for a dense model);
* ``config`` (``vocab_size``, ``block_size``, ``d_model``, …), ``block_size``, ``vocab_size``;
* ``release_head()`` frees the LM head when the trunk becomes a reward model or critic;
* ``tokenizer_source``: where the model's own tokenizer loads from, or None (ShrayGPT: the
  data's config names the tokenizer).

``load_policy(source)`` reads any source a stage's ``--model.policy`` accepts; ``export_policy``
writes what the next stage reads back by path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from shraygpt_rl.checkpoint import read_policy_checkpoint
from shraygpt_rl.hf import HFCausalLM, mark, save_tokenizer
from shraygpt_rl.lora import (
    LoRASpec,
    adapter_base,
    add_lora,
    has_adapters,
    is_adapter_folder,
    load_adapter,
    merge_lora,
    save_adapter,
)
from shraygpt_rl.model import ShrayGPT


class Policy(Protocol):
    """What the stages call on a policy (see the module docstring)."""

    config: dict[str, Any]
    block_size: int
    vocab_size: int
    aux_loss_weight: float
    head: nn.Module
    tokenizer_source: str | None

    def __call__(self, idx: Tensor, kv_caches=None, attention_mask=None, logits_to_keep=None): ...
    def features(self, idx: Tensor, attention_mask: Tensor | None = None): ...
    def new_kv_caches(self, batch: int, capacity: int, device=None, dtype=None): ...
    def moe_stats(self) -> dict[str, Tensor]: ...
    def release_head(self) -> None: ...


def is_hf_source(source: str) -> bool:
    """A Hugging Face model folder, an adapter folder, or a hub name (``org/name``, not a file)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file() or is_adapter_folder(path)
    return not path.exists() and not source.endswith(".ckpt") and source.count("/") == 1 and not source.startswith(".")


def load_policy(source: str) -> nn.Module:
    """The policy at ``source``: a ShrayGPT checkpoint (course, export or stage), a Hugging Face
    hub name or ``save_pretrained`` folder, or an adapter folder (merged into its base)."""
    source = str(source)
    if is_adapter_folder(source):
        base = load_policy(adapter_base(source))
        load_adapter(adapter_root(base), source)
        if isinstance(base, HFCausalLM):
            base.source = source  # the next adapter is relative to this one, and its tokenizer is here
        return base
    if is_hf_source(source):
        return HFCausalLM.from_pretrained(source)
    config, state_dict = read_policy_checkpoint(source)
    model = policy_from_config(config)
    model.load_state_dict(state_dict)
    return model


def policy_from_config(config: dict[str, Any]) -> nn.Module:
    """A policy of the architecture ``policy_config`` describes (weights: uninitialised or random)."""
    config = dict(config)
    lora = LoRASpec.parse(config.pop("lora", None))
    model = HFCausalLM.from_config(config) if config.get("backend") == "hf" else ShrayGPT(**config)
    return with_lora(model, lora) if lora else model


def policy_config(model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model`` (``policy_from_config``): its config, plus its LoRA spec if it has one."""
    lora = getattr(model, "lora", None)
    return {**model.config, "lora": lora.to_dict()} if lora else dict(model.config)


def adapter_root(model: nn.Module) -> nn.Module:
    """The module whose names adapters are keyed by: the ``transformers`` model itself for a
    Hugging Face policy (as peft keys them), the policy for ShrayGPT."""
    return model.model if isinstance(model, HFCausalLM) else model


def with_lora(model: nn.Module, spec: LoRASpec) -> nn.Module:
    """``model`` with fresh adapters (``lora.add_lora``) and its base frozen; ``model.lora`` is set."""
    add_lora(adapter_root(model), spec)
    model.lora = spec
    return model


def base_name(model: nn.Module, started_from: str | None) -> str | None:
    """What an adapter of ``model`` is an adapter of."""
    return model.source if isinstance(model, HFCausalLM) else started_from


def export_policy(
    model: nn.Module, path: str | Path, stage: str = "", merged: bool = False, started_from: str | None = None
) -> None:
    """Write ``model`` where the next stage reads it back by path.

    * A Hugging Face policy: a folder. With LoRA, the adapter in peft's format (and, with
      ``merged``, the merged model in ``<path>/merged``); without, the whole model. The
      tokenizer goes with either.
    * ShrayGPT: a course-format ``.ckpt`` (the course's loader reads it), so with LoRA the
      adapters are merged into it; the adapter alone also goes to ``<path>.adapter`` when the run
      started from a checkpoint file (its base).
    """
    path = Path(path)
    lora = has_adapters(adapter_root(model))
    if isinstance(model, HFCausalLM):
        if not lora:
            model.save_pretrained(path, stage=stage)
            return
        save_adapter(adapter_root(model), path, base_name(model, started_from))
        save_tokenizer(model.source, path)
        mark(path, kind="adapter", stage=stage, base=model.source)
        if merged:
            merged_copy(model).save_pretrained(path / "merged", stage=stage)
        return
    if lora and started_from:
        adapter = path.with_name(path.name + ".adapter")
        save_adapter(model, adapter, started_from)
        mark(adapter, kind="adapter", stage=stage, base=started_from)
    (merged_copy(model) if lora else model).save_checkpoint(path, stage=stage)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters merged in; the model itself keeps them."""
    out = copy.deepcopy(model)
    merge_lora(adapter_root(out))
    if hasattr(out, "lora"):
        del out.lora
    return out
