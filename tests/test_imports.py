"""The package's imports: every module imports and says what it holds, the wings import one way, and 0.1's module
paths (which configs name in `class_path` and `reward_funcs`) still import. Read from the source; no network."""

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dpo_lightning
from dpo_lightning.cli.main import cli_main

PACKAGE = Path(dpo_lightning.__file__).parent
# `__main__` modules run their command when imported: `test_python_dash_m_runs_...` runs them instead.
MODULES = sorted(m.name for m in pkgutil.walk_packages(dpo_lightning.__path__, prefix="dpo_lightning.")
                 if not m.name.endswith(".__main__"))
# The wings from the floor up: a module may import its own wing and the wings below it, never one above.
WINGS = ["utils", "data", "online", "training", "callbacks", "tools", "cli"]
RANK = {"utils": 0, "data": 1, "online": 2, "training": 3, "callbacks": 4, "tools": 4, "cli": 5}


def wing(module: str) -> str:
    return module.split(".")[1]


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported dpo_lightning module, whether the import statement is at module level) for each import in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpo_lightning."):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(name, id(node) in top) for name in names if name in MODULES]
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names if alias.name in MODULES]
    return found


def module_path(name: str) -> Path:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    assert importlib.import_module(name).__doc__, f"{name} opens with no docstring"


def test_every_module_sits_in_a_wing_and_every_wing_says_what_it_may_import():
    assert {wing(name) for name in MODULES} <= set(WINGS) | {"assets"}
    for name in WINGS:
        doc = importlib.import_module(f"dpo_lightning.{name}").__doc__
        assert "import" in doc, f"dpo_lightning/{name}/__init__.py does not say what it may import"


def test_imports_run_one_way_down_the_wings_with_no_circle():
    graph = {name: [imported for imported, at_top in package_imports(module_path(name)) if at_top] for name in MODULES}
    for name, imported in graph.items():
        for target in imported:
            assert RANK[wing(target)] <= RANK[wing(name)], f"{name} imports {target}, a wing above its own"
    order, state = [], {}

    def visit(name: str, path: list[str]) -> None:  # depth-first: a module met again on its own path is a circle
        assert state.get(name) != "open", f"import circle: {' -> '.join(path + [name])}"
        if state.get(name) == "done":
            return
        state[name] = "open"
        for target in graph[name]:
            if target != name and not name.startswith(target + "."):  # a package's own __init__ is not a circle
                visit(target, path + [name])
        state[name] = "done"
        order.append(name)

    for name in MODULES:
        visit(name, [])


def test_no_import_hides_inside_a_function_but_the_commands_lazy_ones():
    # `dpo-lightning --help` must not pay for torch: cli/main.py imports each subcommand's code when it runs.
    # Anywhere else an import inside a function would only hide a circle.
    for name in MODULES:
        inner = [imported for imported, at_top in package_imports(module_path(name)) if not at_top]
        assert not inner or name == "dpo_lightning.cli.main", f"{name} imports {inner} inside a function"


def test_modules_stay_under_400_lines():
    long = {name: n for name in MODULES if (n := len(module_path(name).read_text().splitlines())) >= 400}
    assert not long, long


@pytest.mark.parametrize("old", sorted(dpo_lightning.MOVED))
def test_a_01_module_path_imports_as_the_module_that_holds_its_names_now(old):
    assert importlib.import_module(old) is importlib.import_module(dpo_lightning.MOVED[old])


def test_a_config_written_for_01_still_parses_and_its_reward_path_loads(tmp_path, capsys):
    from dpo_lightning.online.rewards import load_reward, sort_exact

    config = {"model": {"model_name_or_path": "dpo_lightning/assets/sort-tiny"},
              "data": {"dataset": "dpo_lightning/assets/sort-tiny/train.jsonl"},
              "trainer": {"callbacks": [
                  {"class_path": "dpo_lightning.callbacks.PreemptionCheckpoint"},
                  {"class_path": "dpo_lightning.ValidationSummary"},
                  {"class_path": "dpo_lightning.online.GreedyReward",
                   "init_args": {"reward_funcs": "dpo_lightning.rewards.sort_exact"}}],
                  "strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy",
                               "init_args": {"auto_wrap_policy": {
                                   "class_path": "dpo_lightning.distributed.DecoderLayers"}}}}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(tmp_path / "old.yaml"), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in printed["callbacks"]] == [
        "PreemptionCheckpoint", "ValidationSummary", "GreedyReward"]
    assert printed["strategy"]["init_args"]["auto_wrap_policy"]["class_path"].endswith("DecoderLayers")
    assert load_reward("dpo_lightning.rewards.sort_exact") is sort_exact


def test_python_dash_m_runs_the_commands_under_their_01_and_new_names(tmp_path):
    # `python -m dpo_lightning.quickstart` (0.1's README) and `python -m dpo_lightning.cli` where the console script
    # is not on the PATH: each runs, from any directory.
    for module, expected in (("dpo_lightning.quickstart", "Regenerate the sort-tiny quickstart assets"),
                             ("dpo_lightning.tools.quickstart", "Regenerate the sort-tiny quickstart assets"),
                             ("dpo_lightning.cli", "usage: dpo-lightning SUBCOMMAND")):
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
        assert done.returncode == 0 and expected in done.stdout, (module, done.stderr[-500:])


def test_the_callbacks_01_listed_import_from_the_callbacks_package():
    callbacks = importlib.import_module("dpo_lightning.callbacks")
    for name in ("CheckpointValidation", "ExportPretrained", "GenerateSamples", "PreemptionCheckpoint",
                 "ValidationSummary"):
        assert issubclass(getattr(callbacks, name), importlib.import_module("lightning").Callback), name
