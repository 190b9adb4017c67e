"""LoRA through peft on both backends: what trains, the reference with adapters off, peft's
format, merging, the critic's shared base."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from shraygpt_rl.errors import CheckpointError, ConfigError
from shraygpt_rl.lora import (
    SHRAYGPT_TARGETS,
    AdaptersDisabled,
    LoRASpec,
    adapters_disabled,
    load_adapter,
    merge_lora,
    save_adapter,
    share_frozen,
    trainable_fraction,
)
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.optim import split_params_for_muon
from shraygpt_rl.policy import adapter_root, load_policy, with_lora


def backends(tiny_hf):
    torch.manual_seed(0)
    return {
        "shraygpt": ShrayGPT(**tiny_config()).eval(),
        "gpt_neo": load_policy(str(tiny_hf("gpt_neo"))).eval(),
        "opt": load_policy(str(tiny_hf("opt"))).eval(),
    }


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["shraygpt", "gpt_neo", "opt"])
def test_only_adapters_train_and_disabling_them_gives_the_base_exactly(tiny_hf, perturb_adapters, name):
    model = backends(tiny_hf)[name]
    with torch.no_grad():
        base = model(ids())[0]
    with_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(ids())[0], base)  # B = 0: a fresh adapter changes nothing
        perturb_adapters(model)
        adapted = model(ids())[0]
        assert not torch.allclose(adapted, base)
        with adapters_disabled(model):
            assert torch.equal(model(ids())[0], base)
        assert torch.equal(model(ids())[0], adapted)  # back on after the block
        reference = AdaptersDisabled(model)
        assert torch.equal(reference(ids())[0], base)
        assert torch.equal(reference.head(reference.features(ids())[0]), base)
    assert list(reference.parameters()) == [] and reference.to("cpu") is reference  # no second copy


def test_default_targets_and_bad_specs(tiny_hf):
    model = with_lora(ShrayGPT(**tiny_config()), LoRASpec.parse({"r": 2}))
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == set(SHRAYGPT_TARGETS)
    neo = with_lora(load_policy(str(tiny_hf("gpt_neo"))), LoRASpec(r=2))
    assert {n.split(".")[-4] for n, p in neo.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="not rank"):
        LoRASpec.parse({"rank": 4})
    with pytest.raises(ConfigError, match="r >= 1"):
        LoRASpec.parse({"r": 0})
    with pytest.raises(ConfigError, match="name no linear layer of this model"):
        with_lora(ShrayGPT(**tiny_config()), LoRASpec(target_modules=("q_proj",)))
    assert LoRASpec.parse({"target_modules": "wq"}).target_modules == ("wq",)


def test_peft_reads_our_adapter_and_merging_keeps_the_outputs(tiny_hf, perturb_adapters, tmp_path):
    folder = str(tiny_hf("gpt_neo"))
    model = with_lora(load_policy(folder).eval(), LoRASpec(r=4, alpha=8, dropout=0.0))
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(ids())[0]
    save_adapter(adapter_root(model), tmp_path / "adapter", folder)
    peft_model = PeftModel.from_pretrained(load_policy(folder).model.eval(), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(peft_model(ids()).logits, adapted, atol=1e-6)
        merged = load_adapter(load_policy(folder).model.eval(), tmp_path / "adapter")
        assert torch.allclose(merged(ids()).logits, adapted, atol=1e-5)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merge_lora(adapter_root(model))(ids()).logits, adapted, atol=1e-5)


@pytest.mark.parametrize("size", ["half", 5])
def test_a_cut_off_adapter_file_is_one_sentence_naming_it(tiny_hf, tmp_path, size):
    folder = str(tiny_hf("gpt_neo"))
    save_adapter(adapter_root(with_lora(load_policy(folder), LoRASpec(r=4))), tmp_path / "adapter", folder)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    with open(weights, "r+b") as file:  # a copy or download that stopped early
        file.truncate(weights.stat().st_size // 2 if size == "half" else size)
    with pytest.raises(CheckpointError) as err:
        load_policy(str(tmp_path / "adapter"))
    message = str(err.value)
    assert message.startswith(f"'{weights}' is cut off or corrupt (") and "\n" not in message, message
    assert message.endswith("; copy or download it again."), message


def test_the_critic_copy_shares_the_frozen_base(tiny_hf):
    policy = with_lora(load_policy(str(tiny_hf("opt"))), LoRASpec(r=4))
    critic = share_frozen(policy)
    pairs = list(zip(policy.named_parameters(), critic.named_parameters()))
    for (name, p), (_, c) in pairs:
        assert (p.data_ptr() == c.data_ptr()) == (not p.requires_grad), name
    trainable, total = trainable_fraction(torch.nn.ModuleList([policy, critic]))
    adapters = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert trainable == 2 * adapters and total == sum(p.numel() for p in policy.parameters()) + adapters


def test_adapters_go_to_adamw_not_muon():
    model = with_lora(ShrayGPT(**tiny_config()), LoRASpec(r=4))
    muon, adamw = split_params_for_muon(model)
    assert muon == [] and len(adamw) == 2 * 4 * 2  # A and B for 4 targets in 2 layers
