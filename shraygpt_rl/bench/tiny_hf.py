"""Tiny random-init Hugging Face models, for running seed 001's and seed 004's workflows offline
(the tests and the LoRA benchmark): GPT-Neo (TinyStories' architecture), OPT, Llama, Qwen2 and
Gemma 2, 2 layers of width 64, with a GPT-2 BPE tokenizer made from a tiktoken vocabulary file:
r50k_base (GPT-2's, which GPT-Neo and OPT use; ``../shared`` has it) or a byte-level one of 256
tokens and no merges."""

from __future__ import annotations

import base64
from pathlib import Path

import torch

from shraygpt_rl.bench import R50K

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_tokenizer(vocabulary: str, folder: Path, vocab_file: str | Path | None = None):
    """A GPT-2-style fast tokenizer with ``<|endoftext|>`` as EOS: from r50k (``vocab_file``, by
    default ``../shared``'s), or bytes only."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if vocabulary == "r50k":
        vocab_file = vocab_file or R50K
    else:  # 256 single bytes and no merges: byte-level BPE at the smallest size
        vocab_file = folder / "bytes.tiktoken"
        folder.mkdir(parents=True, exist_ok=True)
        vocab_file.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    converted = TikTokenConverter(vocab_file=str(vocab_file), pattern=GPT2_PATTERN).converted()
    eos = converted.get_vocab_size()
    converted.add_special_tokens(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    assert tokenizer.eos_token_id == eos
    return tokenizer


# Chat templates for tiny instruct models: ChatML (Qwen's layout: no BOS, <|im_end|> ends a turn)
# and an [INST] one that starts with a BOS and ends a reply with EOS (Llama 2's and Mistral's).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"]), "inst": (INST, ["<s>"])}


def tiny_hf_model(
    kind: str,
    folder: str | Path,
    vocabulary: str = "byte",
    seed: int = 0,
    template: str | None = None,
    **overrides,
) -> Path:
    """Write a tiny random ``kind`` (``gpt_neo``, ``opt``, ``llama``, ``qwen2`` or ``gemma2``) model
    and its tokenizer to ``folder``; with ``template`` (``chatml`` or ``inst``), the tokenizer carries
    that chat template and its special tokens, as an instruct model's does. ``overrides`` replace
    config fields (a wider head, say, where a kernel needs one)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPTNeoConfig,
        GPTNeoForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    folder = Path(folder)
    tokenizer = gpt2_tokenizer(vocabulary, folder)
    if template is not None:
        source, specials = TEMPLATES[template]
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
        if template == "inst":
            tokenizer.bos_token = "<s>"
        tokenizer.chat_template = source
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    tokens = dict(vocab_size=vocab, max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos)
    # Two layers of width 64 and four heads, in the names OPT and Llama share (GPT-Neo's differ).
    small = dict(tokens, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=eos)
    # Llama's layout, which Qwen2 and Gemma 2 share: grouped-query attention, a gated MLP.
    llama = dict(small, intermediate_size=128, num_key_value_heads=2)
    configs = {
        "gpt_neo": (
            GPTNeoConfig,
            GPTNeoForCausalLM,
            dict(
                tokens,
                hidden_size=64,
                num_layers=2,
                attention_types=[[["global", "local"], 1]],
                num_heads=4,
                window_size=256,
            ),
        ),
        # attention dropout is a float, not an nn.Dropout
        "llama": (LlamaConfig, LlamaForCausalLM, dict(llama, attention_dropout=0.1)),
        # biased q/k/v projections; a sliding window that is off
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(llama, tie_word_embeddings=True)),
        # soft-capped attention and logits, a sliding layer of window 64, a scaled embedding
        "gemma2": (
            Gemma2Config,
            Gemma2ForCausalLM,
            dict(llama, head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
        ),
        # functional dropout: no nn.Dropout module shows it
        "opt": (
            OPTConfig,
            OPTForCausalLM,
            dict(small, ffn_dim=128, word_embed_proj_dim=64, dropout=0.1),
        ),
    }
    if kind not in configs:
        raise ValueError(f"kind must be gpt_neo, opt, llama, qwen2 or gemma2; got {kind!r}.")
    config_class, model_class, arguments = configs[kind]
    unknown = sorted(set(overrides) - set(config_class().to_dict()))
    if unknown:  # a config takes any keyword, so a misspelt one would silently change nothing
        raise ValueError(f"{config_class.__name__} has no field {', '.join(unknown)}.")
    torch.manual_seed(seed)
    model = model_class(config_class(**{**arguments, **overrides}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
