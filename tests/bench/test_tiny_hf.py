"""The tiny random Hugging Face models the tests and the LoRA benchmark stand in for the hub's."""

from __future__ import annotations

import json

import pytest

from shraygpt_rl.bench.tiny_hf import tiny_hf_model


def test_overrides_replace_config_fields(tmp_path):
    folder = tiny_hf_model("opt", tmp_path / "opt", hidden_size=128, word_embed_proj_dim=128, num_attention_heads=2)
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["word_embed_proj_dim"], config["num_attention_heads"]) == (128, 128, 2)
    assert config["num_hidden_layers"] == 2 and config["dropout"] == 0.1  # the rest as without overrides


def test_a_misspelt_field_or_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="OPTConfig has no field num_layers"):
        tiny_hf_model("opt", tmp_path / "a", num_layers=4)  # OPT's is num_hidden_layers
    with pytest.raises(ValueError, match="kind must be gpt_neo, opt, llama, qwen2 or gemma2; got 'gpt2'"):
        tiny_hf_model("gpt2", tmp_path / "b")
