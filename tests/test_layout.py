"""The package's layout (issue 17 §7, shared/DESIGN.md): modules grouped by the pipeline's stages, and imports that
flow one way, from the CLI down to the model files, with no circle anywhere (function-level imports included)."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanochat_hf"
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "configuration_nanochat.py", "modeling_nanochat.py", "errors.py",
             "output_folder.py", "speedrun.py"}
STAGES = {"tokenizer", "data", "tasks", "training", "evaluation", "inference", "hub", "custom_generate"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in it (a function-level import closes a circle too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from .pkg import module` imports the module
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
            if target in modules:
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    # a package's __init__ is imported with any of its modules; that is not a circle of the module's making
    return {m for m in found if m != name and not name.startswith(m + ".")}


def test_the_top_level_holds_the_hub_files_the_cli_and_the_stage_packages():
    files = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert files == TOP_LEVEL
    assert folders <= STAGES, folders - STAGES


def test_no_import_circle():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_hub_files_import_only_torch_transformers_and_each_other():
    for name in ("configuration_nanochat.py", "modeling_nanochat.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            roots = []
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = ["." + (node.module or "")] if node.level else [(node.module or "").split(".")[0]]
            for root in roots:
                assert root in ("torch", "transformers", ".configuration_nanochat") or root in sys.stdlib_module_names, (
                    name, root)
