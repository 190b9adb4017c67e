"""The Hugging Face backend: ShrayGPT's calling convention on GPT-Neo and OPT, exact logprobs,
padding, the tokenizer, and loading errors."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import fails

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


def _tiny(tmp_path, kind: str, **extra) -> str:
    """A tiny random Gemma-2 (final-logit soft-capping), Cohere (logit scale) or Granite (logit
    divisor) saved as a folder: the models whose forward post-processes the LM head's output."""
    import transformers

    shape = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    shape.update(num_key_value_heads=1, max_position_embeddings=64, **extra)
    configs = {
        "gemma2": ("Gemma2", dict(head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=5.0)),
        "cohere": ("Cohere", dict(logit_scale=0.25)),
        "granite": ("Granite", dict(logits_scaling=4.0)),
    }
    name, own = configs[kind]
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**shape, **own)
    folder = tmp_path / kind
    getattr(transformers, f"{name}ForCausalLM")(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_logits_post_processed_by_the_model_are_the_ones_trained_on(tmp_path, kind):
    """Gemma 2 soft-caps its logits (``cap * tanh(z / cap)``), Cohere and Granite scale them: the
    training forward's log-probabilities (head on response positions) must equal generation's."""
    policy = load_policy(_tiny(tmp_path, kind)).eval()
    ids, mask = prompts(vocab=300)
    out = generate(policy, ids, 12, attention_mask=mask, temperature=1.0)
    logits, _ = response_logits(policy, out.sequences, out.attention_mask, out.prompt_length)
    real = out.response_mask.bool()
    assert torch.allclose(token_logprobs(logits, out.responses)[real], out.logprobs[real], atol=1e-5)
    raw = policy.model.get_output_embeddings()(policy.features(out.sequences)[0])  # without the post-processing
    assert not torch.allclose(raw, policy(out.sequences)[0], atol=1e-3)  # so the test would catch a bare head


def test_a_model_whose_logits_cannot_be_reproduced_is_refused(tmp_path, monkeypatch):
    """An unknown post-processing (here: the soft-cap forgotten) stops at load time in one sentence."""
    from shraygpt_rl.errors import ConfigError
    from shraygpt_rl.hf import LogitHead

    folder = _tiny(tmp_path, "gemma2")
    monkeypatch.setattr(LogitHead, "forward", lambda self, hidden: self.linear(hidden))
    with pytest.raises(ConfigError, match="post-processes its logits"):
        load_policy(folder)


def cut(path: Path, size: int | str) -> Path:
    """Cut ``path`` off at ``size`` bytes ("half": half of it), as a copy or download that stopped early."""
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2 if size == "half" else size)
    return path


def cut_off_sentence(folder: str | Path, path: Path) -> str:
    """``load_policy(folder)``'s error, which must be one sentence naming ``path``."""
    with pytest.raises(CheckpointError) as err:
        load_policy(str(folder))
    message = str(err.value)
    assert f"'{path}' is cut off or corrupt (" in message and message.endswith("; copy or download it again.")
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("size", ["half", 5])
def test_a_cut_off_weights_file_is_one_sentence_naming_it(tiny_hf, tmp_path, size):
    folder = shutil.copytree(tiny_hf("gpt_neo"), tmp_path / "model")
    weights = cut(folder / "model.safetensors", size)
    reason = {"half": "incomplete metadata, file not fully covered", 5: "header too small"}[size]
    assert f"corrupt ({reason}); copy" in cut_off_sentence(folder, weights)


def test_the_cut_off_shard_or_pytorch_bin_is_the_one_named(tiny_hf, tmp_path):
    model = load_policy(str(tiny_hf("gpt_neo"))).model
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    cut_off_sentence(tmp_path / "sharded", cut(shards[1], "half"))
    binary = tmp_path / "bin"  # the older format transformers still reads when there is no safetensors file
    binary.mkdir()
    shutil.copy(tiny_hf("gpt_neo") / "config.json", binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    assert "cut off" in cut_off_sentence(binary, cut(binary / "pytorch_model.bin", "half"))


def test_a_whole_legacy_pytorch_bin_is_not_blamed_for_another_fault(tiny_hf, tmp_path):
    """torch's pre-zip format cannot be memory-mapped; a folder that fails for another reason (an
    unknown model type) must say that, not call its whole weights file cut off (review of issue 33)."""
    from shraygpt_rl.errors import CheckpointError

    model = load_policy(str(tiny_hf("gpt_neo"))).model
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "not_a_model"}')
    torch.save(model.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as error:
        load_policy(str(folder))
    assert "cut off" not in str(error.value) and "is not a Hugging Face causal LM folder" in str(error.value)


def test_a_cut_off_file_in_the_hub_cache_is_named(tiny_hf, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--org--tiny" / "refs").mkdir(parents=True)  # the cache's layout for org/tiny at main
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    snapshot = shutil.copytree(tiny_hf("gpt_neo"), tmp_path / "models--org--tiny" / "snapshots" / ("0" * 40))
    cut_off_sentence("org/tiny", cut(snapshot / "model.safetensors", 100))


def test_a_cut_off_model_stops_train_py_in_one_sentence(tiny_hf, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(tiny_hf("gpt_neo"), tmp_path / "model")
    weights = cut(folder / "model.safetensors", "half")
    monkeypatch.chdir(tmp_path)
    small = "--data.train_size 16 --data.val_size 8 --data.test_size 8 --data.batch_size 4 --trainer.max_steps 1"
    message = fails(capsys, ["--stage", "sft", "--model.policy", str(folder), *small.split()])
    assert message == (
        f"'{weights}' is cut off or corrupt (incomplete metadata, file not fully covered); copy or download it again."
    )
