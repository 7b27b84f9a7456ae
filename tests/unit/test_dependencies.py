"""pyproject.toml declares what the code imports, where it imports it: every third-party import of rau_ray/, jobs/,
benchmarks/ and tests/ (read off the source with ``ast``) belongs to a distribution declared in the core or in an
extra of that part's role (serve: [serve], training and tuning: [train], ...), or, imported inside a function only,
in an optional feature's extra (any extra that is not a role, e.g. [tracking]), and a serving install
(``rau-ray[cpu,serve]``) does not pull DeepSpeed or trl: its dependency closure, walked over the installed
distributions' own metadata (what pip resolves, without a network round), holds neither.
Run: ``.venv/bin/pytest tests/unit/test_dependencies.py``."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from functools import cache
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = "rau-ray"
# which extras each part of the repository may import from, besides the core (first matching prefix wins);
# [cpu] stands for the faiss build ([gpu] is its alternative: test_faiss_builds_are_alternatives)
ROLES = [
    ("rau_ray/serve/", ("cpu", "serve")),
    ("rau_ray/train/", ("cpu", "train", "tracking")),  # tracking: report_to's clients, imported only when asked
    ("rau_ray/tune/", ("cpu", "train", "tracking")),  # sweeps run the training jobs
    ("rau_ray/cli.py", ("cpu", "serve", "train")),  # every subcommand (each imports its stack lazily)
    ("rau_ray/demo.py", ("cpu", "serve", "train")),
    ("rau_ray/", ("cpu",)),  # data, models, scoring, eval and the base: the core
    ("jobs/", ("cpu", "train")),
    ("benchmarks/", ("dev",)),
    ("tests/", ("dev",)),
]
TRAINING_ONLY = ("deepspeed", "trl")  # what a serving image must not install
ROLE_EXTRAS = {"cpu", "gpu", "serve", "train", "dev"}  # any other extra is an optional feature (lazy imports only)
# scripts that run in an environment of their own, not the project's, with why
OWN_ENVIRONMENT = {
    "tests/integration/monailabel_client_script.py": ".venv-monailabel (make monailabel-client): MONAI Label's client",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared(extras: tuple[str, ...]) -> list[Requirement]:
    """The project's requirements for ``rau-ray[extras]``: the core + those extras, self-references expanded."""
    project, seen, out = pyproject(), set(), []
    todo = list(extras)
    out += [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            if norm(req.name) == PROJECT:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def declared_names(extras: tuple[str, ...]) -> set[str]:
    return {norm(r.name) for r in declared(extras)}


def imported_modules(path: Path) -> dict[str, bool]:
    """Top-level names of the absolute imports in a file -> whether every import of it is inside a function."""
    lazy: dict[str, bool] = {}

    def visit(node, in_function: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            lazy[name] = lazy.get(name, True) and in_function
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return lazy


def role(rel: str) -> tuple[str, ...]:
    return next(extras for prefix, extras in ROLES if rel.startswith(prefix))


def local(name: str, path: Path) -> bool:
    """A module of this repository (the package, a test helper next to the tests, conftest)."""
    top = path.relative_to(REPO).parts[0]
    return name == "rau_ray" or (REPO / top / f"{name}.py").exists() or (REPO / top / name).is_dir()


def closure(extras: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(distributions, those not installed here) that ``pip install rau-ray[extras]`` brings in, walked over the
    installed distributions' requirement metadata with each requirement's markers (extras included)."""
    todo = [(req, set(req.extras)) for req in declared(extras)]
    seen: dict[str, set[str]] = {}
    missing = set()
    while todo:
        req, wanted = todo.pop()
        name = norm(req.name)
        if name in seen and wanted <= seen[name]:
            continue
        seen.setdefault(name, set()).update(wanted)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            missing.add(name)
            continue
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *wanted}):
                todo.append((sub, set(sub.extras)))
    return set(seen), missing


def test_every_import_is_declared_for_its_role():
    dists_of = {m: {norm(d) for d in ds} for m, ds in md.packages_distributions().items()}
    features = tuple(sorted(set(pyproject()["optional-dependencies"]) - ROLE_EXTRAS))
    optional = declared_names(features) - declared_names(())
    files = sorted(p for top in ("rau_ray", "jobs", "benchmarks", "tests") for p in (REPO / top).rglob("*.py"))
    assert len(files) > 100
    undeclared = []
    checked = set()
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if rel in OWN_ENVIRONMENT:
            continue
        allowed = declared_names(role(rel))
        for name, lazy in sorted(imported_modules(path).items()):
            if name in sys.stdlib_module_names or local(name, path):
                continue
            checked.add(name)
            dists = dists_of.get(name)
            if not dists:
                undeclared.append(f"{rel}: imports {name}, which no installed distribution provides")
            elif not dists & allowed and not (lazy and dists & optional):
                undeclared.append(f"{rel}: imports {name} ({', '.join(sorted(dists))}), not declared in the core "
                                  f"or [{', '.join(role(rel))}]" + (" (an optional extra's package must be imported "
                                                                    "inside the function that needs it)"
                                                                    if dists & optional else ""))
    assert {"torch", "faiss", "fastapi", "deepspeed", "trl", "datasets", "psutil", "jsonschema"} <= checked
    assert not undeclared, "\n".join(undeclared)


def test_lazy_imports_are_told_apart(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import a\ntry:\n    import b\nexcept ImportError:\n    pass\n"
                      "def f():\n    import c\n    from d.e import g\nclass K:\n    import h\n"
                      "    def m(self):\n        import a\n")
    assert imported_modules(source) == {"a": False, "b": False, "c": True, "d": True, "h": False}


def test_a_layer_that_imports_a_training_package_is_caught():
    """The check above can fail: a serve module importing trl, or the core importing fastapi, is out of role."""
    assert "trl" not in declared_names(role("rau_ray/serve/app.py"))
    assert "fastapi" not in declared_names(role("rau_ray/models/policy.py"))
    assert {"trl", "deepspeed"} <= declared_names(role("rau_ray/train/grpo.py"))


def test_serving_install_does_not_pull_deepspeed_or_trl():
    serve, missing = closure(("cpu", "serve"))
    assert not missing, f"not installed here, so their requirements were not walked: {sorted(missing)}"
    assert {"ray", "torch", "fastapi", "uvicorn", "faiss-cpu", "sam2", "peft"} <= serve
    assert not set(TRAINING_ONLY) & serve, [d for d in TRAINING_ONLY if d in serve]
    train, _ = closure(("cpu", "train"))
    assert set(TRAINING_ONLY) <= train  # the walk does see them where they are declared
    assert {"fastapi", "uvicorn"}.isdisjoint(declared_names(("train",)))


def test_faiss_builds_are_alternatives():
    """faiss-cpu and faiss-gpu-cu12 both install the module ``faiss``: the core forces neither, [cpu] and [gpu]
    each name one, and no extra combines them (dev takes cpu)."""
    core = declared_names(())
    assert not {n for n in core if n.startswith("faiss")}
    assert declared_names(("cpu",)) - core == {"faiss-cpu"}
    assert declared_names(("gpu",)) - core == {"faiss-gpu-cu12"}
    for extra in pyproject()["optional-dependencies"]:
        assert len({n for n in declared_names((extra,)) if n.startswith("faiss")}) <= 1, extra


def test_dev_installs_every_role():
    """``make install`` installs [dev]: everything the tests need, the training and serving stacks included."""
    dev = declared_names(("dev",))
    assert declared_names(("cpu", "serve", "train")) <= dev


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_torch_is_a_range_here_and_pinned_in_constraints(name):
    req = next(r for r in declared(()) if norm(r.name) == name)
    assert req.specifier and not any(s.operator == "==" for s in req.specifier), str(req)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    assert req.specifier.contains(pins[name]), (str(req), pins[name])
