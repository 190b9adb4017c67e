"""A Hugging Face causal LM behind the policy interface (``shraygpt_rl.policy``).

``HFCausalLM`` wraps any ``AutoModelForCausalLM`` (TinyStories' GPT-Neo, OPT, …) so that the
stages, the rollout engine and the reward model call it exactly as they call ShrayGPT:

* ``forward(idx, kv_caches, attention_mask, logits_to_keep) -> (logits, caches, aux_loss)``;
  the caches are the model's own (``HFCache`` holds transformers' cache object);
* ``features(idx, attention_mask) -> (hidden, None, aux_loss)`` and ``head``: the decoder's last
  hidden states and the LM head followed by the model's own post-processing of its logits
  (``LogitHead``: Gemma 2's soft-capping, Cohere's and Granite's scaling), so that the head runs
  on response positions only and still gives the logits the model samples from;
* ``aux_loss`` is 0 and ``moe_stats()`` is empty: the model is dense.

Positions always come from the attention mask (``cumsum - 1``), in the training forward and in
every decode step alike, so a left-padded row gets the logits of the unpadded row and the
sampling log-probabilities equal the training ones.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shraygpt_rl.checkpoint import MARKER
from shraygpt_rl.errors import CheckpointError, ConfigError


class HFCache:
    """The model's own KV cache for one generation (transformers builds it on the first call)."""

    def __init__(self) -> None:
        self.past = None


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids from a (B, T) mask: 0 at each row's first real token, padding clamped to 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def offline_hint(source: str) -> str:
    return (
        f"Could not load '{source}': it is not a local folder and the Hugging Face hub cannot be reached; "
        f"download it where there is network (`hf download {source} --local-dir DIR`) and pass that folder "
        "(--model.policy DIR)."
    )


def corrupt_file(path: str | Path, err: Exception) -> CheckpointError:
    """The one sentence for a weights file that does not open: cut off (a copy or download that
    stopped early) or otherwise corrupt; ``err``'s first clause says how."""
    # "Error while deserializing header: invalid header length" -> "invalid header length";
    # torch's "...zip archive: not a ZIP archive. This is an internal miniz error. ..." -> "not a ZIP archive"
    reason = str(err).split(". ")[0].rsplit(": ", 1)[-1].strip().rstrip(".") or type(err).__name__
    return CheckpointError(f"'{path}' is cut off or corrupt ({reason}); copy or download it again.")


def unreadable_weights(source: str) -> tuple[Path, Exception] | None:
    """The first weights file of ``source`` (a folder, or a hub name already in the local cache)
    that does not open, and why; None when all open, or when there is no such folder."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        try:  # the hub cache's copy; local_files_only: never the network
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:
            return None
    for path in sorted(folder.glob("*.safetensors")):  # every shard: the error does not say which failed
        try:
            with safe_open(path, "pt"):  # reads the header and checks the file's length against it
                pass
        except Exception as err:
            return path, err
    for path in sorted(folder.glob("pytorch_model*.bin")):  # not training_args.bin: a pickle, never weights
        try:  # mmap: reads the zip's directory, not the tensors
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:  # torch's legacy (pre-zip) format cannot be memory-mapped: read it whole
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                return path, err
    return None


class LogitHead(nn.Module):
    """The LM head, then what the model's own forward does to its logits, read from its config:
    ``final_logit_softcapping`` (Gemma 2 and 3: ``cap * tanh(logits / cap)``), ``logit_scale``
    (Cohere: a product) and ``logits_scaling`` (Granite: a quotient). ``HFCausalLM`` checks at
    load time that ``head(features(x))`` equals the model's forward, so a model that post-processes
    its logits some other way is refused instead of trained on other logits than it samples from.
    """

    def __init__(self, linear: nn.Linear, config):
        super().__init__()
        self.linear = linear
        self.cap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)
        self.divisor = getattr(config, "logits_scaling", None)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, hidden: Tensor) -> Tensor:
        return self.post(self.linear(hidden))

    def post(self, logits: Tensor) -> Tensor:
        """The model's own post-processing of the linear layer's logits (..., V)."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM with ShrayGPT's calling convention.

    Args:
        model: The ``PreTrainedModel`` (``AutoModelForCausalLM``).
        source: The hub name or folder it came from; names the tokenizer and the adapter's base.
    """

    aux_loss_weight = 0.0

    def __init__(self, model: nn.Module, source: str):
        super().__init__()
        self.model = model
        self.source = source
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str, dtype: torch.dtype = torch.float32) -> HFCausalLM:
        """From a hub name or a ``save_pretrained`` folder, in ``dtype`` (float32: exact logprobs)."""
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as err:
            # A cut-off weights file raises safetensors' own error (torch's RuntimeError for a .bin),
            # which names no file: find the file that does not open and name it.
            bad = unreadable_weights(source)
            if bad is not None:
                raise corrupt_file(*bad) from err
            if not isinstance(err, (OSError, ValueError)):
                raise  # not bad input: a bug keeps its traceback
            # no file or no network; a config transformers cannot read
            if Path(source).is_dir():
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise CheckpointError(f"'{source}' is not a Hugging Face causal LM folder ({reason}).") from err
            raise CheckpointError(offline_hint(source)) from err
        wrapped = cls(model, source)
        wrapped.check_head()
        return wrapped.train()  # transformers returns eval mode; a new ShrayGPT is in train mode

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HFCausalLM:
        """An uninitialised model of the architecture ``config`` (``self.config``) describes; its
        weights come from a checkpoint's state dict."""
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = dict(config["hf_config"])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
        return cls(model, config["source"])

    # -- the policy interface -------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        head = self.head
        return {
            "backend": "hf",
            "source": self.source,
            "vocab_size": head.out_features,
            "block_size": self.block_size,
            "d_model": head.in_features,
            "hf_config": self.model.config.to_dict(),
        }

    @property
    def block_size(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    @property
    def head(self) -> LogitHead:
        return LogitHead(self.model.get_output_embeddings(), self.model.config)

    @torch.no_grad()
    def check_head(self) -> None:
        """``head(features(x))`` must be the model's own logits, or the update would train on other
        logits than generation samples from: a short check on a few tokens, in eval mode."""
        was_training = self.training
        self.eval()
        idx = torch.arange(1, 9, device=self.head.weight.device)[None] % self.vocab_size  # (1, 8)
        ours = self.head(self.features(idx)[0]).float()
        theirs = self.forward(idx)[0].float()
        self.train(was_training)
        if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
            raise ConfigError(
                f"'{self.source}' post-processes its logits in a way shraygpt-rl does not reproduce "
                f"({type(self.model).__name__}: largest gap {float((ours - theirs).abs().max()):.3g})."
            )

    @property
    def tokenizer_source(self) -> str:
        """Where the model's own tokenizer loads from (``AutoTokenizer``): the model's name or folder."""
        return self.source

    def release_head(self) -> None:
        """Nothing to free: the LM head of these models is tied to the token embedding."""

    def twice_differentiable(self) -> None:
        """Attention whose backward can itself be differentiated (TRPO's Fisher-vector products):
        the eager implementation, the same function as SDPA's; SDPA's fused CPU and GPU kernels
        have no double backward."""
        if getattr(self.model.config, "_attn_implementation", "eager") != "eager":
            self.model.set_attn_implementation("eager")

    def new_kv_caches(self, batch: int, capacity: int, device=None, dtype=None) -> HFCache:
        return HFCache()

    def forward(
        self,
        idx: Tensor,
        kv_caches: HFCache | None = None,
        attention_mask: Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> tuple[Tensor, HFCache | None, Tensor]:
        """Logits (B, T, V) for ``idx`` (B, T) after what ``kv_caches`` holds; ``attention_mask``
        covers the cached tokens and ``idx``, as in ShrayGPT."""
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask
        kwargs = {self._cache_arg: kv_caches.past} if kv_caches is not None else {}
        out = self.model(
            input_ids=idx,
            attention_mask=mask,
            position_ids=positions(mask)[:, -idx.size(1) :],
            use_cache=kv_caches is not None,
            logits_to_keep=logits_to_keep or 0,
            **kwargs,
        )
        if kv_caches is not None:
            kv_caches.past = getattr(out, "cache", None) or out.past_key_values
        return out.logits, kv_caches, idx.new_zeros((), dtype=torch.float32)

    def features(self, idx: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, None, Tensor]:
        """The decoder's final hidden states (B, T, C), before the LM head."""
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask
        out = self.model.get_decoder()(
            input_ids=idx, attention_mask=mask, position_ids=positions(mask), use_cache=False
        )
        return out.last_hidden_state, None, idx.new_zeros((), dtype=torch.float32)

    def moe_stats(self) -> dict[str, Tensor]:
        return {}  # a dense model routes nothing

    # -- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, stage: str = "") -> None:
        """The whole model and its tokenizer in ``folder``, as ``from_pretrained`` reads them."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        save_tokenizer(self.source, folder)
        mark(folder, kind="policy", stage=stage, base=self.source)


def save_tokenizer(source: str, folder: Path) -> None:
    """Copy the tokenizer of ``source`` into ``folder`` (when ``source`` has one)."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    except (OSError, ValueError):
        pass  # a model without a tokenizer: the data's tokenizer_path names one


def mark(folder: Path, **fields: Any) -> None:
    """Record that shraygpt-rl wrote ``folder`` (and what it holds), so a rerun may overwrite it."""
    (folder / MARKER).write_text(json.dumps(fields, indent=1))
