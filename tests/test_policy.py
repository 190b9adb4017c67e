"""Loading and exporting a policy of either backend, with and without LoRA: what the next stage
reads back by path gives the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from shraygpt_rl.checkpoint import MARKER, check_writable
from shraygpt_rl.errors import CheckpointError
from shraygpt_rl.hf import HFCausalLM
from shraygpt_rl.lora import LoRASpec, has_adapters
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.policy import export_policy, is_hf_source, load_policy, policy_config, policy_from_config, with_lora


def logits(model, ids=None):
    ids = torch.arange(10)[None] % 250 if ids is None else ids
    with torch.no_grad():
        return model.eval()(ids)[0]


def test_sources_are_told_apart(tiny_hf, tmp_path):
    assert is_hf_source("roneneldan/TinyStories-33M") and is_hf_source(str(tiny_hf("opt")))
    assert not is_hf_source("checkpoints/shraygpt-instruct.ckpt") and not is_hf_source("model.ckpt")
    assert not is_hf_source(str(tmp_path))  # a folder without config.json


@pytest.mark.parametrize("kind", ["gpt_neo", "opt"])
def test_an_hf_adapter_export_chains(tiny_hf, perturb_adapters, tmp_path, kind):
    """SFT's adapter, merged into the base, is what PPO starts from; PPO's adapter names SFT's
    folder as its base, so loading it gives base + SFT + PPO."""
    base = str(tiny_hf(kind))
    sft = with_lora(load_policy(base), LoRASpec(r=4, alpha=8, dropout=0.0))
    perturb_adapters(sft)
    export_policy(sft, tmp_path / "sft", stage="sft", merged=True)
    files = {p.name for p in (tmp_path / "sft").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", MARKER, "merged"} <= files
    restarted = load_policy(str(tmp_path / "sft"))
    assert not has_adapters(restarted) and restarted.source == str(tmp_path / "sft")
    assert torch.allclose(logits(restarted), logits(sft), atol=1e-5)
    assert torch.allclose(logits(load_policy(str(tmp_path / "sft" / "merged"))), logits(sft), atol=1e-5)

    ppo = with_lora(restarted, LoRASpec(r=2, alpha=4, dropout=0.0))
    perturb_adapters(ppo, scale=0.3)
    export_policy(ppo, tmp_path / "ppo", stage="ppo")
    assert json.loads((tmp_path / "ppo" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "sft"
    )
    assert torch.allclose(logits(load_policy(str(tmp_path / "ppo"))), logits(ppo), atol=1e-5)


def test_a_full_hf_export_and_a_stage_config_round_trip(tiny_hf, tmp_path):
    model = load_policy(str(tiny_hf("gpt_neo")))
    with torch.no_grad():
        model.head.weight.add_(0.01)  # tied to the embedding: both change
    export_policy(model, tmp_path / "full", stage="sft")
    assert torch.equal(logits(load_policy(str(tmp_path / "full"))), logits(model))
    check_writable(tmp_path / "full")  # ours: a rerun may overwrite it
    lora = with_lora(model, LoRASpec(r=2))
    rebuilt = policy_from_config(policy_config(lora))
    assert isinstance(rebuilt, HFCausalLM) and rebuilt.lora == lora.lora
    rebuilt.load_state_dict(lora.state_dict())
    assert torch.equal(logits(rebuilt), logits(lora))


def test_a_shraygpt_lora_export_is_a_merged_course_checkpoint(tmp_path, perturb_adapters):
    torch.manual_seed(0)
    ShrayGPT(**tiny_config()).save_checkpoint(tmp_path / "sft.ckpt")
    policy = with_lora(load_policy(str(tmp_path / "sft.ckpt")), LoRASpec(r=4, dropout=0.0))
    perturb_adapters(policy, scale=0.2)
    export_policy(policy, tmp_path / "ppo.ckpt", stage="ppo", started_from=str(tmp_path / "sft.ckpt"))
    merged = ShrayGPT.load_from_checkpoint(tmp_path / "ppo.ckpt")  # the course's loader reads it
    assert torch.allclose(logits(merged), logits(policy), atol=1e-5)
    assert torch.allclose(logits(load_policy(str(tmp_path / "ppo.ckpt.adapter"))), logits(policy), atol=1e-5)
    assert has_adapters(policy)  # the export merged a copy


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "weights.bin").write_text("x")
    with pytest.raises(CheckpointError, match="folder that shraygpt-rl did not write"):
        check_writable(tmp_path / "theirs")
