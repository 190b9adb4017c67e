"""LoRA adapters (Hu et al., 2021) through peft, for either backend.

Adapters are injected into the model's own modules with ``peft.inject_adapter_in_model``, so a
ShrayGPT stays a ShrayGPT and a Hugging Face model stays one: every stage calls the same policy
interface with or without adapters. The base weights are frozen; only the adapters (and any head
a stage adds) train.

* The reference policy of a LoRA run is the same model with its adapters switched off
  (``AdaptersDisabled``): no second copy in memory.
* ``save_adapter`` writes peft's own format (``adapter_config.json`` and
  ``adapter_model.safetensors``): ``peft.PeftModel.from_pretrained(base, folder)`` reads it, and
  so does ``load_adapter`` here, which merges it into the base (what a later stage starts from).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shraygpt_rl.errors import ConfigError
from shraygpt_rl.hf import corrupt_file

ADAPTER = "default"  # peft's adapter name; one adapter per model
# ShrayGPT's attention projections: the query, the latent key and value, and the output.
SHRAYGPT_TARGETS = ("wq", "wk_lat", "wv_lat", "proj")


@dataclass(frozen=True)
class LoRASpec:
    """What ``--model.lora`` sets: ``{r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, v_proj]}``.

    Args:
        r: Rank of each adapter.
        alpha: Scale numerator: the update is ``(alpha / r) * B A``.
        dropout: Dropout on the adapter's input (the online stages switch it off, like all dropout).
        target_modules: Names of the linear layers that get adapters; None: the backend's default
            (ShrayGPT's attention projections; peft's per-architecture list for Hugging Face models).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, value: dict[str, Any] | LoRASpec | None) -> LoRASpec | None:
        """A spec from the config's dict (None stays None: full fine-tuning)."""
        if value is None or isinstance(value, LoRASpec):
            return value
        unknown = set(value) - {"r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise ConfigError(
                f"--model.lora takes r, alpha, dropout and target_modules, not {', '.join(sorted(unknown))}."
            )
        spec = cls(**{**value, "target_modules": _names(value.get("target_modules"))})
        if spec.r < 1 or spec.alpha <= 0 or not 0 <= spec.dropout < 1:
            raise ConfigError(f"--model.lora needs r >= 1, alpha > 0 and dropout in [0, 1), got {value}.")
        return spec

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return out


def _names(value) -> tuple[str, ...] | None:
    return None if value is None else tuple([value] if isinstance(value, str) else value)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The modules a spec without ``target_modules`` adapts."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return SHRAYGPT_TARGETS
    return tuple(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, ("q_proj", "v_proj")))


def peft_config(model: nn.Module, spec: LoRASpec, base_name: str | None = None) -> LoraConfig:
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules or default_targets(model)),
        base_model_name_or_path=base_name,
    )


def add_lora(model: nn.Module, spec: LoRASpec) -> nn.Module:
    """Freeze ``model`` and give its target modules fresh adapters (B = 0: the outputs are unchanged).

    ``model`` is changed in place and returned; ``model.lora`` records the spec.
    """
    targets = spec.target_modules or default_targets(model)
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(
            f"--model.lora target_modules {', '.join(missing)} name no linear layer of this model; "
            f"it has {', '.join(sorted(present))}."
        )
    model.requires_grad_(False)
    inject_adapter_in_model(peft_config(model, spec), model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    model.lora = spec
    return model


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base: every adapter off inside the block, back on after it."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersDisabled(nn.Module):
    """The reference policy of a LoRA run: ``policy`` with its adapters off, sharing its weights.

    It answers the calls the stages make of a reference (``forward``, ``features``, ``head``),
    each run with the adapters switched off. The policy is held as a plain attribute, so it is
    neither a submodule nor a second copy in a checkpoint.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        object.__setattr__(self, "policy", policy)

    def forward(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)

    def features(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy.features(*args, **kwargs)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with adapters_disabled(self.policy):
            return self.policy.head(hidden)

    @property
    def config(self) -> dict[str, Any]:
        return self.policy.config

    @property
    def block_size(self) -> int:
        return self.policy.block_size

    def new_kv_caches(self, *args, **kwargs):
        return self.policy.new_kv_caches(*args, **kwargs)

    def to(self, *args, **kwargs):
        return self  # the policy is moved with the stage


def share_frozen(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose frozen parameters are the original's tensors, not copies: the
    critic of a LoRA run gets its own adapters on the policy's base weights, at no memory cost."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def trainable_fraction(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and remove it: a plain model with the same outputs."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for attribute in ("lora", "peft_config"):  # a plain model again: a new adapter may go on it
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def save_adapter(model: nn.Module, folder: str | Path, base_name: str) -> None:
    """Write ``model``'s adapter in peft's format, naming ``base_name`` as its base model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    peft_config(model, model.lora, base_name).save_pretrained(folder)
    save_file(
        {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
        folder / "adapter_model.safetensors",
    )


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder names."""
    base = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"The adapter in '{folder}' names no base model (base_model_name_or_path).")
    return base


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the adapter saved in ``folder`` on ``model`` (its base) and merge it in."""
    config = LoraConfig.from_pretrained(str(folder))
    spec = LoRASpec(
        r=config.r, alpha=config.lora_alpha, dropout=0.0, target_modules=_names(sorted(config.target_modules))
    )
    add_lora(model, spec)
    path = Path(folder) / "adapter_model.safetensors"
    try:
        state = load_file(path)
    except SafetensorError as err:  # a cut-off copy: safetensors' message names no file
        raise corrupt_file(path, err) from err
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"The adapter in '{folder}' does not fit its base model ({result.unexpected_keys[0]}).")
    model.requires_grad_(True)
    return merge_lora(model)
