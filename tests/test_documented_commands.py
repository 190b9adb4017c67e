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
import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RobotLabellers

import shraygpt_rl.bench
import shraygpt_rl.bench.tools
import shraygpt_rl.label
from shraygpt_rl.bench import HH_SAMPLE, R50K, ROOT
from shraygpt_rl.bench.__main__ import main as bench
from shraygpt_rl.checkpoint import WRITERS
from shraygpt_rl.cli import main as train
from shraygpt_rl.data.labels import read_records
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.reward_model import RewardModel

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ONLINE = ("ppo", "grpo", "rloo", "trpo", "online")
# What each benchmark's command gets appended, and what every stage a benchmark runs gets.
BENCH_SIZES = {
    "generation": "--prompts 2 --new-tokens 4",
    "moe": "--moe-tokens 64",
    "grpo-step": f"--prompts 2 --generations 2 --new-tokens 4 --steps 1 --tokenizer-path {R50K} --shape tiny",
    "lora": "--sft-steps 20 --ppo-steps 8",
    "label": "--pairs 3",
    "gpu": "--shape tiny --device cpu --batches 2 --prompts 2 --generations 2 --new-tokens 4 --micro-batch-size 2 "
    "--steps 1",
}
# Hub models and what stands in for them: a tiny random model of the architecture (and template).
HUB_MODELS = {
    "roneneldan/TinyStories-33M": ("gpt_neo", None),
    "facebook/opt-350m": ("opt", None),
    "Qwen/Qwen2.5-0.5B-Instruct": ("llama", "chatml"),
}
# The Hugging Face workflows' configs: the seed notebooks' and "your own model and data".
HF_CONFIGS = ("opt-", "tinystories", "chat-", "grpo-gsm8k")
SMALL_STAGES = "--trainer.max_steps 4 --trainer.val_check_interval 2 --trainer.limit_val_batches 1 "
SMALL_STAGES += "--data.train_size 64 --data.val_size 16 --data.test_size 16 --trainer.enable_progress_bar false"
# What every evaluation's command gets appended: 8 held-out prompts, not 200 (the multi-turn one
# samples 9 answers of up to 3 turns of 64 tokens per prompt, for the policy and the reference).
SMALL_EVAL = ["--num_prompts", "8"]


def documented_commands() -> list[list[str]]:
    """The ``python`` commands of every ```bash block, in document order (README first), with
    continuation lines joined and comments dropped; the install and test commands are left out."""
    commands = []
    for document in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["python"] and words[1:3] not in (["-m", "pytest"], ["-m", "pip"]):
                    commands.append(words)
    return commands


def hub_stand_ins(folder: Path) -> dict[str, str]:
    """Local files in the formats of the hub datasets the docs name: Dolly's columns, TRL's
    ``messages`` (Capybara), implicit-prompt conversational pairs (UltraFeedback) and GSM8K."""
    folder.mkdir(parents=True, exist_ok=True)

    def chat(role, text):
        return {"role": role, "content": text}

    rows = {
        "dolly.jsonl": [{"instruction": f"Say {i}.", "context": "", "response": str(i)} for i in range(24)],
        "capybara.jsonl": [
            {
                "messages": [
                    chat("user", f"Say {i}."),
                    chat("assistant", str(i)),
                    chat("user", "Again."),
                    chat("assistant", str(i)),
                ]
            }
            for i in range(24)
        ],
        "ultrafeedback.jsonl": [
            {
                "chosen": [chat("user", f"Add {i} and 1."), chat("assistant", str(i + 1))],
                "rejected": [chat("user", f"Add {i} and 1."), chat("assistant", str(i))],
            }
            for i in range(24)
        ],  # fmt: skip
        "gsm8k.jsonl": [
            {"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
            for i in range(24)
        ],
    }
    for name, lines in rows.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return {
        "databricks/databricks-dolly-15k": str(folder / "dolly.jsonl"),
        "Anthropic/hh-rlhf": "arithmetic",
        "trl-lib/Capybara": str(folder / "capybara.jsonl"),
        "trl-lib/ultrafeedback_binarized": str(folder / "ultrafeedback.jsonl"),
        "openai/gsm8k": str(folder / "gsm8k.jsonl"),
    }


def notebook_config(config: dict, models: dict[str, Path], sources: dict[str, str]) -> None:
    """A Hugging Face workflow's config, offline and small: tiny models for the hub's, local
    files for the hub's datasets (``hub_stand_ins``), the built-in pairs for HH-RLHF."""
    model, data = config["model"], config["data"]
    model["policy"] = str(models.get(model["policy"], model["policy"]))
    if "max_new_tokens" in model:  # an online stage
        model.update(max_new_tokens=8, micro_batch_size=2)
        model.update(num_generations=2) if "num_generations" in model else None
    data.update(source=sources.get(data["source"], data["source"]), max_length=96, max_prompt_length=64)
    data.update(batch_size=4, val_size=4, test_size=4)
    data.pop("data_dir", None), data.pop("subset", None)
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False)


def small_configs(
    src: Path, dst: Path, hh: bool, models: dict[str, Path] | None = None, sources: dict[str, str] | None = None
):
    """configs/ as in the repository, with a few steps and small splits; the HH-RLHF ones read
    the shared sample offline; the Hugging Face ones (given ``models``) take tiny local models."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        if "trainer" not in config:  # pipeline.yaml, opt-pipeline.yaml
            config.update(num_prompts=16, **({"max_new_tokens": 8} if path.stem.startswith("opt-") else {}))
        elif config.get("model", {}).get("policy") in HUB_MODELS or path.stem.startswith(HF_CONFIGS):
            if models is not None:
                notebook_config(config, models, sources)
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
            config["trainer"].update(max_steps=4, val_check_interval=2 if online else 4)
            config["trainer"].update(limit_val_batches=1, enable_progress_bar=False)
            config["data"].update(train_size=64, val_size=16, test_size=16, **({"batch_size": 4} if online else {}))
        path.write_text(yaml.safe_dump(config))


def _checkpoint_paths(value) -> set[str]:
    """Every ``checkpoints/…`` string in a parsed YAML value."""
    if isinstance(value, dict):
        return set().union(*map(_checkpoint_paths, value.values()))
    if isinstance(value, list):
        return set().union(*map(_checkpoint_paths, value))
    return {value} if isinstance(value, str) and value.startswith("checkpoints/") else set()


def _config_kind(path: Path, config: dict) -> str:
    """``hh`` (the course user's HH-RLHF configs), ``notebook`` (the Hugging Face workflows, as
    ``small_configs`` tells them) or ``demo``."""
    if path.stem.endswith("-hh"):
        return "hh"
    if path.stem.startswith(HF_CONFIGS) or (config.get("model") or {}).get("policy") in HUB_MODELS:
        return "notebook"
    return "demo"


def test_demo_configs_keep_clear_of_the_course_users_checkpoints():
    """The demo runs beside a course checkpoint (issue 33): every checkpoint path a demo config
    reads or writes is under checkpoints/demo/, none is a path the ``*-hh.yaml`` configs use, the
    course checkpoint is named by the ``*-hh.yaml`` configs alone, and the pipeline chains demo
    configs only. Fails if a demo config (a new one too) exports to or starts from
    checkpoints/shraygpt-instruct.ckpt, where the export guard would refuse to overwrite a course
    checkpoint or, worse, a demo stage would train from it."""
    paths: dict[str, dict[str, set[str]]] = {"demo": {}, "hh": {}, "notebook": {}}
    named_course_checkpoint = []  # in a value or a comment
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        paths[_config_kind(path, config)][path.name] = _checkpoint_paths(config)
        if "checkpoints/shraygpt-instruct.ckpt" in path.read_text():
            named_course_checkpoint.append(path.name)
    assert named_course_checkpoint == ["dpo-hh.yaml", "ppo-hh.yaml", "reward-hh.yaml"]
    assert {"sft.yaml", "reward.yaml", "ppo-rm.yaml", "grpo-tools.yaml"} <= set(paths["demo"])
    assert set(paths["hh"]) == {"reward-hh.yaml", "ppo-hh.yaml", "dpo-hh.yaml"}
    outside = {
        name: sorted(p for p in used if not p.startswith("checkpoints/demo/")) for name, used in paths["demo"].items()
    }
    assert {name: used for name, used in outside.items() if used} == {}
    course_user = set().union(*paths["hh"].values())
    assert "checkpoints/shraygpt-instruct.ckpt" in course_user
    assert all(not used & course_user for used in [*paths["demo"].values(), *paths["notebook"].values()])
    pipeline = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    chained = {Path(v).name for k, v in pipeline.items() if k in ("sft", "reward", "ppo", "grpo", "dpo")}
    assert chained <= set(paths["demo"]) and len(chained) == 5


def test_a_missing_demo_checkpoint_names_the_command_that_writes_it():
    """``checkpoint.WRITERS`` maps each file to the command that writes it: that command's config
    (``configs/<stage>.yaml`` without ``--config``) must export to exactly that path. Fails if
    the demo's paths move and the hint keeps pointing at the old ones."""
    assert WRITERS
    for path, command in WRITERS.items():
        words = command.split()
        assert words[:3] == ["python", "train.py", "--stage"], command
        config = words[words.index("--config") + 1] if "--config" in words else f"configs/{words[3]}.yaml"
        assert yaml.safe_load((ROOT / config).read_text())["model"]["export_path"] == path, command


def test_the_readme_installs_as_ci_does():
    """The README's quick start installs with the very command ``.ci/run`` runs."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = next(line for line in ci if line.startswith("python -m pip install"))
    quick_start = re.search(r"## Quick start\n\n```bash\n(.*?)\n", (ROOT / "README.md").read_text())
    assert quick_start and quick_start.group(1).split("#")[0].strip() == install


def on_grid(value: float | None, n: int) -> bool:
    """Whether ``value`` is a share of ``n`` equal parts (a count over ``n``), in [0, 1]."""
    return value is not None and 0 <= value <= 1 and abs(value * n - round(value * n)) < 1e-6


def pipeline_report_problems(report: dict, prompts: int, pairs: int, k: int) -> list[str]:
    """What a pipeline report on the built-in arithmetic must satisfy exactly, however little
    the tiny runs learned: each figure is a count over the right number of items and agrees
    with the others. Returns the problems found (none for a sound report)."""
    problems = []

    def check(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    # The share of `pairs` held-out pairs the reward model ranks right: a multiple of 1/pairs.
    # Catches a soft accuracy (the mean Bradley-Terry probability) or padded or repeated rows.
    check(on_grid(report["reward_model_accuracy"], pairs), f"accuracy {report['reward_model_accuracy']}")
    sft = report["results"]["SFT"]
    # The SFT policy is the reference: nothing is measured against itself.
    check(sft["kl_to_reference"] == 0.0 and sft["win_rate"] is None, "SFT row measured against itself")
    for label, row in report["results"].items():
        check(row["prompts"] == prompts, f"{label}: {row['prompts']} prompts")
        s, r = row["success"], row["mean_reward"]
        # Success is a share of prompts, and the mean reward lies where it says: +1 per success,
        # -1 to -0.2 for the others. Catches the two taken from different samples, or success
        # no longer meaning reward == +1.
        check(on_grid(s, prompts), f"{label}: success {s}")
        check(2 * s - 1 - 1e-6 <= r <= s - 0.2 * (1 - s) + 1e-6, f"{label}: mean reward {r} vs success {s}")
        # pass@1 averages c/k over prompts, pass@k and maj@k are shares of prompts; a prompt counts
        # for pass@k or maj@k only with c >= 1 right samples, when its pass@1 is >= 1/k. So
        # maj@k <= pass@k <= k * pass@1 and pass@1 <= pass@k. Catches the columns missing or
        # swapped, pass@k over the wrong groups of samples, or a vote counted without a right one.
        one, at_k, majority = row.get("pass@1"), row.get(f"pass@{k}"), row.get(f"maj@{k}")
        if None in (one, at_k, majority):
            problems.append(f"{label}: pass@1 / pass@{k} / maj@{k} missing")
            continue
        check(on_grid(one, prompts * k) and on_grid(at_k, prompts) and on_grid(majority, prompts), f"{label}: grid")
        check(one <= at_k <= k * one + 1e-9 and majority <= at_k, f"{label}: {one}, {at_k}, {majority}")
    for label in ("PPO", "GRPO", "DPO"):
        row = report["results"][label]
        kl, win = row["kl_to_reference"], row["win_rate"]
        # KL(policy || SFT) of a policy trained away from the SFT policy: finite and not 0.
        # Catches an export that is the SFT policy (untrained, or the reference saved in its
        # place) or a KL taken against the policy itself: both give exactly 0. Not "> 0": on 16
        # samples the k1 estimate of these few-step runs' small KL takes either sign (DPO's
        # ranged from -0.006 to +0.006 over sampling seeds 0-3).
        check(kl is not None and math.isfinite(kl) and kl != 0, f"{label}: KL {kl}")
        # 1, 1/2 (a tie) or 0 per prompt: a multiple of 1/(2 prompts). Catches a win rate that
        # is a mean score difference or probability rather than a count of comparisons.
        check(on_grid(win, 2 * prompts), f"{label}: win rate {win}")
    return problems


def test_the_commands_are_found():
    commands = [" ".join(c[:4]) for c in documented_commands()]
    assert "python train.py --stage pipeline" in commands
    assert "python train.py --stage eval" in commands
    assert sum(c.startswith("python -m shraygpt_rl.bench") for c in commands) == 13
    assert (
        sum(any(w.startswith(tuple(f"configs/{c}" for c in HF_CONFIGS)) for w in c) for c in documented_commands())
        == 12
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


def chain_of(command: list[str]) -> str:
    """Which folder a documented command runs in: the course user's HH-RLHF commands (``hh``),
    the Hugging Face workflows (``notebooks``) or the demo (``demo``, the benchmarks included).
    Each chain finds what its own earlier commands wrote, and no other chain's."""
    if any(w.endswith("-hh.yaml") for w in command):
        return "hh"
    if any(w.startswith(tuple(f"configs/{c}" for c in HF_CONFIGS)) for w in command):
        return "notebooks"
    return "demo"


def needs_shared(command: list[str]) -> bool:
    return chain_of(command) == "hh" or command[3:4] == ["grpo-step"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("chain", ["demo", "hh", "notebooks"])
def test_every_documented_command_runs(chain, tmp_path, monkeypatch, capsys, tiny_hf):
    """Every documented command of one chain, in document order, in a folder of its own: the
    three chains run side by side on pytest-xdist's workers."""
    with_shared = HH_SAMPLE.is_file() and R50K.is_file()
    if chain == "hh" and not with_shared:
        pytest.skip(f"the course user's commands need {HH_SAMPLE} and {R50K} (the read-only ../shared folder)")
    commands = [c for c in documented_commands() if chain_of(c) == chain and (with_shared or not needs_shared(c))]
    folder, models = tmp_path / chain, {}
    if chain == "notebooks":
        models = {name: tiny_hf(kind, template=template) for name, (kind, template) in HUB_MODELS.items()}
        small_configs(ROOT / "configs", folder / "configs", hh=False, models=models, sources=hub_stand_ins(tmp_path))
    else:
        small_configs(ROOT / "configs", folder / "configs", hh=chain == "hh")
    if chain == "hh":
        (folder / "checkpoints").mkdir()
        torch.manual_seed(0)
        course_stand_in = ShrayGPT(**tiny_config(vocab_size=50257, block_size=256))
        course_stand_in.save_checkpoint(folder / "checkpoints" / "shraygpt-instruct.ckpt")
    monkeypatch.setattr(shraygpt_rl.bench, "OVERRIDES", SMALL_STAGES.split())
    monkeypatch.setattr(shraygpt_rl.bench, "HELD_OUT", 8)
    monkeypatch.setattr(shraygpt_rl.bench.tools, "REPEATS", 1)
    monkeypatch.setattr(shraygpt_rl.bench.tools, "PROMPTS", 4)
    monkeypatch.setattr(shraygpt_rl.bench.tools, "SAMPLES", 2)
    monkeypatch.setattr(shraygpt_rl.label, "make_server", RobotLabellers)
    monkeypatch.chdir(folder)
    reports, seeded = {}, False
    for command in commands:
        if command[1] == "train.py":
            small = SMALL_EVAL if command[2:4] == ["--stage", "eval"] else []
            result = train([*(str(models.get(w, w)) for w in command[2:]), *small])  # hub names: tiny models
            if isinstance(result, dict):
                reports[command[3]] = result
        else:
            # Two seeds for the first command with --seeds show the spread over seeds; one for the others.
            seeds = ["--seeds", "0", *([] if seeded else ["1"])] if "--seeds" in command else []
            seeded |= bool(seeds)
            bench([*command[3:], *BENCH_SIZES.get(command[3], "").split(), *seeds])
    assert commands, chain
    {"demo": check_demo, "hh": check_hh, "notebooks": check_notebooks}[chain](
        folder, reports, capsys.readouterr().out, with_shared
    )


def check_demo(folder: Path, reports: dict, printed: str, with_shared: bool) -> None:
    """What the demo's commands leave: the pipeline's exports and report, the evaluation, the
    benchmarks' tables and the multi-turn demo's policies."""
    # The pipeline: every stage, every export, the report and its figures (16 held-out prompts
    # and pairs in the small configs; pass@8 by default), exactly as far as they are determined.
    assert list(reports["pipeline"]["results"]) == ["SFT", "PPO", "GRPO", "DPO"]
    saved = json.loads(Path("reports/pipeline.json").read_text())
    assert pipeline_report_problems(saved, prompts=16, pairs=16, k=8) == []
    assert Path("reports/pipeline.png").stat().st_size > 10_000
    assert "[5/5] DPO" in printed and "reward model pairwise accuracy" in printed
    assert re.search(r"pass@1 +pass@8 +maj@8", printed)  # the table's last three columns
    for name in ("instruct", "ppo", "grpo", "dpo", "rloo", "online-dpo", "kto", "simpo", "orpo"):
        assert ShrayGPT.load_from_checkpoint(f"checkpoints/demo/shraygpt-{name}.ckpt").vocab_size == 320
    assert RewardModel.load_from_checkpoint("checkpoints/demo/reward-model.ckpt").tokenizer == "byte"
    assert not list(Path("checkpoints").glob("*.ckpt"))  # the demo leaves the course user's folder alone

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
    assert "PPO + LoRA (after)" in printed
    if with_shared:
        completions_per_s = re.search(r"completions/s\s+([\d.]+)", printed)
        assert completions_per_s and float(completions_per_s.group(1)) > 0 and "FLOP floor" in printed
        assert "HH-RLHF reward model held-out accuracy" in printed  # bench stages, on the shared sample
        assert printed.count("static / eager:") == 2  # bench grpo-step --hf, both shapes at toy size

    # Several labellers per pair: three names on every pair, the report and the files it writes.
    judged: dict[str, set[str]] = {}
    for record in read_records("labels/team.jsonl"):
        judged.setdefault(record["item"], set()).add(record["labeller"])
    assert judged and all(names == {"ann", "bob", "cat"} for names in judged.values())
    stats = json.loads(Path("labels/team.jsonl.stats.json").read_text())
    assert stats["votes_per_pair"] == {"3": len(judged)} and "Krippendorff's alpha (ordinal)" in printed
    assert Path("labels/team.jsonl.preferences.jsonl").stat().st_size and Path("labels/team.jsonl.kto.jsonl").is_file()

    # Tools: the multi-turn demo's policies, and their evaluation with the calculator.
    for name in ("tools-instruct", "grpo-tools"):
        assert ShrayGPT.load_from_checkpoint(f"checkpoints/demo/shraygpt-{name}.ckpt").vocab_size == 320
    tools = json.loads(Path("reports/tools.json").read_text())["results"]
    assert all(tools[k]["success"] is not None and tools[k]["pass@8"] is not None for k in ("policy", "reference"))


def check_notebooks(folder: Path, reports: dict, printed: str, with_shared: bool) -> None:
    """The notebooks' Hugging Face workflows: adapters, each stage starting from the one before."""
    for name in ("tinystories-ppo", "opt-sft", "opt-ppo", "opt-grpo", "opt-dpo", "chat-sft", "chat-dpo", "grpo-gsm8k"):
        assert (folder / "checkpoints" / name / "adapter_model.safetensors").is_file(), name
    assert RewardModel.load_from_checkpoint(folder / "checkpoints" / "opt-reward-model.ckpt").tokenizer == "hf"
    seed_001 = reports["eval"]["results"]  # the adapter against its base, by the seed's reward
    assert all(
        {"reward/keyword_reward", "reward/animal_frequency"} <= set(seed_001[k]) for k in ("policy", "reference")
    )
    assert seed_001["policy"]["kl_to_reference"] is not None
    seed_004 = reports["pipeline"]
    assert list(seed_004["results"]) == ["SFT", "PPO", "GRPO", "DPO"] and 0 <= seed_004["reward_model_accuracy"] <= 1
    for label in ("PPO", "GRPO", "DPO"):  # scored by the reward model against the SFT policy; no verifier here
        row = seed_004["results"][label]
        assert row["win_rate"] is not None and row["reward_model_score"] is not None and row["success"] is None


def check_hh(folder: Path, reports: dict, printed: str, with_shared: bool) -> None:
    """The course user's HH-RLHF commands: their exports, at the course vocabulary."""
    for name in ("shraygpt-ppo", "shraygpt-dpo"):
        assert ShrayGPT.load_from_checkpoint(folder / "checkpoints" / f"{name}.ckpt").vocab_size == 50257
    assert RewardModel.load_from_checkpoint(folder / "checkpoints" / "reward-model.ckpt").tokenizer == "r50k_base"


def test_the_chains_cover_every_documented_command():
    """Every documented command belongs to exactly one chain, and each chain has commands."""
    chains = [chain_of(c) for c in documented_commands()]
    counts = {chain: chains.count(chain) for chain in ("demo", "hh", "notebooks")}
    assert counts == {"demo": 38, "hh": 3, "notebooks": 12}


def test_the_readme_stays_short():
    """The README is the front page: detail belongs in docs/ (issue 23's budget)."""
    assert len((ROOT / "README.md").read_bytes()) <= 10_240
