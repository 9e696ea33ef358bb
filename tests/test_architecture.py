"""The layout a newcomer relies on (docs/architecture.md): the library never imports a command, no command
imports another, the training core runs with torch, numpy, pyyaml and scikit-learn alone, and one
registry holds each kind of name."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tune_mtard"
COMMANDS = ("search", "train", "teachers", "export", "analyze", "evaluate", "compare", "bench")
# `python -m tune_mtard.<command>` entry points: two-line shims over tune_mtard/cli/<command>.py.
SHIMS = {PACKAGE / f"{c}.py" for c in COMMANDS} | {PACKAGE / c / "__main__.py" for c in COMMANDS} | {
    PACKAGE / "__main__.py"}
# The orchestration stack and the optional extras: the training core must import and run without them.
HEAVY = ("ray", "optuna", "mlflow", "pyautoattack", "matplotlib", "tqdm", "pandas", "pyarrow")
MAX_MODULE_LINES = 450


def modules() -> dict[Path, str]:
    found = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    found.update({path: path.read_text() for path in (ROOT / "trainables").rglob("*.py")})
    return found


def imported(source: str) -> set[str]:
    """Every module an import statement names, at any depth (imports inside functions count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_command(path: Path) -> bool:
    return path.parent == PACKAGE / "cli" or path in SHIMS


def is_benchmark(path: Path) -> bool:
    return path.parent == PACKAGE / "benchmarks"


def test_the_library_never_imports_a_command_or_a_benchmark():
    offenders = []
    for path, source in modules().items():
        if is_command(path) or is_benchmark(path):
            continue
        bad = {name for name in imported(source) if name.startswith(("tune_mtard.cli", "tune_mtard.benchmarks"))}
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert offenders == []


# The layers, lowest first (docs/architecture.md, "Layers"): a module imports only from its own layer and those below.
LAYERS = ("core", "search", "workflows", "commands")
# The one way down-up: the config validates search.sampler.type and search.scheduler.type against the search's
# registries, whose packages import nothing of the search but the registry (docs/architecture.md, "Layers").
UPWARD_ALLOWED = {("tune_mtard/config/search.py", "tune_mtard.search.samplers"),
                  ("tune_mtard/config/search.py", "tune_mtard.search.schedulers")}


def layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if is_command(path) or is_benchmark(path):
        return "commands"
    if parts[:2] == ("tune_mtard", "workflows"):
        return "workflows"
    if parts[:2] == ("tune_mtard", "search") or parts[0] == "trainables":
        return "search"
    return "core"


def layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "tune_mtard" or len(parts) < 2:
        return None
    if parts[1] in ("cli", "benchmarks"):
        return "commands"
    return {"workflows": "workflows", "search": "search", "trainables": "search"}.get(parts[1], "core")


def test_each_layer_imports_only_from_itself_and_the_layers_below():
    """Core (engine, methods, balance, attacks, data, models, config, records), then search, then workflows, then
    the commands: the core never imports the search or a workflow, the search never imports a workflow."""
    offenders = []
    for path, source in modules().items():
        if path in SHIMS:
            continue
        own = LAYERS.index(layer_of(path))
        rel = str(path.relative_to(ROOT))
        above = sorted(name for name in imported(source)
                       if (found := layer_of_module(name)) is not None and LAYERS.index(found) > own
                       and not any(name == allowed or name.startswith(allowed + ".")
                                   for where, allowed in UPWARD_ALLOWED if where == rel))
        if above:
            offenders.append(f"{path.relative_to(ROOT)} ({layer_of(path)}): {above}")
    assert not offenders, "imports from a higher layer:\n" + "\n".join(offenders)
    assert layer_of(PACKAGE / "workflows" / "train.py") == "workflows"
    assert layer_of(ROOT / "trainables" / "bmtard.py") == "search" and layer_of(PACKAGE / "engine.py") == "core"


def test_no_command_imports_another():
    for path, source in modules().items():
        if path.parent != PACKAGE / "cli" or path.name in ("__init__.py", "common.py"):
            continue
        others = {name for name in imported(source) if name.startswith("tune_mtard.cli.")
                  and name not in ("tune_mtard.cli.common",) and not name.startswith("tune_mtard.cli.common.")}
        assert others == set(), f"{path.name} imports {others}"


def test_every_command_has_its_module_entry_point_and_a_cli_module():
    for command in COMMANDS:
        assert (PACKAGE / "cli" / f"{command}.py").is_file()
        assert (PACKAGE / f"{command}.py").is_file() or (PACKAGE / command / "__main__.py").is_file()


def test_no_module_is_larger_than_one_cohesive_thing():
    sizes = {str(path.relative_to(ROOT)): source.count("\n") for path, source in modules().items()}
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_private_ray_and_optuna_internals_are_used_in_the_compatibility_module_only():
    """Attribute access to `_ot_*`, `_completed_trials`, `_storage`, `_trial_id` or Ray's `_internal`."""
    private = ("._ot_", "._completed_trials", "._storage", "._trial_id", "_internal", ".get_storage()")
    compat = PACKAGE / "search" / "compat.py"
    offenders = [f"{path.relative_to(ROOT)}: {marker}" for path, source in modules().items() if path != compat
                 for marker in private if marker in source]
    assert offenders == []


# Blocked packages look installed to a spec lookup (torch probes some) but fail when imported.
BLOCKER = textwrap.dedent("""
    import importlib.abc, importlib.machinery, runpy, sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"{{spec.name}} is blocked: the training core must not need it")

        def exec_module(self, module):
            pass

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, Blocker())
    {body}
""")


def run_blocked(body: str, *argv: str, blocked: tuple[str, ...] = HEAVY) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=blocked, body=textwrap.dedent(body).strip())
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_the_training_core_imports_and_trains_with_the_orchestration_stack_blocked(tmp_path):
    result = run_blocked(f"""
        import torch
        from tune_mtard import attacks, balance, config, data, engine, evaluation, methods, models
        from tune_mtard.config import load_config
        from tune_mtard.data import load_data
        from tune_mtard.engine import Trainer
        from tune_mtard.evaluation import final_test_metrics
        cfg = load_config("digits.yaml", ["device=cpu", "train.epochs=1", "method=pgd-at", "eval.n_examples=16",
                                          "eval.final_n_examples=16", "eval.final_attacks=[clean, fgsm, pgd20, cw]"],
                          check_files=False).run_config()
        data = load_data("digits")
        trainer = Trainer(cfg, data)
        trainer.fit()
        print(sorted(final_test_metrics(cfg, trainer.model, data, torch.device("cpu"))))
        for name in {HEAVY!r}:
            assert name not in sys.modules, name
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_cw_acc" in result.stdout


def test_bench_step_runs_with_the_orchestration_stack_blocked(tmp_path):
    out = tmp_path / "step.json"
    result = run_blocked("""
        sys.argv = ["tune_mtard.bench", *sys.argv[1:]]
        runpy.run_module("tune_mtard.bench", run_name="__main__")
    """, "step", "--config", "digits.yaml", "--repeats", "1", "--window-s", "0.02", "--warmup", "1",
        "--set", "device=cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and "bmtard_over_reference" in out.read_text()


def test_bench_gpu_runs_with_the_orchestration_stack_and_pytest_blocked(tmp_path):
    """What a GPU owner runs needs PyTorch and the light core only. Shrunk to digits CNNs on a CPU, with
    torch.compile's aot_eager backend (Inductor would compile C++ for minutes)."""
    out = tmp_path / "gpu.json"
    result = run_blocked(f"""
        import functools, json
        from pathlib import Path
        import torch
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
        from tune_mtard.benchmarks.gpu import bench_gpu
        from tune_mtard.benchmarks.gpu_checks import CheckSetup
        from tune_mtard.config import load_config
        cfg = load_config("digits.yaml", ["data.batch_size=8", "eval.n_examples=8", "attack.steps=1"],
                          check_files=False)
        setup = CheckSetup(torch.device("cpu"), student="digits_cnn", clean_teacher="digits_cnn_large",
                           robust_teacher="digits_cnn", image_size=8, train_examples=20, val_examples=8, batch_size=8,
                           attack_steps=1)
        bench_gpu(cfg, setup, Path({str(out)!r}), train_examples=24, val_examples=8, image_size=8, epochs=1,
                  repeats=1, window_s=0.01)
        for name in {(*HEAVY, "pytest")!r}:
            assert name not in sys.modules, name
    """, blocked=(*HEAVY, "pytest", "_pytest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["all_checks_passed"] is True


def test_autoattack_says_what_is_missing_when_pyautoattack_is_not_installed():
    result = run_blocked("""
        from tune_mtard.attacks import build_attack
        from tune_mtard.models import create_model
        try:
            build_attack("aa", create_model("digits_cnn", 10, 1), epsilon=0.1, num_classes=10)
        except ImportError as exc:
            print("refused:", exc)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout and "pyautoattack" in result.stdout


@pytest.mark.parametrize("registry, names", [
    ("tune_mtard.methods:METHODS", {"natural", "pgd-at", "trades", "ard", "rslad", "mtard", "b-mtard"}),
    ("tune_mtard.data:DATASETS", {"digits", "synthetic", "cifar10", "cifar100", "svhn", "tiny-imagenet",
                                  "imagefolder"}),
    ("tune_mtard.attacks:ATTACKS", {"clean", "fgsm", "pgd20", "cw", "aa", "square"}),
    ("tune_mtard.search.samplers:SAMPLERS", {"tpe", "random", "nsga2", "gp", "cmaes"}),
    ("tune_mtard.search.schedulers:SCHEDULERS", {"asha", "fifo"}),
    ("tune_mtard.models:MODELS", {"resnet18", "preact_resnet18", "preact_resnet18_wong", "preact_resnet18_kuangliu",
                                  "mobilenet_v2", "wrn34_10", "wrn28_10", "resnet56",
                                  "digits_cnn", "digits_cnn_large"}),
])
def test_each_kind_of_name_lives_in_one_registry(registry, names):
    import importlib

    module, attribute = registry.split(":")
    assert set(getattr(importlib.import_module(module), attribute)) == names


def test_a_method_is_one_decorated_class(tiny_config, tiny_digits, monkeypatch):
    """Registered, it is valid in a config, trains in the loop and is a variant `compare` accepts."""
    import torch.nn.functional as F

    from tune_mtard.engine import Trainer
    from tune_mtard.methods import METHODS, Objective, register_method

    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))

    @register_method("clean-ce-twice")
    class CleanTwice(Objective):
        def step(self, x, y):
            loss_nat = 2 * F.cross_entropy(self.student(x).float(), y)
            return loss_nat, self.trace(x.device, loss_nat=loss_nat, w_adv=0.0, w_nat=1.0)

    cfg = tiny_config.with_values({"method": "clean-ce-twice", "train.epochs": 1})
    history = Trainer(cfg, tiny_digits).fit()
    # It learns: one epoch reached 0.80 to 0.91 on the 64 validation digits over seeds 0-4 (0.86 at seed 0), chance
    # is 0.1; a loss the loop ignored, or a step that did not reach the weights, stays near chance.
    assert history[-1]["val_clean_acc"] > 0.6

    from tune_mtard.workflows.compare import parse_methods

    assert parse_methods("clean-ce-twice,b-mtard") == ["clean-ce-twice", "b-mtard"]


def test_an_attack_is_one_decorated_factory_with_its_table_title(tiny_config, monkeypatch):
    """Registered, it is valid in ``eval.final_attacks`` and the comparison table titles its columns."""
    import tune_mtard.attacks as attacks
    from tune_mtard.workflows.compare import column_titles

    monkeypatch.setattr(attacks.ATTACKS, "_entries", dict(attacks.ATTACKS._entries))
    monkeypatch.setattr(attacks, "_TITLES", dict(attacks._TITLES))

    @attacks.register_attack("pgd50", title="PGD-50")
    def _pgd50(model, *, epsilon, pgd_step_size, **_):
        return attacks.PGD(model, epsilon, pgd_step_size, 50, random_start=True)

    cfg = tiny_config.with_values({"eval.final_attacks": ["clean", "pgd50"]})
    assert cfg.eval.final_attacks == ["clean", "pgd50"]
    assert column_titles(["clean", "pgd50"]) == ["Clean", "PGD-50", "W-Robust (PGD-50)"]


def test_a_scheduler_added_in_a_new_file_as_docs_search_md_shows_is_accepted_with_no_other_file_touched():
    """docs/search.md, "Schedulers": the recipe's file, alone, makes ``search.scheduler.type: median`` valid,
    built by the search, and lowered by ``--max-epochs``; before it exists the name is a ConfigError."""
    recipe = (ROOT / "docs" / "search.md").read_text().split("**Adding a scheduler**")[1]
    code = recipe.split("```python\n")[1].split("```")[0]
    check = textwrap.dedent("""
        from tune_mtard.config import load_config
        from tune_mtard.errors import ConfigError
        from tune_mtard.search.schedulers import build_scheduler, fit_to_epochs
        try:
            cfg = load_config("digits.yaml", ["search.scheduler.type=median", "search.scheduler.grace_period=4"])
        except ConfigError as exc:
            print("ConfigError", exc.key)
        else:
            print(type(build_scheduler(cfg.search.scheduler, max_t=cfg.train.epochs)).__name__)
            print(fit_to_epochs(cfg.search.scheduler, 2, "--max-epochs")[1])
    """)
    before = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert before.stdout.split() == ["ConfigError", "search.scheduler.type"], before.stderr
    new_file = PACKAGE / "search" / "schedulers" / "median.py"
    assert not new_file.exists()
    try:
        new_file.write_text(code)
        after = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    finally:
        new_file.unlink()
    assert after.stdout.splitlines() == ["MedianStoppingRule",
                                         "--max-epochs 2: median stopping's grace_period 4 lowered to 2"], after.stderr


def test_the_code_passes_ruff_with_the_projects_configuration():
    """pyflakes, pycodestyle, isort and bugbear as pyproject.toml's [tool.ruff] selects them."""
    pytest.importorskip("ruff")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the import graph ------------------------------------------------------------------------------------


def module_names(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for each package folder (``{"tune_mtard": PACKAGE, ...}``)."""
    found = {}
    for name, folder in package_dirs.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            found[".".join([name, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return found


def _import_statements(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it sits in a function; ``if TYPE_CHECKING:`` bodies skipped."""
    found, stack = [], [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend((child, in_function) for child in node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))
    return found


def import_graph(names: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the project's modules it imports (relative imports resolved, ``from X import Y`` to X.Y where
    Y is a module, and the packages above a target that an import runs); and every import inside a function."""
    graph, in_functions = {}, []
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node, in_function in _import_statements(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            else:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                named = [f"{module}.{a.name}" if f"{module}.{a.name}" in names else module for a in node.names]
            own = {n for n in named if n in names}
            if own and in_function:
                in_functions.append(f"{name}:{node.lineno}")
            for target in own:
                parts = target.split(".")
                targets.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                               if p in names and not (name == p or name.startswith(p + ".")))
        graph[name] = targets
    return graph, in_functions


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules that import each other."""
    cycles, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        paths, queue = {start: [start]}, [start]
        while queue:
            module = queue.pop(0)
            for target in sorted(graph[module]):
                if target == start:
                    cycles.append(paths[module] + [start])
                    done.update(paths[module])
                    queue = []
                    break
                if target not in paths:
                    paths[target] = paths[module] + [target]
                    queue.append(target)
    return cycles


def test_the_packages_import_graph_has_no_cycle_counting_imports_inside_functions():
    graph, _ = import_graph(module_names({"tune_mtard": PACKAGE, "tune_mtard.trainables": ROOT / "trainables"}))
    assert len(graph) > 50
    cycles = import_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_sees_imports_in_functions_relative_and_submodule_ones_but_not_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {"__init__.py": "", "a.py": "def f():\n    from pkg.sub import b\n",
               "sub/__init__.py": "", "sub/b.py": "from .. import c\n",
               "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\nimport pkg.a\n",
               "d.py": "from pkg import c\n"}
    for file, source in sources.items():
        (pkg / file).write_text(source)
    graph, in_functions = import_graph(module_names({"pkg": pkg}))
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.c"} and in_functions == ["pkg.a:2"]
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_an_import_inside_a_function_says_why_it_is_there():
    """Only a heavy optional dependency (or a command loading the library after its flags) justifies one."""
    names = module_names({"tune_mtard": PACKAGE, "tune_mtard.trainables": ROOT / "trainables"})
    _, in_functions = import_graph(names)
    unexplained = []
    for where in in_functions:
        module, _, line = where.rpartition(":")
        lines = names[module].read_text().splitlines()
        above = int(line) - 2
        while above >= 0 and lines[above].lstrip().startswith(("from ", "import ")):
            above -= 1
        if not lines[above].lstrip().startswith("#"):
            unexplained.append(where)
    assert unexplained == []


def test_a_method_declares_its_own_config_keys(tmp_path):
    """A method's ``settings`` become ``baselines.<key>`` with its default and rule, and its space may search it;
    no central config section is touched. Run in a fresh interpreter: the schema makes its ``baselines``
    section once, from the methods registered when the config is imported (as every module of methods/ is)."""
    script = tmp_path / "own_setting.py"
    script.write_text(textwrap.dedent("""
        import torch.nn.functional as F

        from tune_mtard.methods.base import Objective
        from tune_mtard.methods.registry import Setting, register_method

        @register_method("scaled-ce", settings={"scaled_ce_factor": Setting(2.0, lambda v: v > 0, "must be > 0")},
                         space={"baselines.scaled_ce_factor": {"type": "float", "low": 1.0, "high": 4.0}})
        class ScaledCE(Objective):
            def step(self, x, y):
                loss_nat = self.cfg.baselines.scaled_ce_factor * F.cross_entropy(self.student(x).float(), y)
                return loss_nat, self.trace(x.device, loss_nat=loss_nat, w_adv=0.0, w_nat=1.0)

        from tune_mtard.config import Config, from_dict
        from tune_mtard.errors import ConfigError
        from tune_mtard.methods import default_space

        cfg = Config()
        print("default", cfg.baselines.scaled_ce_factor, cfg.baselines.trades_beta)
        raw = cfg.to_dict()
        raw["method"] = "scaled-ce"
        raw["baselines"]["scaled_ce_factor"] = 3.5
        print("set", from_dict(raw, check_files=False).baselines.scaled_ce_factor)
        raw["baselines"]["scaled_ce_factor"] = -1.0
        try:
            from_dict(raw, check_files=False)
        except ConfigError as exc:
            print("refused", exc)
        print("space", sorted(default_space("scaled-ce")))
        try:
            register_method("late", settings={"late_key": Setting(1.0, bool, "must be true")})(ScaledCE)
        except ValueError as exc:
            print("late", exc)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "default 2.0 6.0" in lines and "set 3.5" in lines
    assert "refused baselines.scaled_ce_factor: must be > 0" in lines
    assert "space ['baselines.scaled_ce_factor', 'train.lr', 'train.weight_decay']" in lines
    assert any(line.startswith("late method 'late': registered after the config schema was built") for line in lines)


def test_two_methods_cannot_own_one_key_nor_search_anothers():
    from tune_mtard.methods import Objective, Setting, register_method

    with pytest.raises(ValueError, match="baselines.trades_beta is already method 'trades'"):
        register_method("trades-again", settings={"trades_beta": Setting(1.0, bool, "x")})(Objective)
    with pytest.raises(ValueError, match="searches baselines.ard_alpha, which is not one of its settings"):
        borrowed = {"baselines.ard_alpha": {"type": "float", "low": 0.1, "high": 1.0}}
        register_method("borrower", space=borrowed)(Objective)


def test_every_package_folder_is_in_the_installed_package_list():
    """pyproject.toml names its packages: a new folder left off the list would be missing from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    found |= {"tune_mtard.trainables", "tune_mtard.search_spaces"}
    assert listed == found, f"missing: {sorted(found - listed)}; stale: {sorted(listed - found)}"
