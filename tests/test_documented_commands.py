"""Every command that README.md and docs/*.md show runs, as written, at a small size.

One chain in one folder: the demo pipeline first, then the stage-by-stage commands, the
evaluation, the benchmarks and the online-RL examples, each finding what the ones before wrote.
The configs are copies of configs/ cut to a few steps; the benchmarks get size flags. The course
user's HH-RLHF commands run in a folder of their own, with a small r50k model standing in for the
course checkpoint, the shared HH-RLHF sample and vocabulary, and bf16 autocast as on a GPU. The
notebooks' Hugging Face workflows run in a third, with tiny random GPT-Neo and OPT models standing
in for the hub's, a small Dolly-format file, and the built-in arithmetic pairs for HH-RLHF.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import shraygpt_rl.bench
import shraygpt_rl.label
from shraygpt_rl.bench import HH_SAMPLE, R50K, ROOT
from shraygpt_rl.bench.__main__ import main as bench
from shraygpt_rl.cli import main as train
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.reward_model import RewardModel

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ONLINE = ("ppo", "grpo", "rloo", "trpo", "online")
# What each benchmark's command gets appended, and what every stage a benchmark runs gets.
BENCH_SIZES = {
    "generation": "--prompts 2 --new-tokens 4",
    "moe": "--moe-tokens 64",
    "grpo-step": f"--prompts 2 --generations 2 --new-tokens 4 --steps 1 --tokenizer-path {R50K}",
    "lora": "--sft-steps 20 --ppo-steps 8",
    "label": "--pairs 3",
    "gpu": "--shape tiny --device cpu --batches 2 --prompts 2 --generations 2 --new-tokens 4 --micro-batch-size 2 "
    "--steps 1",
}
HUB_MODELS = {"roneneldan/TinyStories-33M": "gpt_neo", "facebook/opt-350m": "opt"}
SMALL_STAGES = "--trainer.max_steps 8 --trainer.val_check_interval 4 --trainer.limit_val_batches 1 "
SMALL_STAGES += "--data.train_size 64 --data.val_size 16 --data.test_size 16 --trainer.enable_progress_bar false"


def documented_commands() -> list[list[str]]:
    """The ``python`` commands of every ```bash block, in document order (README first), with
    continuation lines joined and comments dropped; the test command itself is left out."""
    commands = []
    for document in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["python"] and words[1:3] != ["-m", "pytest"]:
                    commands.append(words)
    return commands


def notebook_config(config: dict, models: dict[str, Path], dolly: Path) -> None:
    """A Hugging Face workflow's config, offline and small: tiny models for the hub's, a local
    Dolly file, the built-in pairs for HH-RLHF."""
    model, data = config["model"], config["data"]
    model["policy"] = str(models.get(model["policy"], model["policy"]))
    if "max_new_tokens" in model:  # an online stage
        model.update(max_new_tokens=8, micro_batch_size=2)
        model.update(num_generations=2) if "num_generations" in model else None
    sources = {"databricks/databricks-dolly-15k": str(dolly), "Anthropic/hh-rlhf": "arithmetic"}
    data.update(source=sources.get(data["source"], data["source"]), max_length=96, max_prompt_length=64)
    data.update(batch_size=4, val_size=4, test_size=4)
    data.pop("data_dir", None)
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False)


def small_configs(src: Path, dst: Path, hh: bool, models: dict[str, Path] | None = None, dolly: Path | None = None):
    """configs/ as in the repository, with a few steps and small splits; the HH-RLHF ones read
    the shared sample offline; the Hugging Face ones (given ``models``) take tiny local models."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        if "trainer" not in config:  # pipeline.yaml, opt-pipeline.yaml
            config.update(num_prompts=16, **({"max_new_tokens": 8} if path.stem.startswith("opt-") else {}))
        elif config.get("model", {}).get("policy") in HUB_MODELS or path.stem.startswith("opt-"):
            if models is not None:
                notebook_config(config, models, dolly)
        elif path.stem.endswith("-hh") and hh:
            config["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1, accumulate_grad_batches=1)
            config["trainer"].update(precision="bf16-mixed", enable_progress_bar=False)
            config["data"].update(source=str(HH_SAMPLE), tokenizer_path=str(R50K), max_length=160, batch_size=4)
            config["data"].update(max_prompt_length=128, train_size=32, val_size=8, test_size=8)
            if path.stem.startswith("ppo"):
                config["trainer"].update(max_steps=8, val_check_interval=1)
                config["model"].update(max_new_tokens=16, micro_batch_size=2, num_mini_batches=2)
        else:
            online = path.stem.split("-")[0] in ONLINE
            config["trainer"].update(max_steps=8 if online else 4, val_check_interval=2 if online else 4)
            config["trainer"].update(limit_val_batches=1, enable_progress_bar=False)
            config["data"].update(train_size=64, val_size=16, test_size=16, **({"batch_size": 4} if online else {}))
        path.write_text(yaml.safe_dump(config))


def test_the_commands_are_found():
    commands = [" ".join(c[:4]) for c in documented_commands()]
    assert "python train.py --stage pipeline" in commands
    assert "python train.py --stage eval" in commands
    assert sum(c.startswith("python -m shraygpt_rl.bench") for c in commands) == 11
    assert (
        sum(any(w.startswith(("configs/opt-", "configs/tinystories")) for w in c) for c in documented_commands()) == 9
    )
    assert sum("-hh.yaml" in " ".join(c) for c in documented_commands()) == 3


def test_documented_names_and_files_exist():
    """Every ``from shraygpt_rl… import name`` of the ```python blocks, every backticked
    ``shraygpt_rl.…`` name and every backticked ``.py``/``.yaml``/``.md`` path resolves."""
    missing = []
    for document in DOCUMENTS:
        text = document.read_text()
        names = re.findall(r"`(shraygpt_rl(?:\.\w+)+)", text)
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("shraygpt_rl"):
                    names += [f"{node.module}.{alias.name}" for alias in node.names]
        missing += [f"{document.name}: {name}" for name in names if not _resolves(name)]
        for path in re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|yaml|md))`", text):
            if not any((base / path).exists() for base in (ROOT, ROOT / "shraygpt_rl", ROOT / "docs")):
                missing.append(f"{document.name}: {path}")
    assert missing == []


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attribute in parts[n:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


class RobotLabeller:
    """Stands in for the labelling page's server: instead of serving, it judges every item
    through the app (A slightly better, every third one B significantly), then stops."""

    def __init__(self, host, port, app, threaded=True):
        self.client = app.test_client()

    def serve_forever(self):
        state = self.client.get("/api/state").get_json()
        for n in itertools.count():
            if state["item"] is None:
                return
            choice = "B++" if n % 3 == 0 else "A+"
            state = self.client.post("/api/judge", json={"item": state["item"]["id"], "choice": choice}).get_json()

    def server_close(self):
        pass


@pytest.mark.slow
@pytest.mark.timeout(600)  # the whole chain: the demo, the course user's commands and both notebooks' workflows
def test_every_documented_command_runs(tmp_path, monkeypatch, capsys, tiny_hf):
    demo, hh, notebooks = tmp_path / "demo", tmp_path / "hh", tmp_path / "notebooks"
    with_shared = HH_SAMPLE.is_file() and R50K.is_file()
    small_configs(ROOT / "configs", demo / "configs", hh=False)
    small_configs(ROOT / "configs", hh / "configs", hh=True)
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "context": "", "response": str(i)}) + "\n" for i in range(24))
    )
    models = {name: tiny_hf(kind) for name, kind in HUB_MODELS.items()}
    small_configs(ROOT / "configs", notebooks / "configs", hh=False, models=models, dolly=dolly)
    (hh / "checkpoints").mkdir()
    torch.manual_seed(0)
    course_stand_in = ShrayGPT(**tiny_config(vocab_size=50257, block_size=256))
    course_stand_in.save_checkpoint(hh / "checkpoints" / "shraygpt-instruct.ckpt")
    monkeypatch.setattr(shraygpt_rl.bench, "OVERRIDES", SMALL_STAGES.split())
    monkeypatch.setattr(shraygpt_rl.bench, "HELD_OUT", 16)

    monkeypatch.setattr(shraygpt_rl.label, "make_server", RobotLabeller)
    ran, reports = [], {}
    for command in documented_commands():
        needs_shared = any(w.endswith("-hh.yaml") for w in command) or command[3:4] == ["grpo-step"]
        if needs_shared and not with_shared:
            continue
        notebook = any(w.startswith(("configs/opt-", "configs/tinystories")) for w in command)
        monkeypatch.chdir(hh if any(w.endswith("-hh.yaml") for w in command) else notebooks if notebook else demo)
        if command[1] == "train.py":
            result = train([str(models.get(w, w)) if notebook else w for w in command[2:]])  # hub names: tiny models
            if isinstance(result, dict):
                reports[f"{command[3]}{'-notebook' if notebook else ''}"] = result
        else:
            which = command[3]
            seeds = ["--seeds", "0", "1"] if "--seeds" in command else []  # two seeds show the spread over seeds
            bench([*command[3:], *BENCH_SIZES.get(which, "").split(), *seeds])
        ran.append(" ".join(command[1:4]))
    printed = capsys.readouterr().out
    monkeypatch.chdir(demo)

    # The pipeline: every stage, every export, the report and its figures.
    assert list(reports["pipeline"]["results"]) == ["SFT", "PPO", "GRPO", "DPO"]
    saved = json.loads(Path("reports/pipeline.json").read_text())
    assert 0 <= saved["reward_model_accuracy"] <= 1 and saved["results"]["SFT"]["kl_to_reference"] == 0.0
    for policy in ("PPO", "GRPO", "DPO"):
        row = saved["results"][policy]
        assert row["kl_to_reference"] is not None and 0 <= row["win_rate"] <= 1 and row["prompts"] == 16
    assert Path("reports/pipeline.png").stat().st_size > 10_000
    assert "[5/5] DPO" in printed and "reward model pairwise accuracy" in printed
    for name in ("instruct", "ppo", "grpo", "dpo", "rloo", "online-dpo", "kto", "simpo", "orpo"):
        assert ShrayGPT.load_from_checkpoint(f"checkpoints/shraygpt-{name}.ckpt").vocab_size == 320
    assert RewardModel.load_from_checkpoint("checkpoints/reward-model.ckpt").tokenizer == "byte"

    # The evaluation.
    saved = json.loads(Path("reports/ppo.json").read_text())
    assert set(saved["results"]) == {"reference", "policy"} and saved["results"]["policy"]["win_rate"] is not None
    assert Path("reports/ppo.png").is_file()

    # The benchmarks.
    assert "greedy outputs identical to the course's way: 2/2 rows" in printed
    assert "max |sparse - dense|" in printed
    assert all(f"  {stage} " in printed for stage in ("sft", "ppo", "grpo"))
    assert "reward model held-out pairwise accuracy" in printed
    assert "over seeds 0, 1: min / mean / max of held-out success" in printed
    assert "held-out 3-digit multiplication" in printed and "GRPO, tool" in printed
    assert re.search(r"static +with tools .* ratio [\d.]+x", printed) and "eager   with tools" in printed

    # Tools: the multi-turn demo's policies, and their evaluation with the calculator.
    for name in ("tools-instruct", "grpo-tools"):
        assert ShrayGPT.load_from_checkpoint(f"checkpoints/shraygpt-{name}.ckpt").vocab_size == 320
    tools = json.loads(Path("reports/tools.json").read_text())["results"]
    assert all(tools[k]["success"] is not None and tools[k]["pass@8"] is not None for k in ("policy", "reference"))

    # The notebooks' Hugging Face workflows: adapters, each stage starting from the one before.
    for name in ("tinystories-ppo", "opt-sft", "opt-ppo", "opt-grpo", "opt-dpo"):
        assert (notebooks / "checkpoints" / name / "adapter_model.safetensors").is_file(), name
    assert RewardModel.load_from_checkpoint(notebooks / "checkpoints" / "opt-reward-model.ckpt").tokenizer == "hf"
    assert "PPO + LoRA (after)" in printed
    seed_001 = reports["eval-notebook"]["results"]  # the adapter against its base, by the seed's reward
    assert all(
        {"reward/keyword_reward", "reward/animal_frequency"} <= set(seed_001[k]) for k in ("policy", "reference")
    )
    assert seed_001["policy"]["kl_to_reference"] is not None
    seed_004 = reports["pipeline-notebook"]
    assert list(seed_004["results"]) == ["SFT", "PPO", "GRPO", "DPO"] and 0 <= seed_004["reward_model_accuracy"] <= 1
    for label in ("PPO", "GRPO", "DPO"):  # scored by the reward model against the SFT policy; no verifier here
        row = seed_004["results"][label]
        assert row["win_rate"] is not None and row["reward_model_score"] is not None and row["success"] is None

    # The course user's HH-RLHF commands.
    if with_shared:
        completions_per_s = re.search(r"completions/s\s+([\d.]+)", printed)
        assert completions_per_s and float(completions_per_s.group(1)) > 0 and "FLOP floor" in printed
        for name in ("shraygpt-ppo", "shraygpt-dpo"):
            assert ShrayGPT.load_from_checkpoint(hh / "checkpoints" / f"{name}.ckpt").vocab_size == 50257
        assert RewardModel.load_from_checkpoint(hh / "checkpoints" / "reward-model.ckpt").tokenizer == "r50k_base"
        assert "HH-RLHF reward model held-out accuracy" in printed
    assert len(ran) == len(documented_commands()) - (0 if with_shared else 4)


def test_the_readme_stays_short():
    """The README is the front page: detail belongs in docs/ (issue 23's budget)."""
    assert len((ROOT / "README.md").read_bytes()) <= 10_240
