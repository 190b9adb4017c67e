"""The Hugging Face backend: ShrayGPT's calling convention on GPT-Neo and OPT, exact logprobs,
padding, the tokenizer, and loading errors."""

from __future__ import annotations

import time

import pytest
import torch

from shraygpt_rl.errors import CheckpointError, TokenizerError
from shraygpt_rl.generation import generate, response_logits
from shraygpt_rl.hf import HFCausalLM
from shraygpt_rl.lora import LoRASpec
from shraygpt_rl.losses import token_logprobs
from shraygpt_rl.policy import load_policy, with_lora
from shraygpt_rl.tokenizer import get_tokenizer, r50k_base

KINDS = ("gpt_neo", "opt")


def prompts(batch: int = 4, width: int = 7, vocab: int = 256):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, width))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lora", [False, True])
def test_generation_and_training_logprobs_agree(tiny_hf, perturb_adapters, kind, lora):
    policy = load_policy(str(tiny_hf(kind))).eval()
    if lora:
        with_lora(policy, LoRASpec(r=4, alpha=8, dropout=0.0))
        perturb_adapters(policy)
    ids, mask = prompts()
    out = generate(policy, ids, 16, attention_mask=mask, eos_token_id=256, temperature=0.9)
    logits, aux = response_logits(policy, out.sequences, out.attention_mask, out.prompt_length, temperature=0.9)
    logprobs = token_logprobs(logits, out.responses)
    real = out.response_mask.bool()
    assert real.sum() > 20
    assert torch.allclose(logprobs[real], out.logprobs[real], atol=1e-5)
    assert float(aux) == 0.0  # dense: no load-balancing loss


@pytest.mark.parametrize("kind", KINDS)
def test_a_left_padded_row_gets_the_logits_of_the_unpadded_row(tiny_hf, kind):
    policy = load_policy(str(tiny_hf(kind))).eval()
    ids, mask = prompts()
    with torch.no_grad():
        padded = policy(ids, attention_mask=mask)[0]
        alone = policy(ids[:1, 3:])[0]
    assert torch.allclose(padded[0, 3:], alone[0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_features_and_head_are_the_forward(tiny_hf, kind):
    policy = load_policy(str(tiny_hf(kind))).eval()
    ids, mask = prompts()
    with torch.no_grad():
        hidden = policy.features(ids, attention_mask=mask)[0]
        assert torch.allclose(policy.head(hidden), policy(ids, attention_mask=mask)[0], atol=1e-5)
    config = policy.config
    assert config["backend"] == "hf" and config["vocab_size"] == 257 and config["d_model"] == 64
    assert policy.moe_stats() == {}


def test_the_hf_tokenizer_from_r50k_is_tiktoken_r50k(tiny_hf, r50k_file):
    folder = tiny_hf("gpt_neo", "r50k")
    hf, tiktoken_r50k = get_tokenizer("hf", folder), r50k_base(r50k_file)
    texts = ["Once upon a time, a cat met a dog.", "User: What's 2+2?\n\nAssistant: 4", "  spaces\ttabs\n", "é ü 😀"]
    for text in texts:
        assert hf.encode_ordinary(text) == tiktoken_r50k.encode_ordinary(text)
        assert hf.decode(hf.encode_ordinary(text)) == text
    assert (hf.eot_token, hf.n_vocab) == (tiktoken_r50k.eot_token, tiktoken_r50k.n_vocab)
    assert hf.encode_ordinary_batch(texts[:2]) == tiktoken_r50k.encode_ordinary_batch(texts[:2])


def test_loading_errors_are_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"--model.policy DIR") as err:
        HFCausalLM.from_pretrained("some-org/some-model")
    assert "hf download some-org/some-model" in str(err.value) and time.perf_counter() - start < 30
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a Hugging Face causal LM folder"):
        HFCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match="needs --data.tokenizer_path"):
        get_tokenizer("hf")
    with pytest.raises(TokenizerError, match="No Hugging Face tokenizer"):
        get_tokenizer("hf", tmp_path / "nothing")
