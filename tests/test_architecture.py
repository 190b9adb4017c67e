"""The layering in docs/architecture.md holds: no module imports a layer above its own, and the
package's imports form no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shraygpt_rl"


def documented_layers(text: str) -> dict[str, int]:
    """``{"losses": 1, "model": 2, …}`` from the numbered list of docs/architecture.md."""
    layers = {}
    for line in text.splitlines():
        match = re.match(r"(\d+)\. \*\*[^*]+\*\*: (.+)$", line)
        if match:
            for name in re.findall(r"`([\w.]+)`", match.group(2)):
                layers[name] = int(match.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, importer: str = "") -> set[str]:
    """Every ``shraygpt_rl`` module that ``source`` imports, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{importer}: relative import; the package imports absolutely"
            found.add(node.module)
            if (PACKAGE.parent / node.module.replace(".", "/")).is_dir():  # ``from package import module``
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "shraygpt_rl" or m.startswith("shraygpt_rl.")}


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of ``shraygpt_rl.a.b``: that of ``a.b``, else of ``a``; the package itself is
    the model's."""
    parts = module.split(".")[1:]
    if not parts:
        return layers["model"]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in layers:
            return layers[".".join(parts[:n])]
    return None


def upward_imports(module: str, source: str, layers: dict[str, int]) -> list[str]:
    own = layer_of(module, layers)
    return sorted(
        f"{module} (layer {own}) imports {other} (layer {layer_of(other, layers)})"
        for other in imported_modules(source, module)
        if layer_of(other, layers) is not None and layer_of(other, layers) > own
    )


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return documented_layers((ROOT / "docs" / "architecture.md").read_text())


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_documented_layer(layers, sources):
    assert len(set(layers.values())) >= 5
    assert [m for m in sources if layer_of(m, layers) is None] == []


def test_no_module_imports_a_layer_above_its_own(layers, sources):
    assert [line for m, s in sources.items() for line in upward_imports(m, s, layers)] == []


def test_the_imports_form_no_cycle(sources):
    graph = {m: {o for o in imported_modules(s, m) if o in sources and o != m} for m, s in sources.items()}
    graph["shraygpt_rl"] = set()  # every submodule runs the package's __init__: not an edge that matters
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    cycles = [cycle for m in sorted(graph) if m not in state and (cycle := visit(m, []))]
    assert cycles == []


def test_the_checker_finds_an_upward_import(layers):
    lazy_cli = "def f():\n    from shraygpt_rl.cli import main\n"
    assert upward_imports("shraygpt_rl.model", lazy_cli, layers) == [
        "shraygpt_rl.model (layer 2) imports shraygpt_rl.cli (layer 7)"
    ]
    stage_from_rewards = "from shraygpt_rl.stages.reward import RewardStage\n"
    assert upward_imports("shraygpt_rl.rewards", stage_from_rewards, layers) != []
    downward = "import shraygpt_rl.losses\nfrom shraygpt_rl.data import stack_pairs\n"
    assert upward_imports("shraygpt_rl.stages.dpo", downward, layers) == []


def test_the_model_owns_rope_and_routing_and_the_decoder_uses_them(sources):
    """The static decode step imports RoPE and routing from the model's layers, never the reverse."""
    assert "shraygpt_rl.layers" in imported_modules(sources["shraygpt_rl.decode"])
    for owner in ("shraygpt_rl.layers", "shraygpt_rl.model"):
        assert "shraygpt_rl.decode" not in imported_modules(sources[owner]), owner


GLOBAL_SETTERS = re.compile(
    r"^(warnings\.(filterwarnings|simplefilter|resetwarnings)|logging\.(basicConfig|disable)"
    r"|torch\.(set_\w+|manual_seed|use_deterministic_algorithms)|os\.(environ\.\w+|putenv))$"
)


def import_time_side_effects(source: str) -> list[str]:
    """Calls at a module's top level (``if`` blocks included) that change process-wide state:
    warning filters, logging, torch's global settings, the environment."""
    found, body = [], list(ast.parse(source).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If | ast.Try | ast.With):
            body += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            name = ast.unparse(node.value.func)
            if GLOBAL_SETTERS.match(name):
                found.append(name)
        elif isinstance(node, ast.Assign) and any("os.environ" in ast.unparse(t) for t in node.targets):
            found.append("os.environ[...] =")
    return found


def test_importing_a_module_changes_no_global_state(sources):
    assert {m: effects for m, s in sources.items() if (effects := import_time_side_effects(s))} == {}


def test_the_side_effect_checker_finds_them():
    source = 'import warnings\nif True:\n    warnings.filterwarnings("ignore")\nos.environ["X"] = "1"\n'
    assert sorted(import_time_side_effects(source)) == ["os.environ[...] =", "warnings.filterwarnings"]
    assert import_time_side_effects('def f():\n    warnings.filterwarnings("ignore")\n') == []


ENGINE_MODULES = {f"shraygpt_rl.{m}" for m in ("engines", "fixed_shape", "decode", "hf_decode", "vllm_engine")}


def test_no_stage_or_evaluation_imports_an_engine():
    """The rollout seam: stages, evaluation, labelling and the pipeline reach the engines through
    ``generation`` only (``make_engine`` and the engine names), never an engine's module."""
    users = [
        *sorted((PACKAGE / "stages").glob("*.py")),
        *(PACKAGE / f"{m}.py" for m in ("evaluate", "label", "pipeline")),
    ]
    offenders = {
        module_name(path): sorted(imported_modules(path.read_text(), module_name(path)) & ENGINE_MODULES)
        for path in users
    }
    assert {k: v for k, v in offenders.items() if v} == {}
