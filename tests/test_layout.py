"""The code's shape: six stage modules side by side, none importing another, each stage's DVC
deps naming exactly the shared modules it imports, directly or through another, that can change its
outputs, and no module that would not import on macOS or Windows."""

import ast
from pathlib import Path

import yaml

import pipeline.sweep
from pipeline.losses import LOSS_PARAMS
from tests.projects import ROOT

STAGES = {"check", "download", "split", "train", "evaluate", "visualize"}
# Shared modules that cannot change a stage's outputs: reporting to MLflow, an epoch's report and
# progress on screen, the params file's parsing, paths, atomic writes, the error type, the stage's
# entry point and its watch on DVC. Editing one reruns nothing.
NOT_SHAPING = {
    "tracking",
    "epoch_report",
    "progress",
    "params",
    "paths",
    "atomic",
    "errors",
    "stage",
    "dvc_process",
}


def pipeline_imports(path: Path) -> set[str]:
    """The pipeline modules `path` imports by name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pipeline.")}
    return names


def shaping_imports(module: str) -> set[str]:
    """The shared modules that can change `module`'s outputs: those it imports, those they import,
    and so on (NOT_SHAPING modules are neither counted nor followed)."""
    found, todo = set(), [module]
    while todo:
        for name in pipeline_imports(ROOT / "pipeline" / f"{todo.pop()}.py") - NOT_SHAPING - found:
            found.add(name)
            todo.append(name)
    return found - {module}


def test_no_module_imports_a_stage():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        stages_imported = pipeline_imports(path) & STAGES
        assert not stages_imported, f"{path.name} imports the stage module(s) {sorted(stages_imported)}"


def test_each_stage_depends_on_exactly_the_shared_code_that_shapes_its_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m pipeline.{name}"
        code_deps = {Path(dep).stem for dep in stage["deps"] if dep.startswith("pipeline/")}
        shaping = shaping_imports(name)
        assert code_deps == {name} | shaping, f"dvc.yaml stage {name}: deps {sorted(code_deps)}"


def top_level_names(path: Path) -> set[str]:
    """The classes, functions and constants `path` defines at its top level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def test_every_param_the_loss_reads_reruns_the_stages_that_compute_the_loss():
    """Train and evaluate both compute the loss: a param `losses.LOSS_PARAMS` names must rerun both
    (train has the whole `train` section; evaluate lists its keys)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate"):
        listed = set(stages[name]["params"])
        missing = [key for key in LOSS_PARAMS if "train" not in listed and f"train.{key}" not in listed]
        assert not missing, f"dvc.yaml stage {name} does not rerun for train.{', train.'.join(missing)}"


def test_the_benchmarks_import_no_stage_module():
    """What a benchmark times is a stage's work, from the shared module the stage calls too: a
    stage module is a leaf that DVC runs, and changes for reasons of its own."""
    for path in sorted((ROOT / "bench").rglob("*.py")):
        stages_imported = pipeline_imports(path) & STAGES
        assert not stages_imported, f"{path.relative_to(ROOT)} imports the stage module(s) {sorted(stages_imported)}"


def test_benchmarks_and_tests_take_the_training_step_from_its_own_module():
    """`pipeline.train` imports the step too, so `from pipeline.train import TrainStep` would work;
    it would also tie the benchmarks to a stage module that changes for other reasons."""
    step_names = top_level_names(ROOT / "pipeline" / "step.py")
    for path in sorted([*(ROOT / "bench").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in STAGES:
                wrong = {alias.name for alias in node.names} & step_names
                assert not wrong, (
                    f"{path.relative_to(ROOT)} imports {sorted(wrong)} from {node.module}: import it from pipeline.step"
                )


# Standard modules that exist on Unix alone (fcntl, resource, ...) or on Linux alone.
NOT_ON_WINDOWS = {"fcntl", "termios", "tty", "pty", "resource", "pwd", "grp", "syslog", "posix", "crypt"}


def module_level_imports(path: Path) -> set[str]:
    """The top-level names of the modules `path` imports when it is imported (not inside a function)."""
    names, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            todo += ast.iter_child_nodes(node)
    return names


def test_no_module_imports_a_unix_only_module_when_it_is_imported():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        unix_only = module_level_imports(path) & NOT_ON_WINDOWS
        assert not unix_only, (
            f"{path.relative_to(ROOT)} imports {sorted(unix_only)}: import it where it is used, "
            "behind a check of the OS"
        )


def test_the_sweep_package_names_every_file_and_its_job():
    """pipeline/sweep/__init__.py is the map a newcomer reads first: every file of the package is
    on it, and nothing that is not there."""
    listed = {line.split()[0] for line in pipeline.sweep.__doc__.splitlines() if line.startswith("    ")}
    assert listed == {path.name for path in (ROOT / "pipeline" / "sweep").glob("*.py")} - {"__init__.py"}


def test_the_sweep_package_has_no_import_circle():
    """Each module of pipeline/sweep imports only modules below it (shared.py holds the types they
    all pass), also under TYPE_CHECKING: a newcomer can read the package from the bottom up."""
    package = ROOT / "pipeline" / "sweep"
    imports = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.sweep"):
                module = node.module.removeprefix("pipeline.sweep").lstrip(".")
                names |= {module} if module else {alias.name for alias in node.names}
        imports[path.stem] = names & {p.stem for p in package.glob("*.py")}
    ordered: list[str] = []
    while len(ordered) < len(imports):
        ready = sorted(m for m, deps in imports.items() if m not in ordered and deps <= set(ordered))
        assert ready, f"an import circle among {sorted(set(imports) - set(ordered))}"
        ordered += ready
