"""Reading and writing checkpoints: the course's format, stage checkpoints, reward models.

This module owns the layout. A course checkpoint is a ``torch.save``d dict whose ``state_dict``
holds the model's parameters and whose ``hyper_parameters`` holds the constructor arguments
(``ARCH_KEYS`` and more). What shraygpt-rl writes adds a ``META`` (``"shraygpt_rl"``) section
saying what the file holds:

* ``{"kind": "policy"}``: an exported policy, in the course's format (the course can load it);
* ``{"kind": "reward_model"}``: an exported reward model (trunk plus scalar head);
* ``{"kind": "<stage>", "policy_config": …}``: a stage's Lightning checkpoint, whose policy sits
  under ``policy.`` (and, for the reward stage, the reward model under ``model.``). Stages keep
  their own state in the same section (``stamp``, ``stamped``): the reward model's config, DPO's
  reference log-probabilities, the online stages' rollout count and KL coefficient.

Files are always read with ``weights_only=True``, so no arbitrary object is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from shraygpt_rl.errors import CheckpointError

META = "shraygpt_rl"
MARKER = "shraygpt_rl.json"  # in a folder we export (a Hugging Face model or an adapter): what it holds
# Constructor arguments that a course checkpoint's ``hyper_parameters`` carries.
ARCH_KEYS = (
    "vocab_size",
    "block_size",
    "d_model",
    "n_head",
    "d_head",
    "n_layers",
    "num_experts",
    "num_experts_per_tok",
    "dropout",
)
# The files the demo configs write (all under checkpoints/demo/, apart from the course user's
# checkpoints/shraygpt-instruct.ckpt), and the command that writes each: named in "missing" errors.
WRITERS = {
    "checkpoints/demo/shraygpt-instruct.ckpt": "python train.py --stage sft",
    "checkpoints/demo/reward-model.ckpt": "python train.py --stage reward",
    "checkpoints/demo/shraygpt-tools-instruct.ckpt": "python train.py --stage sft --config configs/sft-tools.yaml",
}


def stamp(checkpoint: dict[str, Any], **entries: Any) -> None:
    """Add ``entries`` to the shraygpt-rl section of a checkpoint dict being saved."""
    checkpoint.setdefault(META, {}).update(entries)


def stamped(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The shraygpt-rl section of a loaded checkpoint dict; empty for a course checkpoint."""
    return checkpoint.get(META) or {}


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely, turning every failure into one clear sentence."""
    path = Path(path)
    if not path.is_file():
        writer = WRITERS.get(path.as_posix())  # as the configs spell it, relative to the repository
        hint = f"`{writer}` writes it" if writer else "check the path or train the stage that writes it"
        raise CheckpointError(f"No checkpoint file at '{path}'; {hint}.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}).") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"'{path}' is not a Lightning checkpoint: it has no 'state_dict'.")
    return ckpt


def _under(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_policy_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict, dict]:
    """Return ``(hyper_parameters, state_dict)`` of a ShrayGPT policy (course, export or stage)."""
    ckpt = read_checkpoint(path, map_location)
    meta = stamped(ckpt)
    if meta.get("kind") in ("reward", "reward_model"):
        raise CheckpointError(
            f"'{path}' is a reward-model checkpoint, not a policy; pass it where a reward model or critic is expected."
        )
    if "policy_config" in meta:  # a stage's Lightning checkpoint
        return dict(meta["policy_config"]), _under(ckpt["state_dict"], "policy.")
    hparams = ckpt.get("hyper_parameters") or {}
    missing = [k for k in ARCH_KEYS if k not in hparams and k != "dropout"]
    if missing:
        raise CheckpointError(
            f"'{path}' is not a ShrayGPT policy checkpoint: its hyper_parameters lack {', '.join(missing)}."
        )
    return dict(hparams), ckpt["state_dict"]


def read_reward_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict, dict]:
    """Return ``(reward_config, state_dict)`` of a reward model (export or reward-stage checkpoint)."""
    ckpt = read_checkpoint(path, map_location)
    meta = stamped(ckpt)
    if meta.get("kind") == "reward_model":
        return dict(ckpt["hyper_parameters"]), ckpt["state_dict"]
    if meta.get("kind") == "reward":
        return dict(meta["reward_config"]), _under(ckpt["state_dict"], "model.")
    raise CheckpointError(
        f"'{path}' is not a reward-model checkpoint (it holds a {meta.get('kind', 'policy')}); "
        "train one with `python train.py --stage reward`."
    )


def check_writable(path: str | os.PathLike) -> None:
    """Refuse to overwrite a file that shraygpt-rl did not write (a course checkpoint, say)."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        if (path / MARKER).is_file() or not any(path.iterdir()):
            return
        raise CheckpointError(f"'{path}' is a folder that shraygpt-rl did not write; choose another export_path.")
    try:
        ours = META in torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        ours = False
    if not ours:
        raise CheckpointError(
            f"'{path}' exists and was not written by shraygpt-rl (a course checkpoint?); choose another export_path."
        )


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a half-written file: write a temporary file in the same
    folder, fsync it, then rename it over ``path``. On failure (a full disk, a folder that cannot
    be written) the temporary file is removed and ``CheckpointError`` says what happened."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = err.strerror or type(err).__name__
        raise CheckpointError(f"Could not write the checkpoint '{path}' ({reason}); nothing was saved there.") from err


def _save(path: str | os.PathLike, ckpt: dict) -> None:
    check_writable(path)
    atomic_save(ckpt, path)


def write_policy_checkpoint(path: str | os.PathLike, state_dict: dict, hparams: dict, stage: str = "") -> None:
    """Save a policy so that the course's ``ShrayGPT.load_from_checkpoint`` reads it."""
    import lightning

    _save(
        path,
        {
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": lightning.__version__,
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "hparams_name": "kwargs",
            "hyper_parameters": dict(hparams),
            META: {"kind": "policy", "stage": stage},
        },
    )


def write_reward_checkpoint(path: str | os.PathLike, state_dict: dict, config: dict, stage: str = "reward") -> None:
    """Save a reward model: its trunk and head weights, and what ``RewardModel`` needs to rebuild it."""
    _save(
        path,
        {
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "hyper_parameters": dict(config),
            META: {"kind": "reward_model", "stage": stage},
        },
    )
