"""Checks a stage runs before training, so that a run that cannot work fails at startup in one
sentence, and the check it runs before exporting, so that a broken model is never written.

Each function raises ``ConfigError``, ``CheckpointError`` or ``TrainingError``; ``train.py``
prints the sentence and exits with code 2.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from shraygpt_rl.errors import CheckpointError, ConfigError, TrainingError, require
from shraygpt_rl.reward_model import RewardModel


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """The tokenizer must fit the model's vocabulary, and must not be far smaller than it: a
    byte-level tokenizer on an r50k model would train on the wrong token ids without a word."""
    name, n = tokenizer.name, tokenizer.n_vocab
    if n > vocab_size:
        raise ConfigError(
            f"The tokenizer '{name}' has {n} tokens but the model's vocabulary has {vocab_size}; "
            "use the tokenizer the model was trained with (--data.tokenizer)."
        )
    if 2 * n < vocab_size:
        raise ConfigError(
            f"The model's vocabulary has {vocab_size} tokens but the tokenizer '{name}' only {n}, so the model was "
            "trained with another tokenizer; use that one (--data.tokenizer r50k_base for the course's models)."
        )


def check_lengths(block_size: int, max_length: int, max_prompt_length: int, max_new_tokens: int | None) -> None:
    """Sequences must fit the model's ``block_size``: ``max_length`` for the offline stages, the
    prompt plus the response for the online ones."""
    if max_new_tokens is None and max_length > block_size:
        raise ConfigError(
            f"--data.max_length {max_length} exceeds the model's block_size {block_size}; "
            f"lower it to {block_size} or less."
        )
    if max_new_tokens is not None and max_prompt_length + max_new_tokens > block_size:
        raise ConfigError(
            f"--data.max_prompt_length {max_prompt_length} + --model.max_new_tokens {max_new_tokens} exceeds the "
            f"model's block_size {block_size}; lower one of them."
        )


def check_dpo_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    """DPO's (and Online DPO's) options: beta > 0, and label smoothing in [0, 0.5) for the losses
    that use it (sigmoid and robust), 0 for the others."""
    require(beta > 0, f"beta must be > 0, got {beta}.")
    require(0 <= label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    smooths = loss_type in ("sigmoid", "robust")
    require(smooths or label_smoothing == 0, f"label_smoothing applies to sigmoid and robust, not {loss_type}.")


def check_rewards(functions: Iterable, metadata_keys: set[str], source: str) -> None:
    """Every reward function must find the metadata it reads in the data (``requires``): the
    task verifiers need the built-in tasks, the lexical reward needs HH-RLHF's responses."""
    for fn in functions:
        missing = [key for key in getattr(fn, "requires", ()) if key not in metadata_keys]
        if missing:
            name = type(fn).__name__
            raise ConfigError(
                f"{name} needs '{missing[0]}' in each prompt's metadata, which the data '{source}' does not "
                "have; choose reward functions that suit it (--model.rewards) or a reward model (--model.reward_model)."
            )


def check_folder_writable(folder: str | os.PathLike, what: str) -> None:
    """Create ``folder`` and write and remove a probe file in it, so that an unwritable export or
    checkpoint folder is found before training rather than after."""
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"Cannot write the {what} in '{folder}': '{blocking}' is a file, not a folder.")
    probe = folder / f".shraygpt-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(
            f"Cannot write the {what} in '{folder}' ({err.strerror or err}); choose another."
        ) from None


def check_finite(model: nn.Module, path: str) -> None:
    """Refuse to export a model whose weights, or whose outputs on a probe batch, are not finite."""
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if not bad:
        device = next(model.parameters()).device
        vocab = model.trunk.config["vocab_size"] if isinstance(model, RewardModel) else model.vocab_size
        probe = torch.arange(8, device=device)[None] % vocab  # (1, 8)
        with torch.no_grad():
            out = model.values(probe, torch.ones_like(probe))[0] if isinstance(model, RewardModel) else model(probe)[0]
        bad = [] if torch.isfinite(out).all() else ["its outputs on a probe batch"]
    if bad:
        raise TrainingError(
            f"Training left non-finite values in the model ({_first(bad)}); it was not exported to '{path}': "
            "lower the learning rate (--model.lr, --model.muon_lr) and train again."
        )


def _first(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
