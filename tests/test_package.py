"""The package's shape: one table of public names, and layers that import only downwards."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_peft

PACKAGE = Path(lightning_peft.__file__).resolve().parent

# Each part may import its own layer and the layers below it. The two lowest never import Lightning or
# Hydra, so a strategy adapts any nn.Module and a file is read without a Trainer.
LAYERS = {
    "strategies": 0,
    "formats": 1,
    "planning": 1,
    "generation": 2,
    "data": 3,
    "models": 3,
    "callbacks": 3,
    "cli": 4,
}
WITHOUT_LIGHTNING = ("strategies", "formats", "planning", "generation")


def test_every_public_name_resolves_to_the_module_the_table_names():
    assert set(lightning_peft.__all__) == {*lightning_peft._MODULE_OF, "__version__"}
    for name, module in lightning_peft._MODULE_OF.items():
        assert getattr(lightning_peft, name) is getattr(sys.modules[module], name)
    assert set(lightning_peft._MODULE_OF) <= set(dir(lightning_peft))


def test_each_public_name_is_listed_once():
    names = [name for names in lightning_peft._PUBLIC.values() for name in names]
    assert len(names) == len(set(names))


def test_importing_the_command_line_loads_neither_torch_nor_lightning():
    code = "import sys, lightning_peft.cli.main; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize(
    "module",
    [
        "lightning_peft.strategies",
        "lightning_peft.formats",
        "lightning_peft.planning",
        "lightning_peft.generation.generate",
    ],
)
def test_the_lower_layers_import_without_lightning(module):
    code = (
        f"import sys, {module}; "
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at the top or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            if node.module == "lightning_peft":  # `from lightning_peft import cli` names a part
                found += [f"lightning_peft.{alias.name}" for alias in node.names]
    return found


def test_each_part_imports_only_its_own_layer_and_those_below():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        if part not in LAYERS:  # __init__.py (the lazy table) and conf/
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if part in WITHOUT_LIGHTNING and top in ("lightning", "pytorch_lightning", "hydra"):
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
            if top != "lightning_peft":
                continue
            parts = name.split(".")
            if len(parts) == 1:
                problems.append(f"{path.relative_to(PACKAGE)} imports the package's lazy table")
            elif parts[1] in LAYERS and LAYERS[parts[1]] > LAYERS[part]:
                problems.append(f"{path.relative_to(PACKAGE)} ({part}) imports {name}")
    assert not problems, "\n".join(problems)


def test_no_file_outside_the_repository_is_referred_to():
    text = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "DESIGN.md" not in text and "STYLE.md" not in text and "shared/" not in text


def test_files_and_functions_stay_small():
    """Every module under about 400 lines and every function under about 60 (docstring included)."""
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > 420:
            long_files.append(f"{path.relative_to(PACKAGE)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 70:
                    long_functions.append(
                        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines"
                    )
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)
