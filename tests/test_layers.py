"""The shape of the code, checked mechanically: imports point one way (model and structured <-
scheduler <- families <- server, and training beside the server on top of the engine), nothing
imports the
source folders by their bare names, no import circle inside a layer (function-local imports
included), and the installed distribution claims the single import name `marble`."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("model", "structured", "scheduler", "families", "server", "training")
# What each layer may import from Marble, besides itself.
ALLOWED = {
    "model": set(),
    "structured": set(),
    "scheduler": {"model", "structured"},
    "families": {"model", "scheduler", "structured"},
    "server": {"model", "scheduler", "families", "structured"},
    "training": {"model", "scheduler", "families", "structured"},
}


# Plain-Python request bookkeeping: no torch.
BOOKKEEPING = (
    "marble.structured.constraint",
    "marble.structured.compiler",
    "marble.structured.row",
    "marble.structured.tool_formats",
    "marble.structured.tools",
    "marble.structured.gemma_grammar",
    "marble.scheduler.request",
    "marble.scheduler.sampling_params",
    "marble.scheduler.scheduler",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["marble", *parts])


def modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports, at any depth of the file (TYPE_CHECKING blocks and
    function bodies included); `from package import module` counts as the module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "marble" and len(parts) > 1 else None


def test_every_source_module_is_seen():
    names = set(modules())
    for expected in (
        "marble.families.masked.model",
        "marble.scheduler.engine",
        "marble.server.app",
    ):
        assert expected in names
    assert "marble.training.train" in names


def test_imports_point_one_way():
    wrong = []
    for module, targets in graph().items():
        layer = layer_of(module)
        for target in targets:
            head = target.split(".")[0]
            if head in LAYERS:
                wrong.append(f"{module} imports {target} by its bare name")
            other = layer_of(target)
            if other is not None and other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def find_circles(edges: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk meets, as "a -> b -> a"."""
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_asyncio_below_the_server_and_no_torch_in_the_bookkeeping():
    web = {"asyncio", "fastapi", "starlette", "uvicorn", "sse_starlette"}
    wrong = []
    for module, targets in graph().items():
        heads = {t.split(".")[0] for t in targets}
        if layer_of(module) in ("model", "scheduler") and heads & web:
            wrong.append(f"{module} imports {sorted(heads & web)}")
        if module in BOOKKEEPING and "torch" in heads:
            wrong.append(f"{module} imports torch")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles_inside_a_layer():
    edges = {
        module: {t for t in targets if layer_of(t) == layer_of(module) and t != module}
        for module, targets in graph().items()
    }
    circles = find_circles(edges)
    assert not circles, "\n".join(circles)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The walker finds function-local and aliased imports (else the tests above pass empty)."""
    source = tmp_path / "probe.py"
    source.write_text(
        "import os\n"
        "def f():\n"
        "    from marble.server import app\n"
        "    import marble.scheduler.engine as e\n"
    )
    found = imports_of(source, {"marble.server.app"})
    assert {"os", "marble.server.app", "marble.scheduler.engine"} <= found
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built from a copy (a build writes into the
    folder it builds)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, src / layer, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("marble-*.whl")
    return built


def test_the_wheel_installs_only_under_marble(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"marble"}, tops
    for expected in (
        "marble/server/app.py",
        "marble/server/static/index.html",
        "marble/model/default/checkpoint/config.json",
        "marble/training/train.py",
    ):
        assert expected in names
    assert "marble/__init__.py" not in names  # a namespace: the folders are its parts
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry[0]).decode()
    assert "marble = marble.server.cli:main" in text
